"""Sliding-window causal attention on CPU: token i attends i-W+1 .. i, no [N, N] or [N, W+C] work.

Queries are cut into chunks of C < W tokens. Chunk `[s, e)` sees two key blocks:
- its own tokens `[s, e)`, all within the window: plain causal attention, which PyTorch's CPU
  flash kernel runs skipping the key blocks above the diagonal (about C/2 keys per query);
- the earlier tokens `[max(0, s-W+1), s)`: query s+r sees key j of that block iff
  `j >= r + L - W + 1` (L = the block's length), a triangle masked only where it matters.
The two partial softmaxes are merged with their log-sum-exps, and the backward runs the kernel's
backward on each block with the merged output and log-sum-exp, which gives each block's exact
share of the gradient. So a query costs about W + C/2 scores (W + 64 at C = 128) where one masked
block of W + C keys per chunk costs W + C, and no key is copied: blocks are views of k and v.
The ops are PyTorch's own (`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward,
what `F.scaled_dot_product_attention` runs on CPU); tests compare the result with a dense
reference and with gradcheck in float64. Grouped-query attention: k and v may have G heads for
q's H (G dividing H, query head h reading key/value head `h // (H / G)`); a kernel with GQA
(pytorch#157893, 2025; torch 2.13 has it) takes them as they are (no key or value copied) and
gives their gradients with G heads. An older one, which setup.py's torch floor admits, reads
key/value head j for query head j, unchecked, past k and v: there
(`flash_kernel_reads_grouped_heads`, probed once) k and v are repeated to H heads first.

Packed documents (`key_start`): query i sees keys `[key_start[i], i]`, key_start being the window
start cut at the query's document start (`lst_kernels.sliding_window_key_starts`). A chunk whose
queries are not cut keeps the path above; in one that is, the two blocks get per-row masks
`[B, 1, C, C]` and `[B, 1, C, L]` built from key_start (each chunk's own, never `[N, N]`), and the
earlier block is shortened to the keys the chunk's first query can see (skipped when none can):
short documents cost fewer scores, not more.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Queries per chunk (capped at W - 1 so every query of a chunk sees a key of the earlier block).
# Shorter chunks compute fewer masked scores (W + C/2 per query) but feed the kernel smaller
# blocks; 128 measured fastest for W = 512 on a 2-core CPU.
QUERY_CHUNK = 128

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def sliding_window_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                                 key_start: torch.Tensor | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """q `[B, N, H, d]`, k and v `[B, N, G, d]` (G divides H) CPU tensors (fp32/fp64/bf16/fp16)
    -> `[B, N, H, d]`, scale 1/sqrt(d) unless given.

    key_start `[B, N]` int (optional): the first key of every query, non-decreasing in the query
    and within `[i - W + 1, i]` (packed documents); None: `max(i - W + 1, 0)`.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
    if window == 1:  # each token sees only itself: softmax over one key
        return v.repeat_interleave(heads // kv_heads, dim=2)  # [B, N, H, d], a new tensor
    if kv_heads != heads and not flash_kernel_reads_grouped_heads():
        # The kernel would read key/value head j for query head j: one head per query head.
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))  # [B, N, H, d]
    if key_start is not None:
        key_start = key_start.long().cpu()
    out = _SlidingWindowAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        window, min(QUERY_CHUNK, window - 1), key_start,
                                        q.shape[-1] ** -0.5 if scale is None else scale)
    return out.transpose(1, 2)  # [B, N, H, d]


@functools.cache
def flash_kernel_reads_grouped_heads() -> bool:
    """Whether PyTorch's CPU flash kernel takes k and v with fewer heads than q (query head h
    reading key/value head `h // (H / G)`; pytorch#157893). One call on a key/value head
    whose memory continues with a NaN head: a kernel without GQA reads that for query head 1
    (no check tells, and its backward would write there); one that refuses the shapes lacks
    GQA too."""
    head_dim, on_cpu = 8, {"device": "cpu", "dtype": torch.float32}
    q = torch.ones(1, 2, 1, head_dim, **on_cpu)  # [B, H = 2, N, d]
    buffer = torch.full((1, 2, 1, head_dim), float("nan"), **on_cpu)
    buffer[:, 0] = 1.0
    one_head = buffer[:, :1]  # [B, G = 1, N, d], followed in memory by the NaN head
    try:
        out, _ = _flash_forward(q, one_head, one_head, 0.0, False, scale=1.0)
    except RuntimeError:
        return False
    return bool(out.isfinite().all())


@dataclass
class _Chunk:
    """Query chunk `[s, e)` with earlier keys `[p0, s)` (none when p0 == s) and its masks."""

    s: int
    e: int
    p0: int
    own_mask: torch.Tensor | None = None  # [B, 1, c, c] additive; None: plain causal
    early_mask: torch.Tensor | None = None  # [B or 1, 1, c, s - p0] additive; None: all visible
    early_empty: torch.Tensor | None = None  # [B, 1, c] bool: rows that see no earlier key


def _chunks(num_tokens: int, window: int, chunk: int, key_start: torch.Tensor | None,
            dtype: torch.dtype):
    """The query chunks of a row and their masks (see the module docstring)."""
    # [B, N]: the query's first key is the window's, max(i - W + 1, 0) (None: no documents)
    uncut = (None if key_start is None
             else key_start == (torch.arange(num_tokens) - window + 1).clamp(min=0))
    for s in range(0, num_tokens, chunk):
        e = min(s + chunk, num_tokens)
        p0 = max(0, s - window + 1)
        if uncut is None or bool(uncut[:, s:e].all()):  # no cut query: the window alone
            yield _Chunk(s, e, p0, early_mask=_earlier_block_mask(e - s, s - p0, window, dtype))
            continue
        starts = key_start[:, s:e]  # [B, c]
        queries = torch.arange(s, e)  # [c]
        p0 = min(max(p0, int(starts[:, 0].min())), s)
        own_keys = queries[None, None, :]  # [1, 1, c]
        own_hidden = (own_keys < starts[..., None]) | (own_keys > queries[None, :, None])
        own_mask = _additive(own_hidden, dtype) if bool(own_hidden.any()) else None
        early_mask = early_empty = None
        if p0 < s:
            early_keys = torch.arange(p0, s)[None, None, :]  # [1, 1, s - p0]
            early_hidden = early_keys < starts[..., None]  # [B, c, s - p0]
            early_mask = _additive(early_hidden, dtype)
            early_empty = (starts >= s)[:, None]  # [B, 1, c]
        yield _Chunk(s, e, p0, own_mask, early_mask, early_empty)


def _additive(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool `[B, rows, keys]` (True: hidden) -> additive mask `[B, 1, rows, keys]` (0 or -inf)."""
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))[:, None]


@functools.lru_cache(maxsize=64)
def _earlier_block_mask(rows: int, length: int, window: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask `[1, 1, rows, length]` for the earlier block of a chunk, None if all visible.

    Query row r (position s + r) sees key column j (position s - length + j) iff
    `r - j + length < W`, i.e. `j >= r + length - W + 1`. One tensor per shape and dtype,
    shared by every call: the kernels only read it."""
    first_visible = torch.arange(rows)[:, None] + (length - window + 1)  # [rows, 1]
    if int(first_visible.max()) <= 0:
        return None
    hidden = torch.arange(length)[None, :] < first_visible  # [rows, length]
    mask = torch.zeros(rows, length, dtype=dtype).masked_fill_(hidden, float("-inf"))
    return mask[None, None]


class _SlidingWindowAttention(torch.autograd.Function):
    """q `[B, H, N, d]`, k and v `[B, G, N, d]` -> `[B, H, N, d]`; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, window, chunk, key_start, scale):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
        # Built once per call: the backward reads the same chunks and masks.
        chunks = list(_chunks(q.shape[2], window, chunk, key_start, q.dtype))
        for c in chunks:
            s, e, p0 = c.s, c.e, c.p0
            chunk_out, chunk_lse = _flash_forward(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, c.own_mask is None,
                attn_mask=c.own_mask, scale=scale,
            )  # [B, H, c, d], [B, H, c]
            if p0 < s:
                early_out, early_lse = _flash_forward(
                    q[:, :, s:e], k[:, :, p0:s], v[:, :, p0:s], 0.0, False,
                    attn_mask=c.early_mask, scale=scale,
                )
                if c.early_empty is not None:  # the kernel gives such rows out 0 but lse 0
                    early_lse = early_lse.masked_fill(c.early_empty, float("-inf"))
                merged_lse = torch.logaddexp(chunk_lse, early_lse)
                chunk_out = (chunk_out * (chunk_lse - merged_lse).exp().unsqueeze(-1)
                             + early_out * (early_lse - merged_lse).exp().unsqueeze(-1))
                chunk_lse = merged_lse
            out[:, :, s:e] = chunk_out
            lse[:, :, s:e] = chunk_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunks, ctx.scale = chunks, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        for c in ctx.chunks:
            s, e, p0 = c.s, c.e, c.p0
            rows = (grad_out[:, :, s:e], q[:, :, s:e])
            saved = (out[:, :, s:e], lse[:, :, s:e])
            chunk_grad_q, chunk_grad_k, chunk_grad_v = _flash_backward(
                *rows, k[:, :, s:e], v[:, :, s:e], *saved, 0.0, c.own_mask is None,
                attn_mask=c.own_mask, scale=ctx.scale,
            )
            grad_q[:, :, s:e] = chunk_grad_q
            grad_k[:, :, s:e] += chunk_grad_k
            grad_v[:, :, s:e] += chunk_grad_v
            if p0 < s:
                early_grad_q, early_grad_k, early_grad_v = _flash_backward(
                    *rows, k[:, :, p0:s], v[:, :, p0:s], *saved, 0.0, False,
                    attn_mask=c.early_mask, scale=ctx.scale,
                )
                grad_q[:, :, s:e] += early_grad_q
                grad_k[:, :, p0:s] += early_grad_k
                grad_v[:, :, p0:s] += early_grad_v
        return grad_q, grad_k, grad_v, None, None, None, None
