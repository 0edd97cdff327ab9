"""Percentile bootstrap confidence intervals: of an accuracy (a mean of per-item 0/1 outcomes) and
of a corpus-level rate (a ratio of per-item sums, such as WER)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Resamples drawn per chunk: bounds memory at chunk x items indices.
_CHUNK = 256


def bootstrap_ci(correct: np.ndarray, num_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of `correct.mean()`.

    `correct` is `[n]` (bool or 0/1) per item. Each resample draws n items with replacement from a
    generator seeded by `seed`, so the interval is a function of its inputs.
    """
    outcomes = np.asarray(correct, dtype=np.float64)
    if outcomes.ndim != 1 or not len(outcomes):
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array of outcomes, got shape "
                         f"{outcomes.shape}")
    return _percentile_interval(lambda picks: outcomes[picks].mean(axis=1), len(outcomes),
                                num_resamples, confidence, seed)


def bootstrap_ratio_ci(numerators: np.ndarray, denominators: np.ndarray,
                       num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                       ) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of `numerators.sum() / denominators.sum()`,
    resampling items: a corpus-level rate such as WER (edit errors over reference words, per
    utterance), whose items weigh by their length.

    `numerators` and `denominators` are `[n]` per item; every resample's denominators must sum
    above 0 (give positive ones)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or not len(num):
        raise ValueError(f"bootstrap_ratio_ci needs two non-empty 1-D arrays of one length, got "
                         f"shapes {num.shape} and {den.shape}")
    if (den <= 0).any():
        raise ValueError("bootstrap_ratio_ci needs positive denominators (an item of length 0 "
                         "has no rate); leave such items out")
    return _percentile_interval(lambda picks: num[picks].sum(axis=1) / den[picks].sum(axis=1),
                                len(num), num_resamples, confidence, seed)


def _percentile_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int,
                         num_resamples: int, confidence: float, seed: int
                         ) -> tuple[float, float]:
    """The (low, high) percentiles of `statistic` over `num_resamples` draws of n item indices
    with replacement; `statistic` maps indices [chunk, n] to one value per draw [chunk]."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_resamples)
    for start in range(0, num_resamples, _CHUNK):
        size = min(_CHUNK, num_resamples - start)
        picks = rng.integers(0, n, size=(size, n))  # [chunk, n]
        values[start:start + size] = statistic(picks)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
