"""Reading one utterance's speech units from a unit file: a `.npy` integer array, or a text file
of whitespace-separated integers (`load_units`)."""

from __future__ import annotations

import functools
import tokenize
from pathlib import Path

import numpy as np

from megatron_lst.data.document_parsing import parse_units_text
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import check_npy_data_size, read_bounded_bytes


def load_units(path: Path) -> np.ndarray:
    """[U] int64 units of a `.npy` integer array or a whitespace-separated text file."""
    unreadable = functools.partial(DocumentError, kind="unreadable unit file")
    if path.suffix == ".npy":
        check_npy_data_size(path, unreadable)
        _check_npy_magic(path)
        try:
            units = np.load(path, allow_pickle=False, mmap_mode="r")
        # SyntaxError, TokenError: a damaged header, which numpy parses as a Python literal.
        except (ValueError, OSError, SyntaxError, tokenize.TokenError) as error:
            raise DocumentError(f"{path}: not a readable .npy array ({error})",
                                kind="unreadable unit file") from None
        if units.ndim != 1 or units.dtype.kind not in "iu":
            raise DocumentError(f"{path}: expected a 1-D integer array of units, got "
                                f"{units.dtype} with shape {units.shape}",
                                kind="unreadable unit file")
        if units.dtype == np.uint64 and units.size and units.max() > np.iinfo(np.int64).max:
            # as int64 it would wrap to a negative unit, and be refused as that
            raise DocumentError(f"{path}: unit {units.max()} is beyond any codebook; the file "
                                f"does not hold unit ids", kind="unit outside the codebook")
        return np.array(units, dtype=np.int64)
    data = read_bounded_bytes(path, unreadable, "unit file")
    try:
        # a leading byte-order mark (a Windows editor's) dropped: it made the first unit no integer
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(f"{path}: not a text file of units ({error.reason} at byte "
                            f"{error.start}); expected whitespace-separated integers, or a "
                            f".npy array", kind="unreadable unit file") from None
    return parse_units_text(text, str(path))


def _check_npy_magic(path: Path) -> None:
    """Refuse a `.npy` path that does not start with numpy's magic bytes: numpy takes any other
    file for a pickle, and its refusal ("pickled data") misnames a damaged or mislabelled file."""
    magic = np.lib.format.MAGIC_PREFIX
    try:
        with open(path, "rb") as file:
            head = file.read(len(magic))
    except OSError as error:
        raise DocumentError(f"{path}: unreadable ({error.strerror})",
                            kind="unreadable unit file") from None
    if head != magic:
        raise DocumentError(f"{path}: not a .npy array (it does not start with numpy's header "
                            f"{magic!r}); a text file of units needs a .txt name",
                            kind="unreadable unit file")
