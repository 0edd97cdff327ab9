"""Sliding-window causal self-attention for the local models: token i attends i-W+1 .. i.

Backends:
- "flash": flash-attn's windowed kernel (`window_size=(W-1, 0)`), CUDA with fp16/bf16 only.
- "sdpa": PyTorch scaled-dot-product attention. Sequences no longer than the window use the plain
  causal kernel. Longer ones are cut into query blocks of W tokens; block b attends the 2W keys
  `[(b-1)W, (b+1)W)` under one boolean mask `[B*blocks, 1, W, 2W]` cached per (B, N, W, device).
  Work and memory are O(N * W), never O(N^2).
"auto" picks flash when it is installed and the inputs are CUDA fp16/bf16, else sdpa; the choice
is logged once per distinct outcome.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

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


def sliding_window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """SDPA sliding-window causal attention on `[B, N, H, d]` (see module docstring)."""
    num_tokens = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    if num_tokens <= window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, N, d]
        return out.transpose(1, 2)

    batch = q.shape[0]
    num_blocks = -(-num_tokens // window)
    padded = num_blocks * window
    # Queries: blocks of W rows. Keys/values: W zero rows in front (masked), padded to (nb+1)W,
    # then overlapping views of 2W rows with stride W: block b sees rows [(b-1)W, (b+1)W). Blocks
    # join the batch dimension: PyTorch's CPU flash kernel takes 4-D inputs only (5-D falls back
    # to the unfused math path, several times slower).
    q_blocks = F.pad(q, (0, 0, 0, padded - num_tokens)).unflatten(2, (num_blocks, window))
    q_blocks = q_blocks.transpose(1, 2).flatten(0, 1)  # [B*nb, H, W, d]
    k_blocks = _overlapping_blocks(k, window, padded).transpose(1, 2).flatten(0, 1)  # [B*nb, H, 2W, d]
    v_blocks = _overlapping_blocks(v, window, padded).transpose(1, 2).flatten(0, 1)
    mask = _block_mask(batch, num_blocks, window, q.device)  # [B*nb, 1, W, 2W]
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask)
    out = out.unflatten(0, (batch, num_blocks)).transpose(1, 2).flatten(2, 3)  # [B, H, nb*W, d]
    return out[:, :, :num_tokens].transpose(1, 2)  # [B, N, H, d]


def _overlapping_blocks(x: torch.Tensor, window: int, padded: int) -> torch.Tensor:
    """`x [B, H, N, d]` -> `[B, H, nb, 2W, d]`, block b = rows `[(b-1)W, (b+1)W)` (zeros outside)."""
    num_tokens = x.shape[2]
    x = F.pad(x, (0, 0, window, padded - num_tokens))  # [B, H, W + padded, d]
    return x.unfold(2, 2 * window, window).transpose(-1, -2)  # [B, H, nb, 2W, d]


@functools.lru_cache(maxsize=32)
def _block_mask(batch: int, num_blocks: int, window: int, device: torch.device) -> torch.Tensor:
    """`[B*nb, 1, W, 2W]` bool: query row r of a block (position bW + r) sees key column c
    (position (b-1)W + c) iff `r < c <= r + W`, i.e. `0 <= query - key < W`; block 0's first W
    columns are the zero padding before position 0 and stay hidden."""
    rows = torch.arange(window, device=device)[:, None]  # [W, 1]
    cols = torch.arange(2 * window, device=device)[None, :]  # [1, 2W]
    band = (cols > rows) & (cols <= rows + window)  # [W, 2W]
    mask = band.expand(num_blocks, window, 2 * window).clone()
    mask[0, :, :window] = False
    return mask.repeat(batch, 1, 1).unsqueeze(1)  # row b*nb + i is block i of batch row b
