"""Percentile bootstrap intervals of an accuracy."""

import numpy as np
import pytest

from megatron_lst.evaluation.bootstrap import bootstrap_ci


def test_seeded_and_brackets_the_mean():
    correct = np.random.default_rng(0).random(200) < 0.7
    low, high = bootstrap_ci(correct, 2000, seed=3)
    assert (low, high) == bootstrap_ci(correct, 2000, seed=3)
    assert low < correct.mean() < high


def test_width_matches_the_normal_approximation():
    # n = 400 at p = 0.5: the 95% interval is about mean +- 1.96 * sqrt(p(1-p)/n) = +- 0.049.
    correct = np.arange(400) % 2 == 0
    low, high = bootstrap_ci(correct, 4000, seed=0)
    assert abs((high - low) / 2 - 0.049) < 0.006
    assert abs((high + low) / 2 - 0.5) < 0.01


def test_degenerate_and_bad_inputs():
    assert bootstrap_ci(np.ones(10, bool)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(np.zeros(0))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(np.ones(3), confidence=1.0)
