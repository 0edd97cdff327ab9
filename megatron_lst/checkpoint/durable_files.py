"""Files that must survive a crash of the process or the machine: a checkpoint's manifest and
metadata (synced to disk before the directory is renamed) and the pointer file (replaced
atomically)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_file_durably(path: Path, text: str) -> None:
    """Write `text` to `path` and sync it to disk before returning. A crash during the write can
    leave the file partial: write into a directory renamed afterwards, or replace_file_durably."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_file_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: after a crash it holds the old text or the new,
    complete (a temporary file next to it, synced, renamed over it)."""
    temporary = path.with_name(f"{path.name}.tmp-{secrets.token_hex(6)}")
    write_file_durably(temporary, text)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Sync the entries of directory `path` (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
