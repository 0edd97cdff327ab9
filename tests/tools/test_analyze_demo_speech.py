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


def _item(context_units, endings_units, label, context_text="a b", ending_texts=("a", "c")):
    return {"context": {"text": context_text, "units": context_units,
                        "segments": [["a", len(context_units) - 1], ["b", 1]]},
            "endings": [{"text": t, "units": u} for t, u in zip(ending_texts, endings_units,
                                                                 strict=True)],
            "label": label}


def test_copy_accuracy_picks_the_ending_that_repeats_the_context():
    item = _item([1, 2, 3, 4, 5], [[2, 3, 4], [7, 8, 9]], label=0)
    assert analyze.copy_accuracy([item], 2) == 1.0  # [2,3],[3,4] both in the context
    assert analyze.copy_accuracy([{**item, "label": 1}], 2) == 0.0
    assert analyze.copy_accuracy([item], None) == 1.0  # word "a" is in "a b"


def test_truncate_context_keeps_the_last_units_and_their_segments():
    item = _item([1, 2, 3, 4, 5], [[2], [7]], label=0)  # segments: a x4, b x1
    cut = analyze.truncate_context(item, 2)
    assert cut["context"]["units"] == [4, 5]
    assert cut["context"]["segments"] == [["a", 1], ["b", 1]]
    assert analyze.truncate_context(item, None) is item
    assert analyze.truncate_context(item, 9) is item
