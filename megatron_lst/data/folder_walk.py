"""The one rule for finding a corpus's files under a folder (docs/data.md#input-files), shared
by the TextGrid corpus (`--textgrid-dir`, `--units-dir`) and the audio corpus layouts: linked
folders are followed, each real folder once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path


def files_under(root: str | Path, error: Callable[[str], Exception]) -> Iterator[Path]:
    """Every entry under `root` that is not a folder (a file, a FIFO, a dangling link), as
    `root / relative path`, following linked folders (a corpus assembled from symlinks to
    speakers or subsets, which `Path.rglob` skips without a word), each real folder once (a
    link up to a folder above would loop). A file reached through a linked folder keeps the
    link's place, its path running through the link; a folder reached at several places (a
    link to a folder also under `root`) is walked at the lexically first, whatever order the
    file system lists the folders in.

    A folder under `root` that cannot be listed (its permissions, an I/O error of its storage) is
    `error` naming it and the OS error: `os.walk` would leave its files out without a word. A
    `root` that is no folder gives no files (the caller says what it found none of)."""
    seen: set[str] = set()
    root_name = os.fspath(root)

    def unlisted(cause: OSError) -> None:
        if cause.filename == root_name and isinstance(cause, (FileNotFoundError,
                                                              NotADirectoryError)):
            return
        raise error(f"{cause.filename}: cannot list the folder ({cause.strerror or cause}), so "
                    f"its files would be left out of the corpus; make it readable by the user "
                    f"running the job, or move it out of {root_name}")

    for folder, subfolders, names in os.walk(root, onerror=unlisted, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()  # walked in this order, depth first: each folder at its first place
        yield from (Path(folder) / name for name in names)
