"""Packed rows of several documents and a dense-mask oracle of the document rule, for the model
tests. The oracle is written from the rule, not from the code under test:

- a position's document: the number of EOS tokens before it (position 0..N, N the last target);
- patch q (tokens `[c[q], c[q+1])`) belongs to the document of its first position;
- local self-attention: token i sees j with `0 <= i - j < W` in its own document;
- encoder pooling: the slots of patch q see the tokens of patches `q - W + 1 .. q` of q's document;
- decoder: token t sees the slots of the last W patches that end at or before t, of t's document;
- global: patch q sees patches r <= q of its document.
Every attention runs densely under these masks (a query that sees nothing outputs 0), replacing
the model's range attention by overriding the forward of the modules that hold it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from model_cases import PATCH_RULES
from patching.patching_cases import VOCAB, random_interleaved

EOS = VOCAB.eos_id


def packed_batch(rule: str, num_documents: list[int], seed: int, max_blocks: int = 4):
    """One row per entry of `num_documents`, packing that many random interleaved documents
    (each BOS .. EOS) patched by `rule` ("mixed": static or aligned per document), cut as the
    dataset cuts rows (x = row[:-1], labels = row[1:], padding joins the last patch)."""
    rng = np.random.default_rng(seed)
    rows, row_lengths = [], []
    for count in num_documents:
        docs = [random_interleaved(rng, max_blocks=max_blocks) for _ in range(count)]
        rules = [rule if rule != "mixed" else ("static", "aligned")[rng.integers(2)] for _ in docs]
        rows.append(np.concatenate([d.tokens for d in docs]).astype(np.int64))
        row_lengths.append(np.concatenate([PATCH_RULES[r](d) for r, d in zip(rules, docs, strict=True)]))
    num_tokens = max(len(r) for r in rows) - 1
    num_patches = max(len(r) for r in row_lengths)
    tokens = torch.zeros(len(rows), num_tokens, dtype=torch.int64)
    labels = torch.zeros_like(tokens)
    patch_lengths = torch.zeros(len(rows), num_patches, dtype=torch.int32)
    for b, (row, lengths) in enumerate(zip(rows, row_lengths, strict=True)):
        n = len(row) - 1
        tokens[b, :n] = torch.from_numpy(row[:-1])
        labels[b, :n] = torch.from_numpy(row[1:])
        lengths = lengths.astype(np.int64)
        lengths[-1] += num_tokens - n
        patch_lengths[b, :len(lengths)] = torch.from_numpy(lengths).int()
    return tokens, labels, patch_lengths


def _documents(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N + 1] document of every position: EOS tokens before it."""
    return torch.cat([torch.zeros_like(tokens[:, :1]), (tokens == EOS).long().cumsum(1)], 1)


def _patch_facts(tokens, patch_lengths):
    """(patch of every position [B, N + 1], patch document [B, P], patch last position [B, P])."""
    batch, num_tokens = tokens.shape
    doc = _documents(tokens)
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


def self_attention_mask(tokens, window):
    """[B, N, N] token i sees token j."""
    n = tokens.shape[1]
    doc = _documents(tokens)[:, :n]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (i - j >= 0) & (i - j < window) & (doc[:, :, None] == doc[:, None, :])


def encoder_mask(tokens, patch_lengths, window, slots):
    """[B, P * k, N] slot s (patch s // k) sees token j."""
    n = tokens.shape[1]
    patch_of, patch_doc, _ = _patch_facts(tokens, patch_lengths)
    doc = _documents(tokens)[:, :n]
    q = torch.arange(patch_lengths.shape[1])[None, :, None]  # [1, P, 1]
    of = patch_of[:, None, :n]  # [B, 1, N]
    visible = (of <= q) & (of >= q - window + 1) & (doc[:, None, :] == patch_doc[:, :, None])
    return visible.repeat_interleave(slots, dim=1)


def decoder_mask(tokens, patch_lengths, window, slots):
    """[B, N, P * k] token t sees slot s (patch s // k)."""
    n = tokens.shape[1]
    _, patch_doc, patch_last = _patch_facts(tokens, patch_lengths)
    doc = _documents(tokens)[:, :n]
    t = torch.arange(n)[None, :, None]  # [1, N, 1]
    ended = patch_last[:, None, :] <= t  # [B, N, P]: patch q ends at or before t
    last_ended = torch.where(ended, torch.arange(patch_lengths.shape[1]), -1).max(-1, keepdim=True).values
    q = torch.arange(patch_lengths.shape[1])[None, None, :]
    visible = ended & (q >= last_ended - window + 1) & (patch_doc[:, None, :] == doc[:, :, None])
    return visible.repeat_interleave(slots, dim=2)


def global_mask(tokens, patch_lengths):
    """[B, P, P] patch q sees patch r."""
    _, patch_doc, _ = _patch_facts(tokens, patch_lengths)
    p = patch_lengths.shape[1]
    causal = torch.arange(p)[None, :] <= torch.arange(p)[:, None]
    return causal & (patch_doc[:, :, None] == patch_doc[:, None, :])


def dense_attention(q, k, v, visible):
    """q [B, Sq, H, d], k/v [B, Sk, H, d], visible [B, Sq, Sk] -> [B, Sq, H, d]; rows that see
    nothing give 0."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


@contextlib.contextmanager
def dense_document_attention(model, tokens, patch_lengths):
    """Run every attention of `model` (an LSTModel or the token baseline) densely under the
    oracle's masks for this batch."""
    overridden = []

    def override(module, forward):
        module.forward = forward
        overridden.append(module)

    lst = hasattr(model, "token_encoder")
    if lst:
        config = model.lst_config
        k = config.cross_attention.slots_per_patch
        for stack in (model.token_encoder.layers, model.local_decoder.layers):
            for layer in stack:
                core = layer.self_attention.core_attention
                mask = self_attention_mask(tokens, core.window)
                override(core, lambda q, kk, v, key_start=None, mask=mask: dense_attention(q, kk, v, mask))
        for layers, mask in (
            (model.patch_encoder.cross_attn_layers,
             encoder_mask(tokens, patch_lengths, config.cross_attention.encoder_window, k)),
            (model.local_decoder.cross_attn_layers,
             decoder_mask(tokens, patch_lengths, config.cross_attention.decoder_window, k)),
        ):
            for cross in layers:
                def attend(queries, keys, key_start, key_end, cross=cross, mask=mask):
                    kk, v = cross.keys_values(keys)
                    q = cross.linear_q(cross.norm_q(queries)).unflatten(-1, (cross.num_heads, -1))
                    return cross.linear_proj(dense_attention(q, kk, v, mask).flatten(-2))
                override(cross, attend)
        block, mask = model.global_transformer.block, global_mask(tokens, patch_lengths)
    else:
        block = model.decoder
        mask = self_attention_mask(tokens, tokens.shape[1])
    for layer in block.layers:
        core = layer.self_attention.core_attention

        def global_forward(query, key, value, attention_mask, *args, mask=mask, **kwargs):
            repeat = query.shape[2] // key.shape[2]
            q, kk, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, S, heads, d]
            kk, v = kk.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)
            out = dense_attention(q, kk, v, mask)
            return out.transpose(0, 1).flatten(2)  # [S, B, H*d]
        override(core, global_forward)
    try:
        yield
    finally:
        for module in overridden:
            del module.forward
