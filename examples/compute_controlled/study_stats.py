"""Seed means, seed spread and two-level bootstrap intervals of story-completion accuracy.

Every run of a study is scored on the same items, so one model's outcomes under one control form
a `[seeds, items]` 0/1 array. Its accuracy is the mean over seeds and items. The 95% interval is a
two-level percentile bootstrap: each resample draws the seeds with replacement (per model) and the
items with replacement (shared by every model, since the items are the same), so the interval
holds both the item sample's noise and the seed-to-seed variation. The LST-minus-baseline
difference uses the same item draw for both models: a paired difference. With one seed the
interval is the items-only bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Resamples drawn per chunk: bounds memory at chunk x seeds x items.
_CHUNK = 128


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}

    def excludes(self, point: float) -> bool:
        return self.low > point or self.high < point


def _check(outcomes: np.ndarray, what: str) -> np.ndarray:
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if outcomes.ndim != 2 or 0 in outcomes.shape:
        raise ValueError(f"{what} must be a non-empty [seeds, items] array, got shape "
                         f"{outcomes.shape}")
    return outcomes


def _resampled_means(outcomes: np.ndarray, item_picks: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """[R] means of `outcomes` [S, I] over resampled seeds (drawn here) and the given items
    `item_picks` [R, I]."""
    num_seeds = len(outcomes)
    seed_picks = rng.integers(0, num_seeds, size=(len(item_picks), num_seeds))  # [R, S]
    per_item = outcomes[seed_picks].mean(axis=1)  # [R, I]: each resample's seed mean per item
    return np.take_along_axis(per_item, item_picks, axis=1).mean(axis=1)


def _bootstrap(arrays: list[np.ndarray], signs: list[float], num_resamples: int,
               confidence: float, seed: int) -> Estimate:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    num_items = arrays[0].shape[1]
    if any(a.shape[1] != num_items for a in arrays):
        raise ValueError(f"the models were scored on different numbers of items: "
                         f"{[a.shape[1] for a in arrays]}; a paired difference needs the same items")
    rng = np.random.default_rng(seed)
    values = np.empty(num_resamples)
    for start in range(0, num_resamples, _CHUNK):
        size = min(_CHUNK, num_resamples - start)
        item_picks = rng.integers(0, num_items, size=(size, num_items))  # [R, I], shared
        values[start:start + size] = sum(
            sign * _resampled_means(a, item_picks, rng) for a, sign in zip(arrays, signs,
                                                                          strict=True))
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    point = sum(sign * a.mean() for a, sign in zip(arrays, signs, strict=True))
    return Estimate(float(point), float(low), float(high))


def accuracy_estimate(outcomes, num_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Mean accuracy of `outcomes` [seeds, items] with its two-level bootstrap interval."""
    return _bootstrap([_check(outcomes, "outcomes")], [1.0], num_resamples, confidence, seed)


def difference_estimate(first, second, num_resamples: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> Estimate:
    """Accuracy of `first` minus that of `second` ([seeds, items] each, the same items; the seed
    counts may differ), with its paired two-level bootstrap interval."""
    return _bootstrap([_check(first, "first"), _check(second, "second")], [1.0, -1.0],
                      num_resamples, confidence, seed)


def seed_spread(outcomes) -> dict[str, float]:
    """Per-seed accuracies' standard deviation (ddof 1; 0 for one seed), minimum and maximum."""
    per_seed = _check(outcomes, "outcomes").mean(axis=1)  # [S]
    sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return {"sd": sd, "min": float(per_seed.min()), "max": float(per_seed.max()),
            "per_seed": per_seed.tolist()}
