"""A stand-in `flash_attn` package for CPU tests: flash-attn 2's two entry points with their
documented semantics and input checks, computed densely in float64 with PyTorch autograd.

Documented behaviour it follows (`flash_attn_interface.py` docstrings and the checks of its
`mha_fwd` / `mha_varlen_fwd`):
- q `[B, Sq, H, d]` (`flash_attn_func`) or `[total_q, H, d]` (`flash_attn_varlen_func`, sequences
  cut by `cu_seqlens_q`, `[batch + 1]` int32, contiguous, from 0 to total_q); k, v likewise with
  `Hk` heads, `H % Hk == 0`: query head h reads key/value head `h // (H / Hk)` (GQA/MQA);
- fp16 or bf16 only, q, k and v of one dtype, the last dimension contiguous, head dim <= 256;
- causal masks are aligned to the bottom-right corner (query i of Sq sees keys
  `<= i + Sk - Sq`); `window_size = (left, right)` limits query i to keys
  `[i + Sk - Sq - left, i + Sk - Sq + right]` (-1: unlimited; causal makes right 0);
- a query that sees no key outputs 0; `softmax_scale` defaults to `1 / sqrt(d)`;
- `max_seqlen_q/k` must be at least the longest sequence (the kernels size their grids by them).

`calls` records every call (entry point, keyword arguments, query and key/value head counts) for
the tests to inspect.
"""

from __future__ import annotations

import types

import torch

MAX_HEAD_DIM = 256
calls: list[tuple[str, dict]] = []


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    for tensor in (q, k, v):
        if tensor.dim() != dims:
            raise RuntimeError(f"expected {dims}-d q/k/v, got shape {tuple(tensor.shape)}")
        if tensor.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim or k.shape != v.shape:
        raise RuntimeError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q's head dim")
    if q.shape[-2] % k.shape[-2]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")


def _one_sequence(q, k, v, scale, causal, window_size):
    """q `[Sq, H, d]`, k/v `[Sk, Hk, d]` -> `[Sq, H, d]` float64, dense masked softmax."""
    num_q, num_k = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    left, right = window_size
    if causal:
        right = 0
    diagonal = torch.arange(num_q)[:, None] + (num_k - num_q)  # [Sq, 1]: key aligned with query
    keys = torch.arange(num_k)[None, :]  # [1, Sk]
    visible = torch.ones(num_q, num_k, dtype=torch.bool)
    if right >= 0:
        visible &= keys <= diagonal + right
    if left >= 0:
        visible &= keys >= diagonal - left
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # a row without keys: zeros
    return torch.einsum("hqk,khd->qhd", probs, v.double())


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    calls.append(("flash_attn_func", {"causal": causal, "window_size": window_size,
                                      "dropout_p": dropout_p, "softmax_scale": softmax_scale,
                                      "heads": (q.shape[-2], k.shape[-2])}))
    _check(q, k, v, dims=4)
    if k.shape[0] != q.shape[0]:
        raise RuntimeError("q and k must have the same batch size")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.stack([_one_sequence(q[b], k[b], v[b], scale, causal, window_size)
                       for b in range(q.shape[0])])
    return out.to(q.dtype)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen, name: str) -> list[int]:
    if cu_seqlens.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype int32")
    if cu_seqlens.dim() != 1 or not cu_seqlens.is_contiguous():
        raise RuntimeError(f"{name} must be a contiguous 1-d tensor")
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        raise RuntimeError(f"{name} {bounds} must rise from 0 to the {total} tokens")
    if not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise RuntimeError(f"max_seqlen {max_seqlen!r} must be an int >= the longest of {lengths}")
    return bounds


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    calls.append(("flash_attn_varlen_func", {
        "causal": causal, "window_size": window_size, "dropout_p": dropout_p,
        "softmax_scale": softmax_scale, "cu_seqlens_q": cu_seqlens_q.tolist(),
        "cu_seqlens_k": cu_seqlens_k.tolist(), "max_seqlen_q": max_seqlen_q,
        "max_seqlen_k": max_seqlen_k, "heads": (q.shape[-2], k.shape[-2])}))
    _check(q, k, v, dims=3)
    q_bounds = _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
    k_bounds = _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    if len(q_bounds) != len(k_bounds):
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have the same number of sequences")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    pieces = [_one_sequence(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, window_size)
              for q0, q1, k0, k1 in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:],
                                        strict=True)]
    return torch.cat(pieces).to(q.dtype)


def module() -> types.ModuleType:
    """A fresh `flash_attn` module object with the two functions (and an empty call log)."""
    calls.clear()
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = flash_attn_func
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    fake.__version__ = "2.7.0-fake"
    fake.calls = calls
    return fake

