"""WER, CER and unit edit counts against hand-computed cases; the ratio bootstrap."""

import numpy as np
import pytest

from megatron_lst.evaluation.bootstrap import bootstrap_ci, bootstrap_ratio_ci
from megatron_lst.evaluation.edit_rates import (
    EditCounts,
    char_edits,
    normalise_text,
    unit_edits,
    word_edits,
)


def test_normalisation_lowercases_strips_punctuation_and_collapses_spaces():
    assert normalise_text("  Hello,  World!\tIt's 2 o'clock. ") == "hello world it's 2 o'clock"
    assert normalise_text("snake_case--dash") == "snake case dash"


def test_normalisation_keeps_the_letters_of_every_script():
    """Multilingual LibriSpeech and non-Latin scripts: letters are letters (they were dropped,
    so 'été' vs 'èté' counted 0 errors and a Japanese reference was 'empty')."""
    assert normalise_text("Été, ÇA VA?") == "été ça va"
    assert normalise_text("e\u0301te\u0301") == "été"  # combining accents join their letters
    assert char_edits("été", "èté") == EditCounts(1, 3)
    assert word_edits("日本語 テスト", "日本語") == EditCounts(1, 2)


@pytest.mark.parametrize("reference, hypothesis, expected", [
    ("the cat sat", "the cat sat", EditCounts(0, 3)),
    ("The Cat, sat.", "the cat sat", EditCounts(0, 3)),  # normalised first
    ("the cat sat on the mat", "the bat sat on mat", EditCounts(2, 6)),  # cat->bat, -the
    ("a b c", "", EditCounts(3, 3)),  # three deletions
    ("a", "a b c", EditCounts(2, 1)),  # two insertions: WER above 1
    ("one two three four", "two three four five", EditCounts(2, 4)),  # -one, +five
])
def test_word_edits(reference, hypothesis, expected):
    assert word_edits(reference, hypothesis) == expected


@pytest.mark.parametrize("reference, hypothesis, expected", [
    ("abc", "abd", EditCounts(1, 3)),
    ("ab cd", "abcd", EditCounts(1, 5)),  # the space counts
    ("Kitten!", "sitting", EditCounts(3, 6)),  # k->s, e->i, +g
])
def test_char_edits(reference, hypothesis, expected):
    assert char_edits(reference, hypothesis) == expected


def test_unit_edits_compare_whole_units():
    assert unit_edits(np.array([1, 2, 3, 4]), np.array([1, 3, 4, 5])) == EditCounts(2, 4)
    # 10 and 11 are single symbols, not digit strings: every unit differs, two extra.
    assert unit_edits(np.array([10, 11]), np.array([1, 0, 1, 1])) == EditCounts(4, 2)
    assert unit_edits(np.array([7]), np.array([], dtype=np.int64)) == EditCounts(1, 1)


def test_empty_references_have_no_rate():
    with pytest.raises(ValueError, match="empty after normalisation"):
        word_edits(" ?! ", "a")
    with pytest.raises(ValueError, match="reference unit sequence is empty"):
        unit_edits(np.array([], dtype=np.int64), np.array([1]))


def test_ratio_bootstrap_weighs_items_by_their_length():
    # Equal lengths: the ratio is the mean, resampled with the same draws as bootstrap_ci.
    outcomes = np.array([1, 0, 0, 1, 1, 0, 1, 1], dtype=float)
    low, high = bootstrap_ratio_ci(outcomes, np.ones(8), 500, seed=3)
    assert (low, high) == pytest.approx(bootstrap_ci(outcomes, 500, seed=3))
    # A constant rate has a zero-width interval whatever the lengths.
    assert bootstrap_ratio_ci(np.array([1.0, 3.0, 5.0]), np.array([2.0, 6.0, 10.0])) == \
        pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="positive denominators"):
        bootstrap_ratio_ci(np.array([1.0]), np.array([0.0]))
