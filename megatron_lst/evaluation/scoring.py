"""Likelihood scoring of story-completion items in four modes (docs/evaluation.md#scoring).

A mode puts the context in one modality and the endings in another: S->S, T->T, S->T, T->S. Each
(item, ending) pair is one sequence in training's layout, where a mode marker opens every run and
runs alternate modality (the interleaver never puts two runs of one modality side by side):

    S->S  BOS, <s>, context units, ending units
    T->T  BOS, <t>, context pieces, ending pieces
    S->T  BOS, <s>, context units, <t>, ending pieces
    T->S  BOS, <t>, context pieces, space, <s>, ending units

In the same-modality modes the ending continues the context's run, so static patches of S->S may
span the boundary, as they would when the model continues speech; a second `<s>` would have to
start a patch of its own (the batch contract), a layout training never shows. A text run followed
by a speech run ends with the word-boundary piece, as the interleaver lays it out; a text ending
after text needs none, since the tokenizer encodes words one by one with a leading boundary.

The ending's score is the sum of the log-probabilities of its own tokens (not the marker, which
every ending shares), given everything before them; the normalised score divides by their number.
An item is right when the argmax ending is its label (ties go to the first ending).

Scoring the whole sequence in one forward pass is exact: the log-prob of token t comes from the
decoder output at t-1, which reads only patches ending at or before t-1 (docs/architecture.md#the-batch-contract), so
it equals the next-token log-prob of the prefix (a test checks this). Sequences are patched as the
model is at inference: the whole sequence by the eval patcher (`inference_patcher`: curriculum
and mixed models are patched statically). A batch holds every ending of `batch_size` items, padded
as training pads (the padding joins each row's last patch). An item longer than the model's
context (--max-position-embeddings) is scored whole, past the context, with a warning and a count
in the results, or, with `truncate_context` (lst-eval --truncate-context), with its context cut
from the left to fit (`fit_to_context`). The forward goes through megatron's forward-only
schedule, so tensor and pipeline parallelism work (under virtual pipeline stages a batch is split
into the micro-batches the interleaved schedule needs: `ending_logprobs`); scores are broadcast from the last pipeline
stage, and data-parallel replicas each score a contiguous share of the items and exchange the
scores, so every rank returns the same result.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.evaluation.bootstrap import bootstrap_ci
from megatron_lst.evaluation.items import EvalItem, ItemError, Utterance, check_items_for_speech
from megatron_lst.patching import Patcher, PatchingConfig
from megatron_lst.tokenizer.vocab import JointVocab

logger = logging.getLogger(__name__)

# Mode name -> (context is speech, ending is speech).
MODES = {"S->S": (True, True), "T->T": (False, False), "S->T": (True, False), "T->S": (False, True)}


_MODE_SPELLING = re.compile(r"([ST])(->|2)?([ST])")
"""A mode as "S->T", "ST" or "S2T" (upper-cased first): a side, an optional "->" or "2", a side."""


def parse_modes(text: str | Sequence[str]) -> list[str]:
    """Mode names from "S->S,T->T" or a list, each once, in the order first given. Spellings
    that need no shell quoting are accepted too, in any case: "ss,tt,st,ts" and
    "s2s,t2t,s2t,t2s"; nothing else ("tt2", "2tt", "s->2t" are refused)."""
    names = text.split(",") if isinstance(text, str) else list(text)
    modes = []
    for name in names:
        canonical = _canonical_mode(name)
        if canonical not in modes:  # "tt,T->T" scored every item twice
            modes.append(canonical)
    return modes


def _canonical_mode(name: str) -> str:
    """The arrow spelling ("S->T") of one mode in any accepted spelling; a ValueError naming the
    accepted spellings otherwise."""
    spelled = _MODE_SPELLING.fullmatch(name.strip().upper())
    if spelled is None:
        raise ValueError(f"unknown evaluation mode {name!r}; choose from {list(MODES)} "
                         f"(or, without shell quoting, ss, tt, st, ts or s2s, t2t, s2t, t2s)")
    return f"{spelled.group(1)}->{spelled.group(3)}"


def inference_patcher(config: PatchingConfig) -> Patcher:
    """The patcher a model is evaluated with: curriculum models end static, and mixed models are
    scored static too, so scoring needs no random draw; other modes are unchanged."""
    if config.mode in ("mixed", "curriculum"):
        config = dataclasses.replace(config, mode="static", aligned_until_step=None,
                                     static_from_step=None)
    return Patcher(config)


@dataclass(frozen=True)
class ScoredSequence:
    tokens: np.ndarray  # [L] int32 joint ids
    first_scored: int
    """Index of the first scored token (the ending's first token after its marker)."""
    patch_lengths: np.ndarray  # [P] int32, sums to L


def _speech_groups(utterance: Utterance) -> tuple[np.ndarray, np.ndarray]:
    """Units per word/silence `[G]` and which are silences `[G]`; one group when unaligned."""
    if utterance.segment_units is None:
        return np.array([len(utterance.units)]), np.zeros(1, bool)
    return utterance.segment_units, utterance.segment_is_silence


def build_sequence(item: EvalItem, ending: int, mode: str, vocab: JointVocab,
                   patcher: Patcher) -> ScoredSequence:
    """The scored sequence of one (item, ending) pair in `mode`, patched by `patcher` (one that
    needs no random draw: see `inference_patcher`)."""
    context_speech, ending_speech = MODES[mode]
    context, candidate = item.context, item.endings[ending]
    if patcher.rule(None, None) == "aligned":
        _check_segments(item, ending, mode)
    marker = {True: vocab.speech_marker, False: vocab.text_marker}
    parts = [[vocab.bos_id, marker[context_speech]]]
    parts.append(vocab.units_to_ids(context.units) if context_speech else context.text_ids)
    if context_speech != ending_speech:
        parts.append([item.space_id, marker[ending_speech]] if ending_speech
                     else [marker[ending_speech]])
    first_scored = sum(len(p) for p in parts)
    parts.append(vocab.units_to_ids(candidate.units) if ending_speech else candidate.text_ids)
    tokens = np.concatenate(parts).astype(np.int32)

    groups = [_speech_groups(part) for part, speech in ((context, context_speech),
                                                         (candidate, ending_speech)) if speech]
    doc = InterleavedDocument.from_tokens(
        tokens, vocab, np.concatenate([g for g, _ in groups] or [np.zeros(0, np.int64)]),
        np.concatenate([s for _, s in groups] or [np.zeros(0, bool)]))
    return ScoredSequence(tokens, first_scored, patcher.patch_lengths(doc))


def _check_segments(item: EvalItem, ending: int, mode: str) -> None:
    """Raise when a speech side of (item, ending) in `mode` has no segments (aligned patching
    needs them)."""
    context_speech, ending_speech = MODES[mode]
    for name, part, speech in (("context", item.context, context_speech),
                               (f"ending {ending}", item.endings[ending], ending_speech)):
        if speech and part.segment_units is None:
            raise ItemError(f"{item.describe()}, {name}: aligned patching needs \"segments\" "
                            f"(the units of each word) to score it {mode}; add them or evaluate "
                            f"with static patching")


def collate(sequences: Sequence[ScoredSequence], multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Rows x = seq[:-1], labels = seq[1:], as the trainer batches them.

    Returns tokens / labels `[B, N]` int64 (right-padded with 0), score_mask `[B, N]` bool (labels
    that are scored ending tokens) and patch_lengths `[B, P]` int32 (the padding joins each row's
    last patch; zero-length patches pad P). N and P are rounded up to `multiple_of` (the tensor-
    parallel size under sequence parallelism).
    """
    num_tokens = _round_up(max(len(s.tokens) for s in sequences) - 1, multiple_of)
    num_patches = _round_up(max(len(s.patch_lengths) for s in sequences), multiple_of)
    batch = len(sequences)
    tokens = np.zeros((batch, num_tokens), np.int64)
    labels = np.zeros((batch, num_tokens), np.int64)
    score_mask = np.zeros((batch, num_tokens), bool)
    patch_lengths = np.zeros((batch, num_patches), np.int32)
    for row, seq in enumerate(sequences):
        n = len(seq.tokens) - 1
        tokens[row, :n] = seq.tokens[:-1]
        labels[row, :n] = seq.tokens[1:]
        score_mask[row, seq.first_scored - 1:n] = True
        lengths = seq.patch_lengths.copy()
        lengths[-1] += num_tokens - n
        patch_lengths[row, :len(lengths)] = lengths
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "score_mask": torch.from_numpy(score_mask),
            "patch_lengths": torch.from_numpy(patch_lengths)}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)


def _is_lst(model: torch.nn.Module) -> bool:
    """Whether an unwrapped model is LST (global positions are patches) rather than the token
    baseline (global positions are tokens)."""
    from megatron_lst.models.lst_model import LSTModel

    return isinstance(model, LSTModel)


def _global_positions(chunk: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Sequence length of the global model (the pipeline's p2p shape): patches for LST, tokens
    for the token baseline."""
    return batch["patch_lengths" if _is_lst(_unwrap(chunk)) else "tokens"].shape[1]


def ending_logprobs(model_chunks: Sequence[torch.nn.Module],
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[B]` float64 sums of the scored tokens' log-probs, on every rank (collective).

    The batch is one micro-batch, except under virtual pipeline stages: megatron's interleaved
    schedule runs micro-batches in groups of `microbatch_group_size_per_vp_stage` (at least the
    pipeline size), so the rows are split into that many micro-batches (`split_microbatches`)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model_chunks[0].parameters()).device
    rows = batch["tokens"].shape[0]
    num_microbatches = (_unwrap(model_chunks[0]).config.microbatch_group_size_per_vp_stage
                        if len(model_chunks) > 1 else 1)
    microbatches = split_microbatches({k: v.to(device) for k, v in batch.items()},
                                      num_microbatches)

    def forward_step(data_iterator, model):
        rows = next(data_iterator)
        per_token_loss = model(rows["tokens"], rows["patch_lengths"], labels=rows["labels"])

        def summed_logprob(loss):  # loss [b, N] fp32 cross entropy
            logprob = -(loss.double() * rows["score_mask"]).sum(dim=1)  # [b]
            return logprob.sum(), {"logprob": logprob}

        return per_token_loss, summed_logprob

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches) for _ in model_chunks] if len(model_chunks) > 1
            else iter(microbatches),
            model=list(model_chunks),
            num_microbatches=num_microbatches,
            seq_length=_global_positions(model_chunks[0], batch),
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage():
        logprob = torch.cat([output["logprob"] for output in outputs])[:rows]  # padding dropped
    else:
        logprob = torch.empty(rows, dtype=torch.float64, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(logprob, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return logprob.cpu()


def split_microbatches(batch: dict[str, torch.Tensor], num_microbatches: int
                       ) -> list[dict[str, torch.Tensor]]:
    """`batch` (`[B, ...]` tensors) as `num_microbatches` micro-batches of `ceil(B / num)` rows in
    order; the last rows are padded with copies of the first row (a valid sequence: the schedule
    needs equal shapes), whose scores the caller drops."""
    rows = batch["tokens"].shape[0]
    size = _round_up(rows, num_microbatches) // num_microbatches
    padding = size * num_microbatches - rows
    padded = {k: torch.cat([v, v[:1].expand(padding, *v.shape[1:])]) for k, v in batch.items()}
    return [{k: v[i * size:(i + 1) * size] for k, v in padded.items()}
            for i in range(num_microbatches)]


@dataclass(frozen=True)
class ModeScores:
    """Scores of every ending of every item in one mode, flat in item order."""

    mode: str
    logprob: np.ndarray  # [R] float64 summed log-prob of each (item, ending)
    num_tokens: np.ndarray  # [R] int64 scored tokens
    item_offsets: np.ndarray  # [I + 1] rows of item i: item_offsets[i] .. item_offsets[i + 1]
    labels: np.ndarray  # [I]
    truncated: np.ndarray  # [I] bool: a context cut to fit the model's (fit_to_context)
    beyond_context: np.ndarray  # [I] bool: scored past the model's context (fit_to_context)

    @property
    def normalised(self) -> np.ndarray:
        return self.logprob / self.num_tokens

    def correct(self, normalised: bool = False) -> np.ndarray:
        """[I] bool: the highest-scoring ending is the label (ties go to the first ending)."""
        scores = self.normalised if normalised else self.logprob
        best = [int(np.argmax(scores[a:b])) for a, b in
                zip(self.item_offsets[:-1], self.item_offsets[1:], strict=True)]
        return np.asarray(best) == self.labels


def check_items_for_mode(items: Sequence[EvalItem], mode: str,
                         patching: PatchingConfig | None = None) -> None:
    """Raise naming the first item `mode` cannot score: a text-only one when the mode puts speech
    on either side; with the model's `patching`, one without segments when the model is
    evaluated with aligned patching (`inference_patcher`)."""
    if any(MODES[mode]):
        check_items_for_speech(items, mode)
    if patching is not None and inference_patcher(patching).rule(None, None) == "aligned":
        for item in items:
            for ending in range(len(item.endings)):
                _check_segments(item, ending, mode)


def fit_to_context(model_chunk: torch.nn.Module, items: Sequence[EvalItem],
                   sequences: list[list[ScoredSequence]], mode: str, truncate: bool
                   ) -> tuple[list[list[ScoredSequence]], np.ndarray, np.ndarray]:
    """`(sequences, truncated [I] bool, beyond_context [I] bool)` for the model's context of
    `max_sequence_length` global positions (--max-position-embeddings; patches for LST, input
    tokens for the token baseline).

    With `truncate`, an ending's sequence that needs more positions has its context cut from the
    left until it fits (`cut_context`), as lm-eval-harness truncates; `truncated` marks the items
    so cut. An item that still needs more (every item, without `truncate`) is scored past the
    context the model was built for (RoPE has no cap): `beyond_context` marks it, and a warning
    names the first and says how many there are.
    """
    model = _unwrap(model_chunk)
    context = model.lst_config.max_sequence_length
    truncated = np.zeros(len(items), bool)
    if truncate:
        fitted = []
        for i, endings in enumerate(sequences):
            cut = [cut_context(s, context, model) or s for s in endings]
            truncated[i] = any(c is not s for c, s in zip(cut, endings, strict=True))
            fitted.append(cut)
        sequences = fitted
    needed = np.array([max(_sequence_positions(model, s) for s in endings) for endings in sequences])
    beyond = needed > context
    if beyond.any():
        first = int(np.argmax(beyond))
        logger.warning(
            "%s: %d of %d items need more global positions than the model's context of %d "
            "(--max-position-embeddings)%s, the first, %s, needs %d; they are scored past the "
            "context the model was built for (counted in num_items_beyond_context): shorten them "
            "or leave them out", mode, int(beyond.sum()), len(items), context,
            " even with their context cut" if truncate else "", items[first].describe(),
            int(needed[first]))
    return sequences, truncated, beyond


def cut_context(sequence: ScoredSequence, context: int, model: torch.nn.Module
                ) -> ScoredSequence | None:
    """`sequence` (when it needs more than `context` global positions of `model`) with the fewest
    leading tokens dropped that make it fit, or None when even its ending does not fit.

    The cut falls before a whole patch, and the token just before it stays as a patch of its own:
    the layout every training row starts with (a head of one token, then whole patches:
    `megatron_lst.data.dataset`). Every scored token, and the token before the first of them,
    stays.
    """
    if _sequence_positions(model, sequence) <= context:
        return sequence
    lst = _is_lst(model)
    starts = np.cumsum(sequence.patch_lengths) - sequence.patch_lengths  # [P] first token of each
    for patch in range(1, len(sequence.patch_lengths)):
        start = int(starts[patch])
        if start > sequence.first_scored:
            break
        if start == 0:  # after empty leading patches: no token before the cut to keep
            continue
        # Positions of the cut sequence: the head patch and patches `patch..`, or its input tokens.
        positions = 1 + len(sequence.patch_lengths) - patch if lst else len(sequence.tokens) - start
        if positions <= context:
            lengths = np.concatenate([[1], sequence.patch_lengths[patch:]]).astype(np.int32)
            return ScoredSequence(sequence.tokens[start - 1:], sequence.first_scored - (start - 1),
                                  lengths)
    return None


def _sequence_positions(model: torch.nn.Module, sequence: ScoredSequence) -> int:
    """Global positions of one sequence's forward: its patches for LST (the one holding the last
    label included), its input tokens for the token baseline."""
    return len(sequence.patch_lengths) if _is_lst(model) else len(sequence.tokens) - 1


def score_items(model_chunks: Sequence[torch.nn.Module], items: Sequence[EvalItem],
                vocab: JointVocab, patcher: Patcher, mode: str, batch_size: int,
                truncate_context: bool = False) -> ModeScores:
    """Score every ending of `items` in `mode` (collective over the model's ranks); with
    `truncate_context`, contexts longer than the model's are cut from the left (`fit_to_context`)."""
    from megatron.core import parallel_state

    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {list(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 item, got {batch_size}")
    check_items_for_mode(items, mode, patcher.config)
    patcher = inference_patcher(patcher.config)
    sequences = [[build_sequence(item, e, mode, vocab, patcher) for e in range(len(item.endings))]
                 for item in items]
    sequences, truncated, beyond_context = fit_to_context(model_chunks[0], items, sequences, mode,
                                                          truncate_context)
    config = _unwrap(model_chunks[0]).config
    multiple_of = (parallel_state.get_tensor_model_parallel_world_size()
                   if config.sequence_parallel else 1)

    # Data-parallel replicas score contiguous shares of the items, then exchange the scores.
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    share = sequences[dp_rank * len(items) // dp_size:(dp_rank + 1) * len(items) // dp_size]
    logprobs, counts = [np.zeros(0)], [np.zeros(0, np.int64)]
    for start in range(0, len(share), batch_size):
        batch = collate([sequence for endings in share[start:start + batch_size]
                         for sequence in endings], multiple_of)
        logprobs.append(ending_logprobs(model_chunks, batch).numpy())
        counts.append(batch["score_mask"].sum(dim=1).numpy().astype(np.int64))
    scores = (np.concatenate(logprobs), np.concatenate(counts))
    if dp_size > 1:
        shares = [None] * dp_size
        torch.distributed.all_gather_object(shares, scores,
                                            group=parallel_state.get_data_parallel_group())
        scores = tuple(np.concatenate(parts) for parts in zip(*shares, strict=True))
    offsets = np.concatenate([[0], np.cumsum([len(item.endings) for item in items])])
    _check_finite(scores[0], offsets, items, mode)
    return ModeScores(mode, scores[0], scores[1], offsets,
                      np.array([item.label for item in items]), truncated, beyond_context)


def _check_finite(logprob: np.ndarray, item_offsets: np.ndarray, items: Sequence[EvalItem],
                  mode: str) -> None:
    """Raise when a log-probability `[R]` is NaN or infinite: argmax took a NaN for the best
    ending, so a model with broken weights scored as if it guessed."""
    bad = np.flatnonzero(~np.isfinite(logprob))
    if bad.size:
        item = int(np.searchsorted(item_offsets, bad[0], side="right")) - 1
        raise ValueError(f"{mode}: the model gives {bad.size} of {len(logprob)} endings a "
                         f"log-probability that is not a number (the first: "
                         f"{items[item].describe()}, ending {bad[0] - item_offsets[item]}); its "
                         f"weights hold NaN or inf (a diverged run?): evaluate another checkpoint")


def evaluate_items(model_chunks: Sequence[torch.nn.Module], items: Sequence[EvalItem],
                   vocab: JointVocab, patcher_for_eval: Patcher, modes: Sequence[str],
                   batch_size: int, bootstrap_resamples: int = 1000,
                   seed: int = 0, truncate_context: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy per mode with 95% bootstrap intervals: the trainer's periodic-evaluation hook.

    Collective: call on every rank of the model. The model chunks are put in eval mode and their
    previous mode restored. Returns, per mode,
    `{"accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_normalised",
      "accuracy_normalised_ci_low", "accuracy_normalised_ci_high", "num_items",
      "num_items_truncated", "num_items_beyond_context"}` (see `fit_to_context`).
    """
    was_training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        results = {}
        for mode in modes:
            scores = score_items(model_chunks, items, vocab, patcher_for_eval, mode, batch_size,
                                 truncate_context)
            results[mode] = summarise(scores, bootstrap_resamples, seed)
        return results
    finally:
        for chunk, training in zip(model_chunks, was_training, strict=True):
            chunk.train(training)


def summarise(scores: ModeScores, bootstrap_resamples: int = 1000,
              seed: int = 0) -> dict[str, float | int]:
    """Accuracies (summed and per-token-normalised scores) with 95% bootstrap intervals, and the
    item counts (ints)."""
    summary: dict[str, float | int] = {"num_items": len(scores.labels),
                                       "num_items_truncated": int(scores.truncated.sum()),
                                       "num_items_beyond_context": int(scores.beyond_context.sum())}
    for suffix, normalised in (("", False), ("_normalised", True)):
        correct = scores.correct(normalised)
        low, high = bootstrap_ci(correct, bootstrap_resamples, 0.95, seed)
        summary[f"accuracy{suffix}"] = float(correct.mean())
        summary[f"accuracy{suffix}_ci_low"] = low
        summary[f"accuracy{suffix}_ci_high"] = high
    return summary


def flatten_results(results: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """`{"eval/T->T/accuracy": ...}`: the per-mode results as scalars for a training log."""
    return {f"{prefix}/{mode}/{key}": value for mode, summary in results.items()
            for key, value in summary.items()}
