"""`<units-dir>/units.json`: how the unit files beside it were made (model, layer, frame rate,
codebook size and hash), written by `tools/extract_units.py` and checked by every later reader."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lst.data.input_files import read_bounded_bytes

UNITS_RECORD = "units.json"


def read_units_record(path: Path) -> dict:
    """The record at `path`; ValueError naming it when it is damaged or not a regular file."""
    try:
        record = json.loads(read_bounded_bytes(path, ValueError, "units record").decode("utf-8"))
    # RecursionError: JSON nested deeper than Python's stack
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is damaged, so the settings of the units beside it are unknown; "
                         f"write to a new --units-dir, or delete the old units and {path.name}")
    return record


def check_units_fit(units_dir: str | Path, num_units: int, frame_rate: float) -> None:
    """Refuse reading the units of `units_dir` as a vocabulary of `num_units` units at
    `frame_rate` Hz when the record in it, or in the nearest folder above it (a subfolder of
    an extraction's --units-dir), says they were made otherwise. No record: nothing known.

    A codebook larger than --num-units shows otherwise only in the utterances that happen to
    use a unit past the vocabulary (each refused, or under --skip-bad silently dropped)."""
    folder = Path(units_dir).resolve()
    path = next((f / UNITS_RECORD for f in (folder, *folder.parents)
                 if (f / UNITS_RECORD).is_file()), None)
    if path is None:
        return
    record = read_units_record(path)
    made = record.get("num_units")
    if isinstance(made, int) and made > num_units:
        raise ValueError(f"{units_dir}: its units come from a codebook of {made} units "
                         f"({path}), more than --num-units {num_units} holds; pass "
                         f"--num-units {made} (or more, e.g. for the tensor-parallel size), and "
                         f"the same to every dataset of the run")
    rate = record.get("frame_rate")
    if isinstance(rate, (int, float)) and rate != frame_rate:
        raise ValueError(f"{units_dir}: its units are at {rate:g} Hz ({path}), not "
                         f"--frame-rate {frame_rate:g}; pass --frame-rate {rate:g}")
