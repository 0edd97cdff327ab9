"""Blending datasets by weight (`--data-path W1 P1 W2 P2 ...`, as in Megatron-LM).

Prefixes given without weights (`--data-path P1 P2 ...`) are weighted by their sizes, as
Megatron-LM's `get_blend_from_list` and `BlendedMegatronDatasetBuilder` weight them (by each
dataset's samples in one epoch of the split): `parse_data_path` leaves their weights None and
`weights_from_sizes` fills them in from the sizes of the documents each split reads.

Weights are normalised and count samples: with rows of a fixed number of global positions, a
weight is a share of the compute (the paper's 67% text / 33% interleaved is a share of tokens;
to blend by tokens, divide each weight by its source's tokens per sample). Sample i of the blend is
drawn from the dataset whose share falls furthest behind its weight, `argmax_d w_d max(i, 1) - n_d`
(n_d: samples taken from d so far; ties to the lowest index): Megatron's greedy blending, run by megatron.core's prebuilt
`helpers_cpp` when the installed wheel has it, else by the same loop in numpy.

Each source dataset is built for exactly the samples the blend takes from it, and learns their
places in the training order (`sample_positions`), so curriculum patching inside it follows the
blend's training steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_lst.data.dataset import DatasetError, LSTDataset


def _refuse_repeated_prefixes(pairs: list[tuple[float | None, str]]) -> None:
    """Two sources on one dataset draw the same rows in the same order (one seed, one
    document order): each row would be trained on twice and the rest of the dataset never.
    One dataset: the same data file, through any spelling or symbolic link."""
    first_of: dict[str, tuple[float | None, str]] = {}
    for weight, prefix in pairs:
        key = os.path.realpath(prefix + ".bin")
        if key in first_of:
            first_weight, first_prefix = first_of[key]
            fix = ("give it once" if weight is None else
                   f"give it once with the summed weight {first_weight + weight:g}")
            raise DatasetError(
                f"--data-path names {prefix!r} twice (also as {first_prefix!r}): both would "
                f"draw the same rows, each trained on twice; {fix}")
        first_of[key] = (weight, prefix)


def is_weight(text: str) -> bool:
    """Whether a `--data-path` value reads as a weight (a number), not a prefix."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(args: Sequence[str]) -> list[tuple[float | None, str]]:
    """`["P"]` or `["W1", "P1", "W2", "P2", ...]` -> normalised `[(weight, prefix), ...]`;
    `["P1", "P2", ...]` (several prefixes, none of them a number) -> `[(None, P1), ...]`: weighted
    by size, `weights_from_sizes`, once the documents of each split are known (Megatron-LM's
    reading of a list without weights)."""
    args = list(args)
    if not args:
        raise DatasetError("--data-path is empty; give a prefix, or weight-prefix pairs W1 P1 W2 P2")
    if len(args) == 1:
        return [(1.0, args[0])]
    if not any(is_weight(arg) for arg in args):
        pairs: list[tuple[float | None, str]] = [(None, prefix) for prefix in args]
        _refuse_repeated_prefixes(pairs)
        return pairs
    if len(args) % 2:
        raise DatasetError(f"--data-path {' '.join(args)}: expected weight-prefix pairs "
                           f"(W1 P1 W2 P2 ...) or prefixes without weights, got {len(args)} "
                           f"values, some of them numbers")
    pairs = []
    for weight, prefix in zip(args[0::2], args[1::2], strict=True):
        try:
            w = float(weight)
        except ValueError:
            raise DatasetError(f"--data-path: {weight!r} (before {prefix!r}) is not a weight; "
                               f"write weight-prefix pairs: W1 P1 W2 P2 ...") from None
        if not np.isfinite(w) or w < 0:
            raise DatasetError(f"--data-path: weight {weight} of {prefix!r} must be finite and >= 0")
        pairs.append((w, prefix))
    _refuse_repeated_prefixes(pairs)
    return _normalised(pairs, f"--data-path {' '.join(args)}: the weights sum to 0")


def _normalised(pairs: list[tuple[float, str]], all_zero: str) -> list[tuple[float, str]]:
    total = sum(w for w, _ in pairs)
    if total == np.inf:  # finite weights whose sum overflows: normalise them by the largest
        largest = max(w for w, _ in pairs)
        pairs = [(w / largest, prefix) for w, prefix in pairs]
        total = sum(w for w, _ in pairs)
    if total <= 0:
        raise DatasetError(all_zero)
    return [(w / total, prefix) for w, prefix in pairs]


def weights_from_sizes(prefixes: Sequence[str], sizes: Sequence[int], split: str
                       ) -> list[tuple[float, str]]:
    """Normalised `[(weight, prefix)]` of datasets given without weights, each weighted by its
    size in `split` (its samples there, or what they are proportional to)."""
    if len(sizes) != len(prefixes):
        raise ValueError(f"{len(sizes)} sizes for {len(prefixes)} datasets")
    return _normalised(
        [(float(size), prefix) for size, prefix in zip(sizes, prefixes, strict=True)],
        f"the {split} documents of {', '.join(prefixes)} hold nothing to weigh them by (their "
        f"sizes are all 0); give weights, --data-path W1 P1 W2 P2 ...")


def _blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    taken = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(weights * max(i, 1) - taken))
        dataset_index[i] = d
        dataset_sample_index[i] = taken[d]
        taken[d] += 1
    return dataset_index, dataset_sample_index


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """[size] int16 source of each blended sample and [size] int64 its index in that source."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not len(weights) or (weights < 0).any() or weights.sum() <= 0:
        raise DatasetError(f"blending weights must be non-negative and not all 0, got {weights}")
    weights = weights / weights.sum()
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        return _blending_indices_numpy(weights, size)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights,
                                       len(weights), size, False)
    return dataset_index, dataset_sample_index


class BlendedLSTDataset(torch.utils.data.Dataset):
    """Samples of several datasets in the order `blending_indices` gives."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray):
        counts = np.bincount(dataset_index, minlength=len(datasets))
        for d, (dataset, needed) in enumerate(zip(datasets, counts, strict=True)):
            if len(dataset) < needed:
                raise DatasetError(f"blended source {d} has {len(dataset)} samples but the blend "
                                   f"takes {needed}")
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = self.datasets[int(self.dataset_index[index])]
        return source[int(self.dataset_sample_index[index])]


def build_blended_dataset(
    weighted_sources: Sequence[tuple[float, str]],
    num_samples: int,
    make_dataset: Callable[[str, int, np.ndarray], LSTDataset],
) -> BlendedLSTDataset:
    """Blend `num_samples` samples from `[(weight, prefix)]` (`parse_data_path`'s output).

    `make_dataset(prefix, num_samples, sample_positions)` builds one source (an `LSTDataset` with
    that many rows and those training positions) and is called once per prefix with a positive
    share; it is where the store is opened and the patcher and seed are chosen.
    """
    weights = [w for w, _ in weighted_sources]
    dataset_index, dataset_sample_index = blending_indices(weights, num_samples)
    datasets = []
    for d, (_, prefix) in enumerate(weighted_sources):
        positions = np.flatnonzero(dataset_index == d)  # training positions of its rows, in order
        datasets.append(make_dataset(prefix, len(positions), positions) if len(positions) else
                        _EmptyDataset())
    return BlendedLSTDataset(datasets, dataset_index, dataset_sample_index)


class _EmptyDataset(torch.utils.data.Dataset):
    """A source the blend never draws from (its weight is too small for this many samples)."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int):
        raise IndexError("the blend takes no samples from this source")
