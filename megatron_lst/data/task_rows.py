"""Fine-tuning rows for ASR and TTS, made from the aligned documents of a speech store
(docs/training.md#fine-tuning-on-asr-and-tts).

Each stored aligned document is one utterance: its units (silences included) and its transcript
(the text pieces of its words). A task row lays the utterance out in the pretraining layout
(docs/data.md#interleaving) with the prompt first and the answer second:

    asr   BOS, <s>, units, <t>, pieces, EOS
    tts   BOS, <t>, pieces[, space], <s>, units, EOS

(`space` is the tokenizer's lone word-boundary piece that interleaving puts after a text block
before a mode switch, left out when the store records none.) The prompt is everything up to and
including the marker that opens the answer; the answer (the pieces for ASR, the units for TTS)
and the EOS are the targets that carry loss. The speech part is patched as in pretraining:
aligned patching cuts it at its words and silences, static patching into runs of p, and mixed and
curriculum patching draw one of the two per utterance.

`TaskDataset` serves one utterance per row, right-padded to the batch contract, with the loss
mask set on the answer's targets only (`megatron_lst.patching.contract`: positions after the last
target are padding; before it, the mask marks the trained targets). Rows visit the store's
utterances in a fresh permutation each epoch, drawn from (seed, epoch), as `LSTDataset` orders
documents. A store with an utterance that has no transcript or no units, ids outside the
vocabulary, a BOS or EOS among its pieces, or a row that does not fit `seq_length` patches or
`max_tokens` inputs under a rule the row can draw (a training row: the patcher's rules at the
rows' steps; a validation row: static for mixed and curriculum patching, as at inference), is
refused when the dataset is made (the last naming the sizes that hold every row,
`max_row_shape`), not when training reaches its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_lst.data.dataset import DatasetError, EpochOrders, checked_sample_positions, pad_row
from megatron_lst.data.documents import AlignedDocument, check_document_of, document_name
from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.patching.curriculum import Patcher
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH, MODALITY_TEXT, JointVocab

# Purpose tag of the patching generator, as in megatron_lst.data.dataset (the epoch orders are
# `EpochOrders`').
_PATCHING = 2


@dataclass
class TaskRow:
    """One utterance laid out for a task."""

    doc: InterleavedDocument
    """[n] BOS ... EOS, with the word groups of its speech part (for aligned patching)."""
    prompt_length: int
    """Tokens of the prompt: BOS up to and including the marker that opens the answer."""

    @property
    def prompt(self) -> np.ndarray:
        """[prompt_length] the ids generation starts from."""
        return self.doc.tokens[:self.prompt_length].astype(np.int64)

    @property
    def answer(self) -> np.ndarray:
        """[n - prompt_length] the targets that carry loss: the answer, then EOS."""
        return self.doc.tokens[self.prompt_length:].astype(np.int64)

    @property
    def target_mask(self) -> np.ndarray:
        """[n] bool: token j is a trained target (the answer and EOS)."""
        mask = np.zeros(len(self.doc), dtype=bool)
        mask[self.prompt_length:] = True
        return mask


def check_task(task: str) -> None:
    if task not in ("asr", "tts"):
        raise DatasetError(f"task rows are made for 'asr' or 'tts', got {task!r}")


def check_task_store(store, task: str) -> None:
    """Refuse a store that holds no utterances (a text one) for `task` rows."""
    check_task(task)
    if store.kind != "aligned":
        raise DatasetError(f"{task} rows need an aligned speech dataset, got a {store.kind} "
                           f"one{_where(store)}; give only speech datasets to --data-path "
                           f"with --task {task}")


def task_row(doc: AlignedDocument, task: str, vocab: JointVocab, space_id: int | None) -> TaskRow:
    """The `task` row of one stored utterance (see the module docstring)."""
    check_task(task)
    if not len(doc.text_ids) or not len(doc.unit_ids):
        raise DatasetError(f"an utterance needs a transcript and units for {task} rows; this "
                           f"one has {len(doc.text_ids)} text pieces and {len(doc.unit_ids)} "
                           f"units (leave such documents out of the store)")
    units = vocab.units_to_ids(doc.unit_ids, where="task row")  # [U]
    pieces = np.asarray(doc.text_ids, dtype=np.int32)  # [T]
    speech = np.concatenate([[vocab.speech_marker], units])  # [1 + U]
    if task == "asr":
        head = np.concatenate([[vocab.bos_id], speech, [vocab.text_marker]])
        tokens = np.concatenate([head, pieces, [vocab.eos_id]])
        prompt_length = len(head)
    else:
        spacer = [] if space_id is None else [space_id]
        head = np.concatenate([[vocab.bos_id, vocab.text_marker], pieces, spacer,
                               [vocab.speech_marker]])
        tokens = np.concatenate([head, units, [vocab.eos_id]])
        prompt_length = len(head)
    tokens = tokens.astype(np.int32)
    has_units = doc.seg_unit_len > 0  # words aligned to no frame form no group
    unit_mask = vocab.is_unit(tokens)
    interleaved = InterleavedDocument(
        tokens=tokens,
        modality=np.where(vocab.is_patchable_static(tokens), MODALITY_SPEECH,
                          MODALITY_TEXT).astype(np.int8),
        unit_mask=unit_mask,
        unit_group_lengths=doc.seg_unit_len[has_units].astype(np.int32),
        unit_group_is_silence=doc.is_silence[has_units])
    return TaskRow(interleaved, prompt_length)


def row_shapes(store, task: str, patcher: Patcher, space_id: int | None,
               rules: tuple[str, ...] | None = None) -> np.ndarray:
    """[D, 2] int64: the inputs of each utterance's `task` row and its most patches under any of
    `rules` (default: any rule the patcher can draw). Raises DocumentError for an utterance that
    is not a valid document."""
    rules = patcher.candidate_rules if rules is None else rules
    shapes = np.zeros((len(store), 2), dtype=np.int64)
    for index in range(len(store)):
        stored = store[index]
        # Ids outside the vocabulary, or a BOS/EOS among the transcript's pieces (which would
        # cut the row's document mid-answer), are named with the file and document.
        check_document_of(store, index, stored, store.vocab)
        row = task_row(stored, task, store.vocab, space_id)
        shapes[index, 0] = len(row.doc) - 1
        shapes[index, 1] = max((len(patcher.lengths_for_rule(row.doc, rule)) for rule in rules),
                               default=0)
    return shapes


def max_row_shape(store, task: str, patcher: Patcher, space_id: int | None,
                  rules: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(most inputs, most patches) of any `task` row of `store`'s utterances under any of `rules`
    (default: any rule the patcher can draw; `Patcher.rules_at_steps` gives those of a run's
    steps): the smallest `--max-tokens` and `--seq-length` that hold every row."""
    shapes = row_shapes(store, task, patcher, space_id, rules)  # [D, 2]
    if not len(shapes):
        return 0, 0
    most_inputs, most_patches = shapes.max(axis=0)
    return int(most_inputs), int(most_patches)


class TaskDataset(torch.utils.data.Dataset):
    """`num_samples` rows, one utterance of an aligned store each, for `task` "asr" or "tts".

    `sample_positions` maps rows to their places in the training order (a blend's), for the
    curriculum step `sample_positions[row] // global_batch_size`; `training=False` patches as at
    inference (curriculum: static). `rows_fit_checked`: the caller has run `check_rows_fit` on
    `store` with these sizes (together with the run's other parts), so it is not measured again.
    """

    def __init__(self, store, task: str, num_samples: int, seq_length: int, max_tokens: int,
                 patcher: Patcher, seed: int, *, global_batch_size: int = 1,
                 space_id: int | None = None, sample_positions: np.ndarray | None = None,
                 training: bool = True, rows_fit_checked: bool = False):
        check_task_store(store, task)
        if len(store) == 0:
            raise DatasetError("the document store is empty")
        self.num_samples = num_samples
        self.sample_positions = checked_sample_positions(sample_positions, num_samples)
        self.global_batch_size = global_batch_size
        self.training = training
        if not rows_fit_checked:
            check_rows_fit([store], task, patcher, space_id, seq_length, max_tokens,
                           part_rules=[patcher.rules_at_steps(self.steps)])
        self.store = store
        self.task = task
        self.vocab = store.vocab
        self.seq_length = seq_length
        self.max_tokens = max_tokens
        self.patcher = patcher
        self.seed = seed
        self.space_id = space_id
        self._orders = EpochOrders(seed, len(store))

    def __len__(self) -> int:
        return self.num_samples

    @property
    def steps(self) -> range | None:
        """The training steps of the rows (None: not training, the rows are patched at step
        None as at inference)."""
        if not self.training:
            return None
        if not self.num_samples:
            return range(0)
        first, last = int(self.sample_positions.min()), int(self.sample_positions.max())
        return range(first // self.global_batch_size, last // self.global_batch_size + 1)

    def document_id(self, index: int) -> tuple[int, int]:
        """(epoch, document) of row `index`."""
        return self._orders.document(index)

    def row(self, index: int) -> tuple[TaskRow, np.ndarray]:
        """Row `index`: the utterance's task row and its patch lengths `[P_row]` int32."""
        epoch, doc_id = self.document_id(index)
        row = task_row(self.store[doc_id], self.task, self.vocab, self.space_id)
        rng = (np.random.default_rng([self.seed, epoch, doc_id, _PATCHING])
               if self.patcher.needs_rng else None)
        step = (int(self.sample_positions[index]) // self.global_batch_size
                if self.training else None)
        return row, self.patcher.patch_lengths(row.doc, rng, step)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        row, lengths = self.row(index)
        sample = pad_row(row.doc.tokens.astype(np.int64), row.doc.modality.astype(np.int64),
                         lengths, self.max_tokens, self.seq_length, self.vocab.pad_id)
        trained = row.target_mask[1:]  # [L] target j + 1 of input j
        sample["loss_mask"][:len(trained)] *= torch.from_numpy(trained.astype(np.float32))
        return sample


def _check_utterances(store, task: str) -> None:
    """Refuse, before training, a store with utterances that have no transcript (silence only)
    or no units: their rows cannot be made, and training would stop when it reached one."""
    lengths = store.part_lengths()  # [D, 4]: text ids, unit ids, segment tables
    unusable = np.flatnonzero((lengths[:, 0] == 0) | (lengths[:, 1] == 0))
    if len(unusable):
        first = int(unusable[0])
        raise DatasetError(
            f"{len(unusable)} of {len(store)} utterances{_where(store)} lack a transcript or "
            f"units, which {task} rows need: document {first}{_where(store, first)} has "
            f"{lengths[first, 0]} text pieces and {lengths[first, 1]} units; leave such "
            f"utterances out of the corpus and re-run tools/preprocess_data.py")


def check_rows_fit(parts: list, task: str, patcher: Patcher, space_id: int | None,
                   seq_length: int, max_tokens: int,
                   part_rules: list[tuple[str, ...]] | None = None) -> None:
    """Refuse, before training, stores (or parts of stores) with an utterance whose row does not
    fit `max_tokens` inputs and `seq_length` patches under some rule its part can draw: training
    would stop with an error when it reached that row, after however many iterations came before
    it. `parts` are every store a run builds task rows of (its train and valid parts), so that the
    sizes the refusal names hold them all, not just the first part that is refused. `part_rules`:
    the rules each part's rows can get (`Patcher.rules_at_steps` of its steps: a train part's run
    of training steps, None for a valid part, patched as at inference); default: every rule the
    patcher can draw, for every part."""
    if part_rules is None:
        part_rules = [patcher.candidate_rules] * len(parts)
    shapes = []  # [D_part, 2] each
    for part, rules in zip(parts, part_rules, strict=True):
        if hasattr(part, "part_lengths"):  # utterances without a transcript or units, named first
            _check_utterances(part, task)
        shapes.append(row_shapes(part, task, patcher, space_id, rules))
    too_long = [np.flatnonzero((part_shapes[:, 0] > max_tokens) | (part_shapes[:, 1] > seq_length))
                for part_shapes in shapes]
    refused = [i for i, rows in enumerate(too_long) if len(rows)]
    if not refused:
        return
    store, part_shapes, first = parts[refused[0]], shapes[refused[0]], int(too_long[refused[0]][0])
    named = document_name(store, first)
    most_inputs, most_patches = (int(v) for v in np.concatenate(shapes).max(axis=0))
    if patcher.config.mode == "none":  # the token baseline: --max-tokens is --seq-length
        held = f"--seq-length {seq_length} positions hold"
        needed = f"--seq-length {most_patches}"
    else:  # --max-tokens may not be below --seq-length
        held = f"--max-tokens {max_tokens} inputs or --seq-length {seq_length} patches hold"
        needed = f"--max-tokens {max(most_inputs, most_patches)} and --seq-length {most_patches}"
    elsewhere = sum(len(too_long[i]) for i in refused[1:])
    also = (f" ({elsewhere} more in the run's other dataset parts)" if elsewhere else "")
    every = "every row" if len(parts) == 1 else "every row of every part the run builds"
    raise DatasetError(
        f"{len(too_long[refused[0]])} of {len(store)} utterances{_where(store)} make {task} rows "
        f"longer than {held}{also}: {named} has {part_shapes[first, 0]} inputs in "
        f"{part_shapes[first, 1]} patches. The smallest sizes that hold {every} are {needed} "
        f"(--max-position-embeddings at least that): give them, or leave the longest utterances "
        f"out of the store")


def _where(store, index: int | None = None) -> str:
    """" (file, document)" of a stored document or " (prefix)" of a store, when known."""
    if index is not None:
        describe = getattr(store, "describe", None)
        return f" ({describe(index)})" if describe is not None else ""
    prefix = getattr(store, "prefix", None)
    return f" ({prefix})" if prefix is not None else ""
