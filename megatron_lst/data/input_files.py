"""The one rule for opening a user's input file (docs/data.md#input-files).

A reader that reads a whole file (an items file, a TextGrid, a unit file, a manifest) takes only
a regular file, of no more bytes than the largest real file of its kind: a device (`/dev/zero`
reads forever), a FIFO (opening one blocks until a writer comes), a socket or a folder is
refused, naming it, before a byte is read. A reader that streams lines (a corpus JSONL read by
`read_text_jsonl`, which a library caller may give a pipe) takes a pipe too, and refuses a line
longer than any real document's at that line instead of reading it whole.

A `.npy` file is checked against its header before numpy reads it (`check_npy_data_size`):
numpy allocates (or maps) what the header declares first.

A file hashed to key a cache or record its provenance (`regular_file_sha256`) must be a regular
file too (hashing a FIFO would take its bytes from its reader), of any size: it is read in blocks.

Each reader raises its own error type (`error`), so callers keep catching what they caught.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

MAX_LINE_CHARACTERS = 1 << 26
"""64 Mi characters: no JSONL document is longer (an hour of speech is ~0.5 MB of units)."""

MAX_SMALL_FILE_BYTES = 1 << 26
"""64 MiB: more than any TextGrid, text unit file or manifest of one utterance or dataset."""

MAX_LARGE_TEXT_BYTES = 1 << 30
"""1 GiB: more than any evaluation items file (10k items with units are ~100 MB) or list of a
corpus's utterances."""

HASH_BLOCK_BYTES = 8 << 20
"""8 MiB: the blocks a file is hashed in, so no file (an audio or units file of many GB) is held
whole."""

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def checked_file_size(path: str | Path, error: Callable[[str], Exception], what: str,
                      pipe_allowed: bool = False) -> int:
    """The size in bytes of the regular file `path` (0 for a pipe, with `pipe_allowed`);
    `error` naming it and its kind when it is missing or not a regular file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as cause:
        raise error(_unreadable(path, what, cause)) from None
    mode = status.st_mode
    if stat.S_ISREG(mode) or (pipe_allowed and stat.S_ISFIFO(mode)):
        return status.st_size
    raise error(f"{path}: is {kind_of_irregular(mode)}, not a file; pass the {what} as a regular "
                f"file")


def kind_of_irregular(mode: int) -> str:
    """What a file of `os.stat` mode `mode` that is no regular file is, in a few words."""
    return next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")


def _unreadable(path: str | Path, what: str, cause: OSError) -> str:
    """The message for the `what` at `path` that exists but cannot be read (`cause`: its
    permissions, an I/O error of its storage)."""
    return (f"{path}: cannot read the {what} ({cause.strerror or cause}); make it readable by the "
            f"user running the job (and check its storage), or give another")


def streamed_sha256(path: str | Path) -> tuple[int, str]:
    """The size in bytes and the SHA-256 (hex) of the file `path`, read in `HASH_BLOCK_BYTES`
    blocks. It checks nothing about the file: a user's input goes through
    `regular_file_sha256`."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def regular_file_sha256(path: str | Path, error: Callable[[str], Exception], what: str) -> str:
    """The SHA-256 (hex) of the regular file `path`, read in blocks (`streamed_sha256`); `error`
    naming it and its kind when it is not one (`checked_file_size`): a FIFO would block, or give
    its bytes to the hash instead of its reader, and a directory has none."""
    checked_file_size(path, error, what)
    try:
        return streamed_sha256(path)[1]
    except OSError as cause:
        raise error(_unreadable(path, what, cause)) from None


def read_bounded_bytes(path: str | Path, error: Callable[[str], Exception], what: str,
                       max_bytes: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of the regular file `path`; `error` naming it when it is not one
    (`checked_file_size`), cannot be read (its permissions, an I/O error) or holds more than
    `max_bytes`, more than any real `what`."""
    size = checked_file_size(path, error, what)
    if size <= max_bytes:
        try:
            with open(path, "rb") as stream:
                # A read of n bytes allocates n first: the file's size, not the bound (a 1 GiB
                # bound took 1 GiB to read a record of some KB). One more byte shows that it grew
                # since `stat`, and then the rest is read, up to the bound.
                data = stream.read(size + 1)
                if len(data) > size:
                    data += stream.read(max_bytes + 1 - len(data))
        except OSError as cause:
            raise error(_unreadable(path, what, cause)) from None
        if len(data) <= max_bytes:
            return data
        size = len(data)
    raise error(f"{path}: is {size:,} bytes, more than any {what} ({max_bytes:,} bytes at "
                f"most); check that it is the right file")


def bounded_lines(stream: IO[str], path: str | Path, error: Callable[[str], Exception],
                  max_characters: int = MAX_LINE_CHARACTERS) -> Iterator[str]:
    """The lines of the text `stream` read from `path`, as iterating it gives them; `error`
    naming `path` and the line number at a line longer than `max_characters` (a file of no
    line ends: a binary file, `/dev/zero` through a pipe), before more of it is read."""
    for number, line in enumerate(iter(lambda: stream.readline(max_characters + 1), ""), 1):
        if len(line) > max_characters:
            raise error(f"{path}:{number}: a line longer than {max_characters:,} characters, "
                        f"more than any document; the file is not JSON lines or text lines "
                        f"(a binary file?), check that it is the right file")
        yield line


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


def check_npy_data_size(path: str | Path, error: Callable[[str], Exception]) -> None:
    """`error` naming the `.npy` file `path` when its header declares another number of data
    bytes than follow the header: a damaged header (shape (2**60,) was an OverflowError or a
    MemoryError of exabytes), a truncated file, or bytes appended to it; and when `path` is not
    a regular file (`checked_file_size`). A file without numpy's magic bytes, a header numpy
    cannot parse, or one of an array of Python objects is left to the caller and `np.load`,
    which name what is wrong."""
    size = checked_file_size(path, error, ".npy file")
    with open(path, "rb") as stream:
        try:
            header_reader = _NPY_HEADER_READERS.get(np.lib.format.read_magic(stream))
            if header_reader is None:  # version 3.0: non-Latin-1 field names, never units
                return
            shape, _, dtype = header_reader(stream)
        except (ValueError, SyntaxError, tokenize.TokenError):
            return
        held = size - stream.tell()
    if dtype.hasobject:
        return
    declared = math.prod(shape) * dtype.itemsize
    if declared != held or min(shape, default=0) < 0:
        raise error(f"{path}: its .npy header declares an array of shape {shape} of {dtype} "
                    f"({declared:,} bytes) but {held:,} bytes follow the header; the file is "
                    f"truncated or damaged: re-copy it, or write it again")
