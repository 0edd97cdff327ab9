"""The speech analysis tool's measures on hand-made cases."""

import json

import numpy as np
import pytest
from tool_modules import load_tool

analyze = load_tool("analyze_demo_speech")


def test_edit_distance_counts_unit_edits():
    assert analyze.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert analyze.edit_distance([1, 2, 3], [1, 4, 3]) == 1  # one substitution
    assert analyze.edit_distance([1, 2, 3], [2, 3]) == 1  # one deletion
    assert analyze.edit_distance([], [7, 7]) == 2
    assert analyze.normalised_distance([1, 2, 3, 4], [5, 6]) == 1.0  # 4 edits / 4 units


def test_entropy_and_divergence():
    assert analyze.entropy_bits(np.array([1.0, 1, 1, 1])) == pytest.approx(2.0)
    assert analyze.entropy_bits(np.array([5.0, 0, 0])) == 0.0
    assert analyze.js_divergence_bits(np.array([1.0, 0]), np.array([0.0, 1])) == pytest.approx(1)
    assert analyze.js_divergence_bits(np.array([2.0, 1]), np.array([4.0, 2])) == pytest.approx(0)


def test_parse_line_reads_the_on_the_fly_form():
    from megatron_lst.demo_corpus.alignment import on_the_fly_line

    line = on_the_fly_line("doc", [("[SIL]", 1), ("the", 2), ("cat", 3)],
                           np.array([4, 5, 6, 7, 8, 9]))
    assert analyze.parse_line(line) == [("[SIL]", [4]), ("the", [5, 6]), ("cat", [7, 8, 9])]
    assert json.loads(line)["file_id"] == "doc"
