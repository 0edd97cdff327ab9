"""`<units-dir>/units.json`: how the unit files beside it were made (model, layer, frame rate,
codebook size and hash), written by `tools/extract_units.py` and checked by every later reader."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from megatron_lst.data.input_files import read_bounded_bytes

UNITS_RECORD = "units.json"
_EXTRACTION_FILE = re.compile(r"units\.json(\.tmp-[0-9a-f]+)?|.+\.npy(\.partial.*)?")
"""What tools/extract_units.py writes into its --units-dir: the record (and its temporary file
while replaced) and unit files `<id>.npy` (and their temporary files while written)."""


def read_units_record(path: Path) -> dict:
    """The record at `path`; ValueError naming it when it is damaged or not a regular file."""
    data = read_bounded_bytes(path, ValueError, "units record")
    try:
        record = json.loads(data.decode("utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer past Python's digit limit; RecursionError:
    # JSON nested deeper than Python's stack
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is damaged, so the settings of the units beside it are unknown; "
                         f"write to a new --units-dir, or delete the old units and {path.name}")
    return record


def _refuse_damaged(path: Path, problem: str) -> None:
    raise ValueError(f"{path} is damaged ({problem}), so the settings of the units beside it are "
                     f"unknown; write to a new --units-dir, or delete the old units and "
                     f"{path.name}")


def check_units_fit(units_dir: str | Path, num_units: int, frame_rate: float) -> None:
    """Refuse reading the units of `units_dir` as a vocabulary of `num_units` units at
    `frame_rate` Hz when its record (`_units_record_of`) says they were made otherwise. No
    record: nothing known.

    A codebook larger than --num-units shows otherwise only in the utterances that happen to
    use a unit past the vocabulary (each refused, or under --skip-bad silently dropped)."""
    path = _units_record_of(Path(units_dir).resolve())
    if path is None:
        return
    record = read_units_record(path)
    made, rate = record.get("num_units"), record.get("frame_rate")
    # A field of another type, once passed over (a count of "1000" checked nothing, a rate of
    # NaN advised --frame-rate nan): the record is damaged, so the units' settings are unknown.
    if made is not None and not (type(made) is int and made > 0):
        _refuse_damaged(path, f"num_units {made!r} is not a number of units")
    if rate is not None and not (type(rate) in (int, float) and 0 < rate < math.inf):
        _refuse_damaged(path, f"frame_rate {rate!r} is not a number of frames per second")
    if made is not None and made > num_units:
        raise ValueError(f"{units_dir}: its units come from a codebook of {made} units "
                         f"({path}), more than --num-units {num_units} holds; pass "
                         f"--num-units {made} (or more, e.g. for the tensor-parallel size), and "
                         f"the same to every dataset of the run")
    if rate is not None and rate != frame_rate:
        raise ValueError(f"{units_dir}: its units are at {rate:g} Hz ({path}), not "
                         f"--frame-rate {frame_rate:g}; pass --frame-rate {rate:g}")


def _units_record_of(folder: Path) -> Path | None:
    """The units.json of `folder`, else of the nearest folder above it (`folder` is then a
    subfolder of an extraction's --units-dir: utterance ids name subfolders, as LibriSpeech's
    `103/1240/103-1240-0000`). The search stops at a folder holding anything an extraction does
    not write there: it is no extraction's output, so a units.json there or above (say in a
    home folder) describes other units."""
    for candidate in (folder, *folder.parents):
        if candidate != folder and not _holds_only_extraction_output(candidate):
            return None
        if (candidate / UNITS_RECORD).is_file():
            return candidate / UNITS_RECORD
    return None


def _holds_only_extraction_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but subfolders and files tools/extract_units.py writes."""
    try:
        with os.scandir(folder) as entries:
            return all(entry.is_dir() or _EXTRACTION_FILE.fullmatch(entry.name)
                       for entry in entries)
    except OSError:  # unreadable: nothing shows it belongs to an extraction
        return False
