"""Files that must survive a crash of the process or the machine: a checkpoint's manifest and
metadata (synced to disk before the directory is renamed), the pointer file, and the small
outputs the tools write over a file a user may already have (results, items, a tokenizer model),
each replaced atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_file_durably(path: Path, content: str | bytes) -> None:
    """Write `content` (text as UTF-8) to `path` and sync it to disk before returning. A crash
    during the write can leave the file partial: write into a directory renamed afterwards, or
    replace_file_durably."""
    with open(path, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())


def replace_file_durably(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace `path` with `content` atomically: after a crash, or a write that fails (a full
    disk), it holds the old content or the new, complete (a temporary file beside it, synced,
    renamed over it; a failed write removes it). A symbolic link stays: the file it names is
    replaced."""
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
    try:
        write_file_durably(temporary, content)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def fsync_directory(path: Path) -> None:
    """Sync the entries of directory `path` (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
