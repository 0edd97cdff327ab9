"""Unit files no TextGrid reads are named (`unit_files_without_textgrid`), by the rule the
reader finds a unit file by (`find_units_file`): whatever stands at the name, not only a regular
file."""

from __future__ import annotations

import os

import numpy as np

from megatron_lst.data.textgrid import Interval, write_textgrid
from megatron_lst.data.textgrid_corpus import textgrid_utterances, unit_files_without_textgrid


def test_a_fifo_unit_file_without_a_textgrid_is_named(tmp_path):
    """A FIFO `u1.npy` of no TextGrid was not listed, its utterance left out without a word; a
    FIFO of an utterance with a TextGrid is read (and refused by name there), so not listed."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    grids.mkdir()
    units.mkdir()
    for name in ("u0", "u2"):
        write_textgrid(grids / f"{name}.TextGrid", [Interval(0.0, 1.0, "hello")])
    np.save(units / "u0.npy", np.arange(50))
    os.mkfifo(units / "u1.npy")  # no TextGrid
    os.mkfifo(units / "u2.npy")  # its TextGrid reads it
    utterances = textgrid_utterances(grids, units)
    assert unit_files_without_textgrid(grids, units, utterances) == [units / "u1.npy"]
