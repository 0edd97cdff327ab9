"""The document rule of packed rows as dense masks, written from the rule, not from the code
under test (the oracle of the kernel and model document tests):

- a position's document: the number of EOS tokens before it (positions 0..N, N the last target);
- patch q (tokens `[c[q], c[q+1])`) belongs to the document of its first position;
- local self-attention: token i sees j with `0 <= i - j < W` in its own document;
- encoder pooling: the slots of patch q see the tokens of patches `q - W + 1 .. q` of q's document;
- decoder: token t sees the slots of the last W patches that end at or before t, of t's document;
- global: patch q sees patches r <= q of its document.
"""

import math

import torch


def documents(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, N + 1] document of every position: EOS tokens before it."""
    return torch.cat([torch.zeros_like(tokens[:, :1]), (tokens == eos_id).long().cumsum(1)], 1)


def _patch_facts(tokens, patch_lengths, eos_id):
    """(patch of every position [B, N + 1], patch document [B, P], patch last position [B, P])."""
    batch, num_tokens = tokens.shape
    doc = documents(tokens, eos_id)
    patch_of = torch.full((batch, num_tokens + 1), -1, dtype=torch.long)
    patch_doc = torch.zeros(patch_lengths.shape, dtype=torch.long)
    patch_last = torch.zeros(patch_lengths.shape, dtype=torch.long)
    for b in range(batch):
        start = 0
        for q, length in enumerate(patch_lengths[b].tolist()):
            patch_of[b, start:start + length] = q
            patch_doc[b, q] = doc[b, min(start, num_tokens)]
            patch_last[b, q] = start + length - 1
            start += length
    return patch_of, patch_doc, patch_last


def self_attention_mask(tokens, eos_id, window):
    """[B, N, N] token i sees token j."""
    n = tokens.shape[1]
    doc = documents(tokens, eos_id)[:, :n]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (i - j >= 0) & (i - j < window) & (doc[:, :, None] == doc[:, None, :])


def encoder_mask(tokens, eos_id, patch_lengths, window, slots):
    """[B, P * k, N] slot s (patch s // k) sees token j."""
    n = tokens.shape[1]
    patch_of, patch_doc, _ = _patch_facts(tokens, patch_lengths, eos_id)
    doc = documents(tokens, eos_id)[:, :n]
    q = torch.arange(patch_lengths.shape[1])[None, :, None]  # [1, P, 1]
    of = patch_of[:, None, :n]  # [B, 1, N]
    visible = (of <= q) & (of >= q - window + 1) & (doc[:, None, :] == patch_doc[:, :, None])
    return visible.repeat_interleave(slots, dim=1)


def decoder_mask(tokens, eos_id, patch_lengths, window, slots):
    """[B, N, P * k] token t sees slot s (patch s // k)."""
    n = tokens.shape[1]
    _, patch_doc, patch_last = _patch_facts(tokens, patch_lengths, eos_id)
    doc = documents(tokens, eos_id)[:, :n]
    t = torch.arange(n)[None, :, None]  # [1, N, 1]
    ended = patch_last[:, None, :] <= t  # [B, N, P]: patch q ends at or before t
    last_ended = torch.where(ended, torch.arange(patch_lengths.shape[1]), -1).max(-1, keepdim=True).values
    q = torch.arange(patch_lengths.shape[1])[None, None, :]
    visible = ended & (q >= last_ended - window + 1) & (patch_doc[:, None, :] == doc[:, :, None])
    return visible.repeat_interleave(slots, dim=2)


def global_mask(tokens, eos_id, patch_lengths):
    """[B, P, P] patch q sees patch r."""
    _, patch_doc, _ = _patch_facts(tokens, patch_lengths, eos_id)
    p = patch_lengths.shape[1]
    causal = torch.arange(p)[None, :] <= torch.arange(p)[:, None]
    return causal & (patch_doc[:, :, None] == patch_doc[:, None, :])


def dense_attention(q, k, v, visible):
    """q [B, Sq, H, d], k/v [B, Sk, H, d], visible [B, Sq, Sk] -> [B, Sq, H, d]; rows that see
    nothing give 0."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute)).to(q.dtype)
