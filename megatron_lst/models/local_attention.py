"""Sliding-window causal self-attention for the local models: token i attends i-W+1 .. i.

Backends:
- "flash": flash-attn's windowed kernel (`window_size=(W-1, 0)`), CUDA with fp16/bf16 only.
- "sdpa": PyTorch scaled-dot-product attention. Sequences no longer than the window use the plain
  causal kernel. Longer ones, on CPU: `sliding_window_cpu` (per query chunk, a causal block and a
  masked earlier block merged by log-sum-exp, about W + 64 scores per query). Elsewhere
  (`chunked_sliding_window_sdpa`): query chunks of C = min(W, 256) tokens; chunk b attends the
  W + C keys `[bC - W, (b+1)C)` under one additive mask `[B*chunks, 1, C, W+C]` cached per
  (B, N, W, dtype, device). Work and memory are O(N * W) either way, never O(N^2).
"auto" picks flash when it is installed and the inputs are CUDA fp16/bf16, else sdpa; the choice
is logged once per distinct outcome.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from .sliding_window_cpu import sliding_window_attention_cpu

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "sdpa")


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _log_choice(backend: str, reason: str) -> None:
    logger.info("local sliding-window attention backend: %s (%s)", backend, reason)


def resolve_local_attention_backend(requested: str, q: torch.Tensor) -> str:
    """"flash" or "sdpa" for inputs like `q`; raise when an explicit choice cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"local attention backend {requested!r} is not one of {BACKENDS}")
    flash_ok = flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "local attention backend 'flash' needs flash-attn installed and CUDA fp16/bf16 inputs "
            f"(got device {q.device}, dtype {q.dtype}); use 'auto' or 'sdpa'"
        )
    if requested == "auto":
        requested = "flash" if flash_ok else "sdpa"
        _log_choice(requested, "flash-attn windowed kernel" if flash_ok else
                    f"PyTorch SDPA, device {q.device.type}, {q.dtype}")
    return requested


class SlidingWindowAttention(torch.nn.Module):
    """Core attention (no parameters): q, k, v `[B, N, H, d]` -> `[B, N, H, d]`, scale 1/sqrt(d)."""

    def __init__(self, window: int, backend: str = "auto"):
        super().__init__()
        if window < 1:
            raise ValueError(f"sliding window must be >= 1 token, got {window}")
        if backend not in BACKENDS:
            raise ValueError(f"local attention backend {backend!r} is not one of {BACKENDS}")
        self.window = window
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if resolve_local_attention_backend(self.backend, q) == "flash":
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True, window_size=(self.window - 1, 0))
        return sliding_window_sdpa(q, k, v, self.window)


# Query chunk length of `chunked_sliding_window_sdpa`. Shorter chunks waste fewer masked scores
# (W + C per query) but give the kernel smaller blocks; 256 measured fastest at W = 512 on CPU.
MAX_QUERY_CHUNK = 256


def sliding_window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """SDPA sliding-window causal attention on `[B, N, H, d]` (see module docstring)."""
    if q.shape[1] <= window:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # [B, H, N, d]
        return out.transpose(1, 2)
    if q.device.type == "cpu":
        return sliding_window_attention_cpu(q, k, v, window)
    return chunked_sliding_window_sdpa(q, k, v, window)


def chunked_sliding_window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                window: int) -> torch.Tensor:
    """Any device: query chunks against overlapping key blocks under one mask; `[B, N, H, d]`."""
    num_tokens = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    batch = q.shape[0]
    chunk = min(window, MAX_QUERY_CHUNK)
    num_chunks = -(-num_tokens // chunk)
    padded = num_chunks * chunk
    # Queries: chunks of C rows. Keys/values: W zero rows in front (masked), padded to W + nc*C,
    # then overlapping views of W + C rows with stride C: chunk b sees rows [bC - W, (b+1)C).
    # Chunks join the batch dimension: PyTorch's CPU flash kernel takes 4-D inputs only (5-D falls
    # back to the unfused math path, several times slower).
    q_chunks = F.pad(q, (0, 0, 0, padded - num_tokens)).unflatten(2, (num_chunks, chunk))
    q_chunks = q_chunks.transpose(1, 2).flatten(0, 1)  # [B*nc, H, C, d]
    k_chunks = _overlapping_chunks(k, window, chunk, padded).transpose(1, 2).flatten(0, 1)
    v_chunks = _overlapping_chunks(v, window, chunk, padded).transpose(1, 2).flatten(0, 1)
    mask = _chunk_mask(batch, num_chunks, chunk, window, q.dtype, q.device)  # [B*nc, 1, C, W+C]
    out = F.scaled_dot_product_attention(q_chunks, k_chunks, v_chunks, attn_mask=mask)
    out = out.unflatten(0, (batch, num_chunks)).transpose(1, 2).flatten(2, 3)  # [B, H, nc*C, d]
    return out[:, :, :num_tokens].transpose(1, 2)  # [B, N, H, d]


def _overlapping_chunks(x: torch.Tensor, window: int, chunk: int, padded: int) -> torch.Tensor:
    """`x [B, H, N, d]` -> `[B, H, nc, W+C, d]`, chunk b = rows `[bC - W, (b+1)C)` (zeros outside)."""
    num_tokens = x.shape[2]
    x = F.pad(x, (0, 0, window, padded - num_tokens))  # [B, H, W + padded, d]
    return x.unfold(2, window + chunk, chunk).transpose(-1, -2)  # [B, H, nc, W+C, d]


@functools.lru_cache(maxsize=8)
def _chunk_mask(batch: int, num_chunks: int, chunk: int, window: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """`[B*nc, 1, C, W+C]` additive mask (0 or -inf): query row r of chunk b (position bC + r)
    sees key column c (position bC - W + c) iff `0 <= query - key < W`, i.e. `r < c <= r + W`,
    and the key position is >= 0 (the W zero rows in front stay hidden)."""
    rows = torch.arange(chunk, device=device)[:, None]  # [C, 1]
    cols = torch.arange(window + chunk, device=device)[None, :]  # [1, W+C]
    band = (cols > rows) & (cols <= rows + window)  # [C, W+C]
    key_position = torch.arange(num_chunks, device=device)[:, None, None] * chunk - window + cols
    visible = band & (key_position >= 0)  # [nc, C, W+C]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return mask.repeat(batch, 1, 1).unsqueeze(1)  # row b*nc + i is chunk i of batch row b
