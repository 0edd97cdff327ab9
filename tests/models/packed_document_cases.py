"""Packed rows of several documents, and the model run densely under the document rule's masks
(`patching.document_rule`): every attention runs dense (a query that sees nothing outputs 0),
replacing the model's range attention by overriding the forward of the modules that hold it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from model_cases import PATCH_RULES
from patching.document_rule import (
    decoder_mask,
    dense_attention,
    encoder_mask,
    global_mask,
    self_attention_mask,
)
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
                mask = self_attention_mask(tokens, EOS, core.window)
                override(core, lambda q, kk, v, key_start=None, mask=mask: dense_attention(q, kk, v, mask))
        for layers, mask in (
            (model.patch_encoder.cross_attn_layers,
             encoder_mask(tokens, EOS, patch_lengths, config.cross_attention.encoder_window, k)),
            (model.local_decoder.cross_attn_layers,
             decoder_mask(tokens, EOS, patch_lengths, config.cross_attention.decoder_window, k)),
        ):
            for cross in layers:
                def attend(queries, keys, key_start, key_end, cross=cross, mask=mask):
                    kk, v = cross.keys_values(keys)
                    q = cross.linear_q(cross.norm_q(queries)).unflatten(-1, (cross.num_heads, -1))
                    return cross.linear_proj(dense_attention(q, kk, v, mask).flatten(-2))
                override(cross, attend)
        block, mask = model.global_transformer.block, global_mask(tokens, EOS, patch_lengths)
    else:
        block = model.decoder
        mask = self_attention_mask(tokens, EOS, tokens.shape[1])
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
