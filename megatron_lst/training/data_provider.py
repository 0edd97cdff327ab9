"""Training and validation data of a run: datasets from `--data-path`/`--split` (or whole
datasets from `--train-data-path`/`--valid-data-path`), and loaders with Megatron's pretraining
sampler semantics.

Datasets. `--data-path` names indexed datasets (`tools/preprocess_data.py` output), weighted
(`W1 P1 W2 P2 ...`, blended by `megatron_lst.data.blend`) or not (`P1 P2 ...`: as in Megatron-LM,
each split blends them by their sizes there, `split_sizes`). `--split a,b,c` cuts every
dataset's documents, in stored order, into train / valid / test ranges of those proportions, as
Megatron-LM does. The train dataset holds `train_iters x global_batch_size` rows (training mode:
the patcher sees each row's training step, so the curriculum follows the global step). The valid
dataset holds `eval_iters x global_batch_size` rows in inference mode (curriculum and mixed
patching are static) and every evaluation reads the same rows, so validation losses are comparable across a
run and across runs. A dataset too small to have validation documents under `--split` is left
out of the valid blend (with a warning that names it); the others are validated on.

Tasks. `--task lm` (the default) makes the pretraining rows above; `--task asr|tts` makes one
task row per utterance of each aligned dataset (`megatron_lst.data.task_rows`: prompt, answer,
EOS, loss on the answer and EOS only), from the same documents, splits and blend.

Sampling. Row i of the train dataset is the i-th sample of the training order: iteration t
(counted from 0: the loop logs it as iteration t + 1, and it is curriculum step t) reads rows
[t * G, (t + 1) * G) of a global batch of G rows. That batch is cut into micro-batches of
`micro_batch_size x data_parallel_size` consecutive rows and data-parallel rank r takes rows
[r * b, (r + 1) * b) of each (b = micro-batch size), which is `MegatronPretrainingSampler`. A run
resumed with `consumed_samples` continues at exactly the next row.

Loader workers (`--num-workers`) ignore the run's `--exit-signal`s under `--exit-signal-handler`:
torchrun sends its SIGTERM to each trainer's whole process group and SLURM signals every process
of the step, and a worker killed by it would crash the trainer at its next batch instead of
letting it save and exit. The trainer stops its workers when it exits.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_lst.data.blend import build_blended_dataset, parse_data_path, weights_from_sizes
from megatron_lst.data.dataset import DatasetError, LSTDataset
from megatron_lst.data.indexed import DocumentStore
from megatron_lst.data.interleave import InterleaveConfig
from megatron_lst.data.task_rows import TaskDataset, check_rows_fit, check_task_store
from megatron_lst.patching import Patcher, PatchingConfig
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training.exit_conditions import ExitConditions
from megatron_lst.training.rank_zero_first import (
    OtherRankFailed,
    rank_zero_first,
    report_progress,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# BOS, <t> and EOS around a text document's pieces (`Interleaver.text_document`).
_SPECIALS_PER_DOCUMENT = 3


class DocumentRange:
    """Documents `[start, stop)` of a store, with the store's interface (`kind`, `vocab`,
    `prefix`, len, indexing, `describe`, `part_lengths`, `token_total`). The dataset keys its
    cached row index by the store's files, not by the range: give each range a cache directory
    of its own (`build_datasets` does)."""

    def __init__(self, store: DocumentStore, start: int, stop: int):
        if not 0 <= start <= stop <= len(store):
            raise DatasetError(f"document range [{start}, {stop}) is outside the "
                               f"{len(store)} documents of {store.prefix}")
        self.store = store
        self.kind = store.kind
        self.vocab = store.vocab
        self.prefix = store.prefix
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} outside 0..{len(self) - 1}")
        return self.store[self.start + index]

    def describe(self, index: int) -> str:
        return self.store.describe(self.start + index)

    def part_lengths(self) -> np.ndarray:
        return self.store.part_lengths(self.start, self.stop)

    def token_total(self) -> int:
        """Text pieces + units of the range's documents (no specials)."""
        return self.store.token_total(self.start, self.stop)


def split_bounds(split: str, num_documents: int) -> dict[str, tuple[int, int]]:
    """`"969,30,1"` -> `{"train": (0, a), "valid": (a, b), "test": (b, D)}` over D documents,
    with megatron.core's arithmetic (`parse_and_normalize_split`,
    `convert_split_vector_to_split_matrix`): the proportions normalised, summed one after the
    other in floating point, each edge `round(edge * D)`, so that every edge falls where
    Megatron-LM puts it ("7,2,1" over 15 documents: valid is [10, 13), as 0.7 + 0.2 is just
    under 0.9)."""
    cumulative = [0.0]
    for share in split_shares(split):
        cumulative.append(cumulative[-1] + share)
    edges = [int(round(c * float(num_documents))) for c in cumulative]
    edges[-1] = num_documents
    return {name: (edges[i], edges[i + 1]) for i, name in enumerate(SPLITS)}


def split_shares(split: str) -> list[float]:
    """`"969,30,1"` -> the train, valid and test shares of every dataset's documents, normalised
    to sum to 1 (`split_bounds`); DatasetError naming `--split` when it is malformed."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise DatasetError(f"--split {split!r}: expected comma-separated proportions like "
                           f"969,30,1") from None
    if len(parts) > len(SPLITS):  # a fourth share was dropped, moving the others' edges
        raise DatasetError(f"--split {split!r}: {len(parts)} proportions; give at most three, "
                           f"for train, valid and test (e.g. 969,30,1)")
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if not all(0 <= p < math.inf for p in parts) or sum(parts) <= 0:
        raise DatasetError(f"--split {split!r}: proportions must be finite, >= 0 and not all 0")
    shares = np.array(parts, dtype=np.float64)
    return (shares / np.sum(shares)).tolist()


def patching_config_from_args(args: argparse.Namespace) -> PatchingConfig:
    return PatchingConfig(
        mode=args.patching_mode,
        patch_size=args.patch_size,
        silence=args.silence_patching,
        prob_static=args.mixed_static_prob,
        aligned_until_step=args.curriculum_tau1,
        static_from_step=args.curriculum_tau2,
    )


def data_vocab(args: argparse.Namespace) -> JointVocab:
    """The joint vocabulary of the datasets (`split_sources`), from their manifests, with their
    tokenizer's digest (checkpoints record both); every dataset must share it, and every aligned
    dataset the frame rate of its units (`_check_frame_rates`). It is the data's, not
    `--num-units`'s: the run trains on the ids the data holds."""
    vocab = first = None
    prefixes = dict.fromkeys(prefix for sources in split_sources(args).values()
                             for _, prefix in sources)
    stores = {prefix: DocumentStore(prefix) for prefix in prefixes}
    _check_frame_rates(stores)
    for prefix, store in stores.items():
        store_vocab = store.vocab
        if vocab is None:
            vocab, first = store_vocab, prefix
        elif store_vocab != vocab or store_vocab.tokenizer_sha256 != vocab.tokenizer_sha256:
            raise VocabularyError(
                f"dataset {prefix} was made with {store_vocab.describe()} but dataset {first} "
                f"with {vocab.describe()}; preprocess every dataset with the same tokenizer and "
                f"--num-units")
    if vocab.num_units != args.num_units:
        logger.info("the datasets hold %d speech units (--num-units %d ignored)",
                    vocab.num_units, args.num_units)
    return vocab


def _check_frame_rates(stores: dict[str, DocumentStore]) -> None:
    """Refuse aligned datasets whose manifests record different unit frame rates. The rows of
    each are patched right (its segments were cut in frames at its own rate), but one unit id
    would last 1/rate seconds in one dataset and another time in the other: the model would
    learn speech at two speeds, and generated units are timed at a single rate (lst-eval's TTS
    durations read the evaluation data's). Text datasets record no rate."""
    rates = {prefix: store.manifest.frame_rate for prefix, store in stores.items()
             if store.manifest.frame_rate is not None}
    if len(set(rates.values())) < 2:
        return
    (first, rate), *rest = rates.items()
    other, other_rate = next((prefix, r) for prefix, r in rest if r != rate)
    raise VocabularyError(
        f"dataset {other} holds speech units at {other_rate:g} frames per second but dataset "
        f"{first} at {rate:g}: one unit would stand for {1000 / other_rate:g} ms in one and "
        f"{1000 / rate:g} ms in the other; train on units extracted at one frame rate "
        f"(tools/preprocess_data.py --frame-rate, as the units were made)")


@dataclass
class RunDatasets:
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    """None when the valid split is empty or evaluation is off."""
    vocab: JointVocab


def _space_id(args: argparse.Namespace, stores: list[DocumentStore]) -> int | None:
    """The tokenizer's word-boundary piece, which interleaving puts after a text run: from
    `--tokenizer-model` when given (checked against every store), else as the stores' manifests
    recorded it (tools/preprocess_data.py writes it there)."""
    if args.tokenizer_model is None:
        recorded = {store.manifest.tokenizer.space_id for store in stores}
        if len(recorded) > 1:
            raise VocabularyError(
                f"the datasets record different word-boundary pieces {sorted(recorded, key=str)}: "
                "they were made with different tokenizers; preprocess them with one tokenizer")
        space_id = recorded.pop()
        if space_id is None:
            logger.warning("the datasets record no word-boundary piece: text runs are interleaved "
                           "without the trailing piece the reference puts before a mode switch")
        return space_id
    from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer

    try:
        tokenizer = load_text_tokenizer(args.tokenizer_model)
    except FileNotFoundError as error:
        raise VocabularyError(f"--tokenizer-model: {error}") from None
    for store in stores:
        store.check_tokenizer(tokenizer)
    return tokenizer.space_id


def build_datasets(args: argparse.Namespace, index_cache_dir: str | Path | None = None) -> RunDatasets:
    """Train and valid datasets of validated `args` (see the module docstring).

    `index_cache_dir`: where the datasets keep their row indices, so that restarts and the other
    ranks read them back (default: `<--save>/lst_row_index`, none without --save). With a cache,
    rank 0 builds the indices first and the other ranks then read them, waiting on the process
    group's store for as long as that takes (`rank_zero_first`: not a collective, which
    --distributed-timeout-minutes would cut short); when a rank fails, the others raise
    DatasetError.
    """
    if args.data_path is None and args.train_data_path is None:
        raise DatasetError("no --data-path or --train-data-path: give the dataset prefixes "
                           "written by tools/preprocess_data.py")
    if index_cache_dir is None and args.save is not None:
        index_cache_dir = Path(args.save) / "lst_row_index"
    cache_root = Path(index_cache_dir) if index_cache_dir else None
    if cache_root is None or args.task != "lm":  # every rank builds its own (task rows keep none)
        return _build_datasets(args, cache_root)
    try:  # rank 0 builds and caches the row indices, then the other ranks load them
        return rank_zero_first(lambda: _build_datasets(args, cache_root), "build the datasets")
    except OtherRankFailed as error:
        raise DatasetError(str(error)) from None


def _build_datasets(args: argparse.Namespace, cache_root: Path | None) -> RunDatasets:
    vocab = data_vocab(args)
    sources = split_sources(args)
    stores = {prefix: DocumentStore(prefix)
              for weighted in sources.values() for _, prefix in weighted}
    for prefix, store in stores.items():
        counts = store.manifest.counts
        logger.info("dataset %s: %d %s documents, %d text pieces, %d units", prefix, len(store),
                    store.kind, counts.text_pieces, counts.units)
    if args.task != "lm":  # a text dataset is named before any speech one is measured
        for store in stores.values():
            check_task_store(store, args.task)
    space_id = _space_id(args, list(stores.values()))
    patcher = Patcher(patching_config_from_args(args))

    def documents(prefix: str, split: str) -> DocumentRange:
        store = stores[prefix]
        if args.data_path is None:  # --train-data-path / --valid-data-path: whole datasets
            return DocumentRange(store, 0, len(store))
        start, stop = split_bounds(args.split, len(store))[split]
        if stop == start:
            raise DatasetError(
                f"--split {args.split} leaves the {split} part of {prefix} empty "
                f"({len(store)} documents); change --split or add documents")
        return DocumentRange(store, start, stop)

    interleave = InterleaveConfig(speech_only_fraction=args.speech_only_fraction)

    def make(split: str, sources: list[tuple[float | None, str]], num_samples: int,
             training: bool):
        def make_source(prefix: str, count: int, positions: np.ndarray
                        ) -> LSTDataset | TaskDataset:
            part = documents(prefix, split)
            if args.task != "lm":
                return TaskDataset(
                    part, args.task, count, args.seq_length, args.max_tokens, patcher, args.seed,
                    global_batch_size=args.global_batch_size, space_id=space_id,
                    sample_positions=positions, training=training, rows_fit_checked=True)
            cache = (cache_root / f"{Path(prefix).name}_{split}_{part.start}_{part.stop}"
                     if cache_root is not None else None)
            return LSTDataset(
                part, count, args.seq_length, args.max_tokens,
                patcher, args.seed, global_batch_size=args.global_batch_size, space_id=space_id,
                interleave=interleave, sample_positions=positions, training=training,
                index_cache_dir=cache, index_workers=args.index_workers,
                on_progress=report_progress)

        if any(weight is None for weight, _ in sources):  # given without weights: by size
            prefixes = [prefix for _, prefix in sources]
            sizes = split_sizes([documents(prefix, split) for prefix in prefixes], args.task)
            sources = weights_from_sizes(prefixes, sizes, split)
            logger.info("%s blend of datasets given without weights, weighted by their %s: %s",
                        split, "utterances" if args.task != "lm" else "tokens",
                        ", ".join(f"{prefix} {size} ({weight:.4g})"
                                  for (weight, prefix), size in zip(sources, sizes, strict=True)))
        return build_blended_dataset(sources, num_samples, make_source)

    if args.eval_iters == 0:  # Megatron-LM's way of training without validation
        logger.warning("--eval-iters 0: no validation loss")
        valid_sources = []
    else:
        valid_sources = _validation_sources(args, sources, stores)
    if args.task != "lm":  # one refusal names the sizes that hold the train and valid rows
        # Each part under the rules its rows can get: train rows at steps 0 .. train_iters - 1,
        # valid rows at step None (as at inference: static for mixed and curriculum patching).
        parts = [(split, prefix) for split, weighted in
                 (("train", sources["train"]), ("valid", valid_sources)) for _, prefix in weighted]
        rules = {"train": patcher.rules_at_steps(range(args.train_iters)),
                 "valid": patcher.rules_at_steps(None)}
        check_rows_fit([documents(prefix, split) for split, prefix in parts],
                       args.task, patcher, space_id, args.seq_length, args.max_tokens,
                       part_rules=[rules[split] for split, _ in parts])
    train = make("train", sources["train"], args.train_iters * args.global_batch_size,
                 training=True)
    valid = None
    if valid_sources:
        valid = make("valid", valid_sources, args.eval_iters * args.global_batch_size,
                     training=False)
    return RunDatasets(train=train, valid=valid, vocab=vocab)


def split_sizes(parts: list[DocumentRange], task: str) -> list[int]:
    """What Megatron-LM weighs datasets given without weights by, their samples in one epoch of
    the split (its tokens over --seq-length), here: the utterances of each part for task rows (one
    row each), and for pretraining rows its documents' tokens: text pieces and units, plus the
    BOS, `<t>` and EOS a document is laid out with. A text document's tokens are its patches, so
    the weights of text datasets are their rows per epoch; an aligned document's count both its
    transcript and its units, of which interleaving reads one or the other, word by word."""
    if task != "lm":
        return [len(part) for part in parts]
    return [part.token_total() + _SPECIALS_PER_DOCUMENT * len(part) for part in parts]


def _validation_sources(args: argparse.Namespace,
                        sources: dict[str, list[tuple[float | None, str]]],
                        stores: dict[str, DocumentStore]) -> list[tuple[float | None, str]]:
    """The weighted datasets to validate on: `--valid-data-path`, or under `--split` the datasets
    whose valid part holds documents (the blend's weights renormalise over them); says which
    datasets are left out, and when nothing is left to validate on."""
    if "valid" not in sources:
        logger.warning("no --valid-data-path: no validation loss")
        return []
    if args.data_path is None:
        return sources["valid"]
    def valid_documents(prefix: str) -> int:
        start, stop = split_bounds(args.split, len(stores[prefix]))["valid"]
        return stop - start

    empty = [prefix for _, prefix in sources["valid"] if valid_documents(prefix) == 0]
    kept = [(weight, prefix) for weight, prefix in sources["valid"] if prefix not in empty]
    if not kept:
        logger.warning("--split %s leaves no validation documents in any dataset: no validation loss",
                       args.split)
    elif empty:
        logger.warning("--split %s leaves no validation documents in %s (%s): validating on %s",
                       args.split, ", ".join(empty),
                       ", ".join(f"{len(stores[p])} documents" for p in empty),
                       ", ".join(prefix for _, prefix in kept))
    return kept


def split_sources(args: argparse.Namespace) -> dict[str, list[tuple[float | None, str]]]:
    """The weighted dataset prefixes of each split: `--data-path` for train and valid (cut by
    `--split`), or `--train-data-path` and, when given, `--valid-data-path` (weights None: given
    without weights, see `parse_data_path`)."""
    if args.data_path is not None:
        sources = parse_data_path(args.data_path)
        return {"train": sources, "valid": sources}
    split = {"train": parse_data_path(args.train_data_path)}
    if args.valid_data_path is not None:
        split["valid"] = parse_data_path(args.valid_data_path)
    return split


class PretrainingBatchSampler:
    """Megatron's `MegatronPretrainingSampler`: this data-parallel rank's micro-batches of the
    rows `[consumed_samples, total_samples)`, in training order (see the module docstring)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} is outside "
                             f"0..{data_parallel_size - 1}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed samples {consumed_samples} outside 0..{total_samples}: "
                             f"the checkpoint is from a longer run; raise --train-iters")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.stride = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.stride

    def __iter__(self) -> Iterator[list[int]]:
        for batch_start in range(self.consumed_samples, self.total_samples - self.stride + 1,
                                 self.stride):
            start = batch_start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(start, start + self.micro_batch_size))


def build_loader(dataset: torch.utils.data.Dataset, args: argparse.Namespace,
                 consumed_samples: int = 0) -> torch.utils.data.DataLoader:
    """This data-parallel rank's loader over `dataset` from `consumed_samples` on.

    The loader draws its workers' base seed from a generator of its own (seeded with --seed), not
    from torch's global one: each iterator it makes draws once, and a draw from the global
    generator (which hidden dropout uses on CPU) would shift the dropout masks of a resumed run,
    whose restored generator state is followed by the training loader's draw, from those of the
    uninterrupted run."""
    from megatron.core import parallel_state

    sampler = PretrainingBatchSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=args.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size())
    exit_signals = ExitConditions.from_args(args).signals
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=functools.partial(_ignore_signals, exit_signals) if exit_signals else None)


def _ignore_signals(signals: tuple[signal.Signals, ...], worker_id: int) -> None:
    """A loader worker's start: leave `signals` (the run's exit signals) to the trainer."""
    del worker_id
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
