"""Tiny models and ragged batches for the model tests, built from the real patchers."""

from __future__ import annotations

import numpy as np
import torch
from patching.patching_cases import VOCAB, random_interleaved

from megatron_lst.models.config import LSTConfig, preset, with_windows
from megatron_lst.patching.patchers import (
    aligned_patch_lengths,
    static_patch_lengths,
    token_patch_lengths,
)

# Every patching rule the data pipeline has, as the model sees it: patch lengths.
PATCH_RULES = {
    "none": token_patch_lengths,
    "static": lambda doc: static_patch_lengths(doc, 4),
    "aligned": lambda doc: aligned_patch_lengths(doc, "separate"),
    "aligned_merged": lambda doc: aligned_patch_lengths(doc, "merged"),
}


def tiny_config(vocab_size: int = VOCAB.size, token_window: int = 8, patch_window: int = 3) -> LSTConfig:
    """The tiny preset with windows far below the sequence length, so both windows cut."""
    return with_windows(preset("tiny", vocab_size), token_window, patch_window)


def ragged_batch(rule: str, batch_size: int, seed: int, min_tokens: int = 24) -> dict[str, torch.Tensor]:
    """Random interleaved documents patched by `rule`, batched as the reference trainer does:
    x = doc[:-1], y = doc[1:], rows right-padded with id 0 (the padding joins the row's last
    patch) and patch_lengths right-padded with zero-length patches."""
    rng = np.random.default_rng(seed)
    docs = []
    while len(docs) < batch_size:
        doc = random_interleaved(rng, max_blocks=8)
        if len(doc) > min_tokens:
            docs.append(doc)
    num_tokens = max(len(d) for d in docs) - 1
    lengths = [PATCH_RULES[rule](d).astype(np.int64) for d in docs]
    num_patches = max(len(row) for row in lengths)
    tokens = torch.zeros(batch_size, num_tokens, dtype=torch.int64)
    labels = torch.zeros(batch_size, num_tokens, dtype=torch.int64)
    loss_mask = torch.zeros(batch_size, num_tokens)
    patch_lengths = torch.zeros(batch_size, num_patches, dtype=torch.int32)
    for b, (doc, lens) in enumerate(zip(docs, lengths, strict=True)):
        n = len(doc) - 1
        tokens[b, :n] = torch.from_numpy(doc.tokens[:-1].astype(np.int64))
        labels[b, :n] = torch.from_numpy(doc.tokens[1:].astype(np.int64))
        loss_mask[b, :n] = 1.0
        lens = lens.copy()
        lens[-1] += num_tokens - n  # padding joins the last patch: sum == N + 1
        patch_lengths[b, : len(lens)] = torch.from_numpy(lens).int()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "patch_lengths": patch_lengths}
