"""The batch contract between the data pipeline and the model (docs/architecture.md#the-batch-contract).

A batch is a dict of tensors, B rows of N input tokens and P global positions:

    tokens         [B, N] int64    x = row[:-1], right-padded with the pad id 0
    labels         [B, N] int64    row[1:], padded with 0
    loss_mask      [B, N] float32  1 on the trained targets, 0 on padding: pretraining trains
                                   all L_b real positions; a task row (`data.task_rows`) only
                                   its answer, so its prompt positions are 0 too
    modality       [B, N] int64    MODALITY_SPEECH for <s> and units, MODALITY_TEXT otherwise (and
                                   on padding)
    patch_lengths  [B, P] int32    patches of the row (x plus its last target), zero-padded right

Invariants (`check_batch` raises `BatchContractError` naming the first one broken):
- N >= 1; `sum(patch_lengths[b]) == N + 1`, `patch_lengths[b, 0] == 1`, lengths >= 0, no non-zero length
  after a zero one; the padding sits in the row's last non-zero patch (it never forms a patch);
- `loss_mask` is 0 after the row's last target, which carries loss (the row's real length L_b is
  one past its last 1; padding sits on the right only); padded tokens and labels are 0 and have
  text modality; `labels[b, i] == tokens[b, i + 1]` for i < L_b - 1;
- no patch mixes modalities; given the vocabulary also: ids are in the joint vocabulary, `modality`
  matches the ids, every text-modality token (BOS, EOS, `<t>`, pieces) is a patch of one real
  token, and every speech-mode marker `<s>` starts a patch (static patching puts the units after
  it in the same patch, as the reference does; aligned patching gives it a patch of its own);
- documents: a row may pack several documents, each ended by EOS, and the token after an EOS
  starts the next one (`lst_kernels.document_starts`). No patch spans two documents: every
  position after an EOS (the row's last target included) starts a patch. This follows from EOS
  being a text token, hence a patch of its own (checked above); the patchers also patch one
  whole document at a time.

Token -> patch ids come from `lst_kernels.ranges` (the same rule the model uses): encoder patch of
token i = the last patch whose start is <= i; decoder patch ids = that rule on `patch_lengths[:, 1:]`.
"""

from __future__ import annotations

import torch
from lst_kernels.ranges import patch_ids_from_lengths

from megatron_lst.tokenizer.vocab import MODALITY_SPEECH, MODALITY_TEXT, JointVocab

BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "modality": torch.int64,
    "patch_lengths": torch.int32,
}


class BatchContractError(ValueError):
    """A batch breaks the contract above."""


def patch_ids(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, N] int64 encoder patch id of every token."""
    return patch_ids_from_lengths(patch_lengths, num_tokens)


def decoder_patch_ids(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, N] int64 decoder patch id of every token: token i reads global patch j = this id."""
    return patch_ids_from_lengths(patch_lengths[:, 1:], num_tokens)


def _fail(what: str, rows: torch.Tensor) -> None:
    bad = torch.nonzero(rows).flatten()
    if len(bad):
        raise BatchContractError(f"{what} (rows {bad[:8].tolist()})")


def check_batch(batch: dict, vocab: JointVocab | None = None) -> None:
    """Raise `BatchContractError` if `batch` breaks the contract; pass `vocab` for the id checks."""
    missing = sorted(set(BATCH_DTYPES) - set(batch))
    if missing:
        raise BatchContractError(f"batch lacks {missing}; it has {sorted(batch)}")
    for key, dtype in BATCH_DTYPES.items():
        if batch[key].dtype != dtype:
            raise BatchContractError(f"{key} must be {dtype}, got {batch[key].dtype}")
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    modality, lengths = batch["modality"], batch["patch_lengths"]
    if tokens.dim() != 2 or lengths.dim() != 2:
        raise BatchContractError(f"tokens must be [B, N] and patch_lengths [B, P], got "
                                 f"{tuple(tokens.shape)} and {tuple(lengths.shape)}")
    B, N = tokens.shape
    for key in ("labels", "loss_mask", "modality"):
        if batch[key].shape != tokens.shape:
            raise BatchContractError(f"{key} has shape {tuple(batch[key].shape)}, tokens "
                                     f"{tuple(tokens.shape)}")
    if lengths.shape[0] != B:
        raise BatchContractError(f"patch_lengths has {lengths.shape[0]} rows, tokens {B}")
    if N == 0:
        raise BatchContractError("tokens has no positions (N = 0); a row needs at least one input "
                                 "token and its target")

    lengths64 = lengths.long()
    _fail("negative patch length", (lengths64 < 0).any(1))
    _fail(f"patch lengths must sum to N + 1 = {N + 1}", lengths64.sum(1) != N + 1)
    _fail("first patch must have length 1", lengths64[:, 0] != 1)
    nonzero = lengths64 > 0
    _fail("a non-zero patch length follows a zero one", (nonzero[:, 1:] & ~nonzero[:, :-1]).any(1))

    _fail("loss_mask must be 0 or 1", ((mask != 0) & (mask != 1)).any(1))
    trained = mask > 0  # [B, N]
    positions = torch.arange(N, device=mask.device)
    num_real = torch.where(trained, positions + 1, 0).amax(1)  # [B] L_b: one past the last target
    real = positions[None] < num_real[:, None]  # [B, N]
    padding = ~real
    _fail("padded tokens must be 0", (padding & (tokens != 0)).any(1))
    _fail("padded labels must be 0", (padding & (labels != 0)).any(1))
    _fail("padding must have text modality", (padding & (modality != MODALITY_TEXT)).any(1))
    _fail("modality must be text (0) or speech (1)",
          ((modality != MODALITY_TEXT) & (modality != MODALITY_SPEECH)).any(1))
    shifted_real = real[:, 1:]  # positions i with i + 1 < L_b
    _fail("labels must be the tokens shifted by one",
          (shifted_real & (labels[:, :-1] != tokens[:, 1:])).any(1))

    # The last non-zero patch must start at or before L_b (it holds the last target and padding).
    starts = lengths64.cumsum(1) - lengths64  # [B, P]
    last_patch = (nonzero.sum(1) - 1).clamp(min=0)[:, None]  # [B, 1]
    last_start = starts.gather(1, last_patch)[:, 0]
    _fail("padding forms a patch of its own (it must join the row's last patch)", last_start > num_real)

    ids = patch_ids(lengths, N)  # [B, N]
    same_patch = (ids[:, 1:] == ids[:, :-1]) & shifted_real
    _fail("a patch mixes text and speech", (same_patch & (modality[:, 1:] != modality[:, :-1])).any(1))

    if vocab is None:
        return
    real_ids = torch.where(real, tokens, torch.zeros_like(tokens))
    valid = (real_ids >= 0) & (real_ids < vocab.size) & \
        ~((real_ids >= vocab.text_size) & (real_ids < vocab.text_marker))
    _fail(f"token id outside the joint vocabulary of {vocab.size} or reserved", (real & ~valid).any(1))
    expected = vocab.is_patchable_static(real_ids).long()
    _fail("modality does not match the token ids", (real & (modality != expected)).any(1))
    # Real x tokens per patch, plus the row's last target, which sits in the last non-zero patch.
    real_per_patch = torch.zeros_like(lengths64)
    real_per_patch.scatter_add_(1, ids, real.long())
    real_per_patch.scatter_add_(1, last_patch, torch.ones_like(last_patch))
    own_patch_size = real_per_patch.gather(1, ids)  # [B, N]
    _fail("a text token is not a patch of its own",
          (real & (modality == MODALITY_TEXT) & (own_patch_size != 1)).any(1))
    # The row's last target (labels[L_b - 1]) is no input but sits in the last patch too (a text
    # target sharing it breaks the own-patch check above or this one).
    last_input = (num_real - 1).clamp(min=0)[:, None]  # [B, 1]
    final_modality = vocab.is_patchable_static(labels.gather(1, last_input)).long()  # [B, 1]
    shares_last_patch = ids.gather(1, last_input) == last_patch
    _fail("a patch mixes text and speech (at the row's last target)",
          (shares_last_patch & (modality.gather(1, last_input) != final_modality))[:, 0])
    starts_patch = torch.ones_like(real)
    starts_patch[:, 1:] = ids[:, 1:] != ids[:, :-1]
    _fail("a speech-mode marker does not start a patch",
          (real & (tokens == vocab.speech_marker) & ~starts_patch).any(1))
