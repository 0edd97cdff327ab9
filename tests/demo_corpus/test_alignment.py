import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.data.textgrid import Interval
from megatron_lst.demo_corpus.alignment import (
    SILENCE,
    AlignmentError,
    on_the_fly_line,
    segments_from_intervals,
)

FIXTURE = Path(__file__).resolve().parents[2] / "../shared/fixtures/reference_lst"


def test_gaps_become_silences_and_counts_cover_the_units():
    words = [Interval(0.20, 0.50, "once"), Interval(0.50, 0.70, "upon"),
             Interval(1.00, 1.40, "time")]
    segments = segments_from_intervals(words, num_units=40)  # 1.6 s at 25 Hz
    assert segments == [(SILENCE, 5), ("once", 8), ("upon", 5), (SILENCE, 7), ("time", 10),
                        (SILENCE, 5)]


def test_every_word_keeps_a_unit_and_short_silences_vanish():
    # Three words inside 60 ms, a 10 ms pause: rounding alone would give two words no unit.
    words = [Interval(0.0, 0.02, "a"), Interval(0.02, 0.04, "b"), Interval(0.05, 0.06, "c")]
    segments = segments_from_intervals(words, num_units=4)
    assert [w for w, _ in segments if w != SILENCE] == ["a", "b", "c"]
    assert all(n >= 1 for _, n in segments) and sum(n for _, n in segments) == 4


def test_empty_labels_are_silences_and_too_many_words_raise():
    segments = segments_from_intervals([Interval(0, 0.4, "hi"), Interval(0.4, 0.8, "")], 20)
    assert segments == [("hi", 10), (SILENCE, 10)]
    with pytest.raises(AlignmentError, match="cannot each get a unit"):
        segments_from_intervals([Interval(0, 0.01, "a"), Interval(0.01, 0.02, "b")], 1)
    with pytest.raises(AlignmentError, match="overlap"):
        segments_from_intervals([Interval(0, 0.5, "a"), Interval(0.4, 0.6, "b")], 20)


def test_on_the_fly_line_matches_the_reference_form():
    line = on_the_fly_line("utt1", [(SILENCE, 2), ("in", 1), ("the", 3)], np.array([9, 9, 4, 1, 2, 3]))
    record = json.loads(line)
    assert record == {"file_id": "utt1", "interleaved":
                      "<LST MODE SEP>TEXT [SIL] <LST MODE SEP>HUBERT 9 9 "
                      "<LST MODE SEP>TEXT in <LST MODE SEP>HUBERT 4 "
                      "<LST MODE SEP>TEXT the <LST MODE SEP>HUBERT 1 2 3"}
    with pytest.raises(AlignmentError, match="segments hold 3 units"):
        on_the_fly_line("utt1", [("in", 3)], np.arange(4))


def test_reference_sample_has_the_same_shape():
    path = FIXTURE / "mls.chunk.00.on_the_fly"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURE}")
    reference = json.loads(path.read_text().splitlines()[0])
    ours = json.loads(on_the_fly_line("x", [("a", 1), (SILENCE, 2)], np.array([1, 2, 3])))
    assert set(reference) == set(ours)
    pattern = r"(<LST MODE SEP>TEXT \S+ <LST MODE SEP>HUBERT( \d+)+ ?)+"
    assert re.fullmatch(pattern, reference["interleaved"])
    assert re.fullmatch(pattern, ours["interleaved"])
