"""The small files a checkpoint keeps its records in (`lst_checkpoint.json`, `lst_manifest.json`,
megatron's `metadata.json`, a portable checkpoint's `lst_config.json`, the save directory's
`latest_checkpointed_iteration.txt`), read by the rule of a user's input file
(`data/input_files.read_bounded_bytes`): a regular file of no more bytes than any such file a
save writes. A FIFO in place of one blocked the load forever (opening it waits for a writer), and
a file of many GB was read whole."""

from __future__ import annotations

import os
from collections.abc import Callable

from megatron_lst.data.input_files import read_bounded_bytes

MAX_RECORD_FILE_BYTES = 1 << 26
"""64 MiB: more than any record a save writes. An lst_checkpoint.json (a run's flags, vocabulary,
position and datasets' fingerprints) or lst_config.json is some KB, a manifest ~100 bytes a file,
megatron's metadata.json ~100 bytes."""

MAX_POINTER_FILE_BYTES = 1 << 10
"""1 KiB: more than the pointer file's iteration number (at most 19 digits) and its line end."""


def read_record_file(path: str | os.PathLike, error: Callable[[str], Exception], what: str,
                     max_bytes: int = MAX_RECORD_FILE_BYTES) -> bytes:
    """The bytes of the checkpoint record `path`; `error` (a checkpoint error class) naming it
    when it is missing, not a regular file (a FIFO, a folder), cannot be read, or holds more than
    `max_bytes`, more than any real `what`."""
    return read_bounded_bytes(path, error, what, max_bytes)
