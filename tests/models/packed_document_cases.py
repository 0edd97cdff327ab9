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

from megatron_lst.data.interleave import InterleavedDocument

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
    return _batch(rows, row_lengths)


def _document(tokens, groups=None, silences=None) -> InterleavedDocument:
    """A hand-made document; `groups`/`silences`: its speech units' words (aligned patching)."""
    return InterleavedDocument.from_tokens(
        np.array(tokens, dtype=np.int32), VOCAB, None if groups is None else np.array(groups),
        None if silences is None else np.array(silences, dtype=bool))


def _units(count: int, seed: int) -> list[int]:
    return (VOCAB.unit_offset + (np.arange(count) * 7 + seed) % VOCAB.num_units).tolist()


def edge_documents() -> dict[str, InterleavedDocument]:
    """Documents at the edges of the rule: EOS alone (a document of one token), speech shorter
    than a static patch of 4 or ending mid-patch, silences next to BOS/<s> and EOS (merged
    silence patching), a long mixed one."""
    bos, eos, t, s = VOCAB.bos_id, EOS, VOCAB.text_marker, VOCAB.speech_marker
    return {
        "eos": _document([eos]),
        "text": _document([bos, t, 5, 6, 7, eos]),
        "short_speech": _document([bos, s, *_units(2, 0), eos]),
        "mid_patch": _document([bos, s, *_units(6, 1), eos]),
        "silence_edges": _document([bos, s, *_units(3, 5), *_units(2, 6), *_units(3, 7), eos],
                                   [3, 2, 3], [True, False, True]),
        "silences_only": _document([bos, s, *_units(4, 8), *_units(3, 9), eos], [4, 3],
                                   [True, True]),
        "long": _document([bos, s, *_units(5, 1), *_units(4, 2), *_units(6, 3), t, 11, 12, 3, s,
                           *_units(7, 5), eos], [5, 4, 6, 7], [False, True, False, True]),
    }


# Rows as (documents, first patch, end patch): the row is the last token of the stream's patch
# `first` (the dataset's head; None: the stream's start) and the whole patches after it, up to
# patch `end` of the stream (None: its end).
EDGE_ROWS = {
    "eos_first": (["eos", "long", "mid_patch"], None, None),
    "consecutive_eos": (["text", "eos", "eos", "eos", "short_speech", "eos"], None, None),
    "all_eos": (["eos"] * 12, None, None),
    "short_documents": (["short_speech", "mid_patch", "eos", "silence_edges", "silences_only"],
                        None, None),
    "no_final_eos": (["text", "long"], None, -2),
    "cut_start": (["long", "mid_patch", "text"], 3, None),
    "head_is_eos": (["text", "mid_patch", "silence_edges"], 5, None),
}


def edge_batch(rule: str, names=tuple(EDGE_ROWS), repeat: int = 1):
    """One row per name of `EDGE_ROWS` (each row's documents `repeat` times over), patched by
    `rule` ("mixed": static and aligned documents alternate); tokens, labels, patch lengths as
    `packed_batch`."""
    documents = edge_documents()
    rows, row_lengths = [], []
    for name in names:
        docs, first, end = EDGE_ROWS[name]
        docs = [documents[d] for d in docs * repeat]
        rules = [rule if rule != "mixed" else ("static", "aligned")[i % 2] for i in range(len(docs))]
        tokens = np.concatenate([d.tokens for d in docs]).astype(np.int64)
        lengths = np.concatenate([PATCH_RULES[r](d) for r, d in zip(rules, docs, strict=True)])
        start = 0 if first is None else int(lengths[:first + 1].sum()) - 1
        lengths = list(lengths[:end]) if first is None else [1, *lengths[first + 1:end]]
        rows.append(tokens[start:start + sum(lengths)])
        row_lengths.append(np.array(lengths))
    return _batch(rows, row_lengths)


def _batch(rows, row_lengths):
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


def _one_kv_head_per_query_head(q, k, v):
    """Key/value heads `[B, L, G, d]` repeated to q's H heads (head h reads head h // (H / G))."""
    repeat = q.shape[2] // k.shape[2]
    return k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)


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
                override(core, lambda q, kk, v, key_start=None, sequences=None, mask=mask: dense_attention(
                    q, *_one_kv_head_per_query_head(q, kk, v), mask))
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
