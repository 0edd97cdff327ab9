"""The study's interval math on cases worked out by hand."""

import numpy as np
import pytest
from study_stats import accuracy_estimate, difference_estimate, seed_spread


def test_constant_outcomes_give_a_point_interval():
    right = np.ones((3, 50))
    wrong = np.zeros((2, 50))
    assert accuracy_estimate(right).as_dict() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    difference = difference_estimate(right, wrong)
    assert (difference.value, difference.low, difference.high) == (1.0, 1.0, 1.0)
    same = difference_estimate(right, right)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_one_seed_matches_the_binomial_interval():
    # 400 items, 60% right: the normal approximation gives 0.6 +- 1.96 * sqrt(.24 / 400) = +-4.8.
    outcomes = (np.arange(400) % 5 < 3)[None].astype(float)
    estimate = accuracy_estimate(outcomes, num_resamples=4000)
    assert estimate.value == pytest.approx(0.6)
    # Seeded bootstrap: 0.003 from the normal interval here; a 90% interval (+-4.0) is 0.008 off,
    # which abs=0.01 let through.
    assert estimate.low == pytest.approx(0.6 - 0.048, abs=0.004)
    assert estimate.high == pytest.approx(0.6 + 0.048, abs=0.004)


def test_seeds_that_disagree_widen_the_interval():
    # Seed 1 right on every item, seed 2 wrong on every item: an items-only bootstrap of the
    # seed mean would say exactly 50%; resampling the seeds too gives 0%, 50% or 100% (1/4, 1/2,
    # 1/4), so the 95% interval is [0, 1].
    outcomes = np.stack([np.ones(30), np.zeros(30)])
    estimate = accuracy_estimate(outcomes)
    assert estimate.value == 0.5
    assert (estimate.low, estimate.high) == (0.0, 1.0)
    assert seed_spread(outcomes) == {"sd": pytest.approx(np.sqrt(0.5)), "min": 0.0, "max": 1.0,
                                     "per_seed": [1.0, 0.0]}


def test_difference_is_paired_over_items():
    # Both models right on the same random half of the items, and the first also on 20 more:
    # per item the difference is 0 or +1, so every resample is >= 0, and the mean is 20 / 200.
    rng = np.random.default_rng(3)
    shared = rng.random(200) < 0.5
    extra = np.zeros(200, bool)
    extra[np.flatnonzero(~shared)[:20]] = True
    first, second = (shared | extra)[None].astype(float), shared[None].astype(float)
    difference = difference_estimate(first, second, num_resamples=4000)
    assert difference.value == pytest.approx(0.1)
    assert difference.low > 0.05 and difference.high < 0.15  # sd of the mean = sqrt(.09 / 200)
    assert difference.excludes(0.0)
    # Unpaired, the two accuracies' item noise (sd ~3.5 points each) would swamp the 10 points.
    unpaired = difference_estimate(first, np.roll(second, 1, axis=1), num_resamples=4000)
    assert unpaired.high - unpaired.low > 2 * (difference.high - difference.low)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[seeds, items\]"):
        accuracy_estimate(np.ones(5))
    with pytest.raises(ValueError, match="different numbers of items"):
        difference_estimate(np.ones((1, 5)), np.ones((1, 6)))


def test_small_cases_match_their_exact_bootstrap_distribution():
    # One seed, items (1, 0, 1, 1): a resample's accuracy is Binomial(4, 3/4) / 4, whose
    # cumulative probabilities are 1/256, 13/256 (> 2.5%), ..., 175/256 (< 97.5%), 1: the
    # percentile interval is [1/4, 1].
    estimate = accuracy_estimate(np.array([[1, 0, 1, 1]]), num_resamples=20000)
    assert (estimate.value, estimate.low, estimate.high) == (0.75, 0.25, 1.0)
    # Ties: two items, one right: 0, 1/2 or 1 with 1/4, 1/2, 1/4.
    assert accuracy_estimate(np.array([[1, 0]])).as_dict() == {
        "value": 0.5, "ci_low": 0.0, "ci_high": 1.0}
    # Three seeds at 1/2, 1 and 0: sd with ddof 1 is 1/2.
    spread = seed_spread(np.array([[1, 0], [1, 1], [0, 0]]))
    assert spread == {"sd": 0.5, "min": 0.0, "max": 1.0, "per_seed": [0.5, 1.0, 0.0]}
    # One seed: no spread.
    assert seed_spread(np.array([[1, 0, 1, 1]]))["sd"] == 0.0
    # Equal outcomes, different seed counts: the difference is exactly zero.
    same = difference_estimate(np.array([[1, 0, 1]]), np.array([[1, 0, 1], [1, 0, 1]]))
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
