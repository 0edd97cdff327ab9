"""Files that must survive a crash of the process or the machine: a checkpoint's manifest and
metadata (synced to disk before the directory is renamed), the pointer file, and the small
outputs the tools write over a file a user may already have (results, items, a tokenizer model),
each replaced atomically; and `.npy` files whose every byte is known to be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO

import numpy as np


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
    replaced. A device or a pipe (`/dev/stdout`) is written, not replaced."""
    # A pipe's real path (/proc/<pid>/fd/pipe:[N]) names nothing: ask the path given.
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        with open(path, "wb") as stream:
            stream.write(content.encode("utf-8") if isinstance(content, str) else content)
        return
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


def save_npy(file: str | os.PathLike | BinaryIO, array: np.ndarray) -> None:
    """`np.save(file, array)` (a path, or a binary file open at its start), then OSError naming
    the file unless all of it is there. numpy writes the array through a C copy of the file and
    drops the error of its last flush: when the disk fills, an array that fits in that buffer
    (a unit file, a codebook) is cut short without a word."""
    if not hasattr(file, "write"):
        with open(file, "wb") as stream:
            save_npy(stream, array)
        return
    np.save(file, array)
    file.flush()
    written, expected = os.fstat(file.fileno()).st_size, file.tell()
    if written < expected:
        raise OSError(errno.ENOSPC, f"the disk took {written} of the array's {expected} bytes",
                      getattr(file, "name", None))
