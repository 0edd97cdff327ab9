"""Layers of the local encoder and decoder: plain PyTorch, replicated on every tensor-parallel rank.

A `LocalTransformerLayer` is the reference block: pre-norm RMSNorm, sliding-window causal
self-attention with interleaved RoPE, SwiGLU MLP, no biases. Its attention and MLP are slots
filled from a `ModuleSpec` (see `specs.py`), as in megatron's `TransformerLayer`.
Activations are `[B, N, D]` (batch first: the local models never shard the sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lst_kernels import patch_cross_attention
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import LocalModelConfig
from .local_attention import SlidingWindowAttention, VarlenSequences
from .rope import apply_interleaved_rope


class SlidingKVCache:
    """Generation cache of one sliding-window layer: keys (RoPE applied) and values of the last
    `window - 1 + spare` tokens, each `[1, L, G, d]` (the layer's key/value heads): the next
    token's window, plus `spare` tokens that `drop_last` can take back.

    They live in a buffer with room for `kept + n` more tokens (n: the largest call so far),
    written in place; when the room runs out, the kept tokens move to the buffer's front. That
    copies at most `kept` tokens once every `kept` or more new ones, where growing the cache by
    concatenation copied them all at every step."""

    def __init__(self, window: int, spare: int = 0):
        self.window = window
        self.spare = spare
        self._keys: torch.Tensor | None = None  # [1, C, G, d]
        self._values: torch.Tensor | None = None  # [1, C, G, d]
        self._start = self._end = 0  # the cached tokens are buffer[:, start:end]

    @property
    def kept(self) -> int:
        """The most tokens the cache keeps: the next token's window and the spare ones."""
        return self.window - 1 + self.spare

    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys `[1, L, G, d]` (None before the first `extend`)."""
        return None if self._keys is None else self._keys[:, self._start:self._end]

    @property
    def values(self) -> torch.Tensor | None:
        """The cached values `[1, L, G, d]` (None before the first `extend`)."""
        return None if self._values is None else self._values[:, self._start:self._end]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' `k, v [1, n, G, d]`; returns all cached keys and values, the
        new ones last: views of the buffer, valid until the next call."""
        self._make_room(k, v)
        end = self._end + k.shape[1]
        self._keys[:, self._end:end] = k
        self._values[:, self._end:end] = v
        cached = self._keys[:, self._start:end], self._values[:, self._start:end]
        self._start, self._end = max(end - self.kept, self._start), end
        return cached

    def _make_room(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make room after the cached tokens for `k, v [1, n, G, d]`: move the cached tokens to
        the front of the buffer, or of a new one when the buffer holds fewer than `2 * kept + n`
        tokens (the least where the cached tokens, which start at or after `end - kept`, never
        overlap their new place when the room runs out)."""
        new = k.shape[1]
        if self._keys is not None and self._end + new <= self._keys.shape[1]:
            return
        keys, values = self._keys, self._values
        if keys is None or keys.shape[1] < 2 * self.kept + new:
            capacity = 2 * self.kept + new
            keys = k.new_empty(1, capacity, *k.shape[2:])
            values = v.new_empty(1, capacity, *v.shape[2:])
        count = self._end - self._start
        if count:
            keys[:, :count] = self.keys
            values[:, :count] = self.values
        self._keys, self._values, self._start, self._end = keys, values, 0, count

    def drop_last(self, count: int) -> None:
        """Forget the last `count` tokens (at most `spare`, so the window stays whole)."""
        if count > self.spare:
            raise ValueError(f"cannot take back {count} tokens; the cache keeps {self.spare} spare")
        self._end = max(self._end - count, self._start)


@dataclass
class LocalLayerSubmodules:
    self_attention: ModuleSpec | type
    mlp: ModuleSpec | type


class LocalSelfAttention(torch.nn.Module):
    """Sliding-window causal self-attention with `H` query heads and `G` key/value heads of size
    `d` (`G == H`: multi-head; `G < H`: grouped-query, query head h reads key/value head
    `h // (H / G)`, the reference's `repeat_kv` order); q, k, v from one fused projection.
    `attention_backend`: "auto" | "flash" | "sdpa" (`local_attention`); `kernel_backend`: that of
    the range attention, "auto" | "triton" | "torch" (`lst_kernels.backend`)."""

    def __init__(self, config: LocalModelConfig, attention_backend: str = "auto",
                 kernel_backend: str = "auto"):
        super().__init__()
        self.num_heads, self.num_groups, self.head_dim = config.num_heads, config.kv_groups, config.head_dim
        # Rows [q; k; v]: [H*d, D], [G*d, D], [G*d, D], heads contiguous within each.
        self.linear_qkv = torch.nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_groups) * self.head_dim, bias=False)
        self.linear_proj = torch.nn.Linear(self.num_heads * self.head_dim, config.hidden_size,
                                           bias=False)
        self.core_attention = SlidingWindowAttention(config.window, attention_backend,
                                                     kernel_backend)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x [B, N, D]` -> q `[B, N, H, d]`, k and v `[B, N, G, d]` (no RoPE yet)."""
        q, k, v = self.linear_qkv(x).split(
            [self.num_heads * self.head_dim, self.num_groups * self.head_dim,
             self.num_groups * self.head_dim], dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)),
                k.unflatten(-1, (self.num_groups, self.head_dim)),
                v.unflatten(-1, (self.num_groups, self.head_dim)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_start: torch.Tensor | None = None,
                sequences: Callable[[], VarlenSequences] | None = None) -> torch.Tensor:
        """`x [B, N, D]`, RoPE tables, and the first key of every query `[B, N]` for packed
        documents (None: the window alone) -> `[B, N, D]`. `sequences`: how the flash backend
        gets the documents (`RowDocuments.varlen_sequences`: once per batch for all layers)."""
        q, k, v = self._project(x)
        q = apply_interleaved_rope(q, *rope)
        k = apply_interleaved_rope(k, *rope)
        out = self.core_attention(q, k, v, key_start, sequences=sequences)  # [B, N, H, d]
        return self.linear_proj(out.flatten(-2))  # [B, N, D]

    def forward_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     cache: SlidingKVCache) -> torch.Tensor:
        """The next `n` tokens of a sequence whose earlier tokens are in `cache`: `x [1, n, D]`,
        `rope` the tables at their positions `[1, n, 1, d]` -> `[1, n, D]`; extends `cache`
        (which keeps the G key/value heads, not their expansion)."""
        q, k, v = self._project(x)
        q = apply_interleaved_rope(q, *rope)
        keys, values = cache.extend(apply_interleaved_rope(k, *rope), v)  # [1, L, G, d]
        window = self.core_attention.window
        place = torch.arange(keys.shape[1] - q.shape[1], keys.shape[1], device=x.device)  # [n]
        start = (place - window + 1).clamp(min=0)[None]  # [1, n]
        out = patch_cross_attention(q, keys, values, start, place[None] + 1,
                                    backend=self.core_attention.kernel_backend)  # [1, n, H, d]
        return self.linear_proj(out.flatten(-2))


class SwiGLUMLP(torch.nn.Module):
    """`fc2(silu(x W1) * (x W3))`; fc1 holds `[W1; W3]` (gate first), as megatron's linear_fc1."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.linear_fc2 = torch.nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class LocalTransformerLayer(torch.nn.Module):
    """`x += attn(norm(x)); x += mlp(norm(x))` on `[B, N, D]`."""

    def __init__(self, config: LocalModelConfig, submodules: LocalLayerSubmodules, norm_eps: float):
        super().__init__()
        self.input_norm = torch.nn.RMSNorm(config.hidden_size, eps=norm_eps)
        self.self_attention = build_module(submodules.self_attention, config)
        self.pre_mlp_norm = torch.nn.RMSNorm(config.hidden_size, eps=norm_eps)
        self.mlp = build_module(submodules.mlp, config.hidden_size, config.ffn_hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_start: torch.Tensor | None = None,
                sequences: Callable[[], VarlenSequences] | None = None) -> torch.Tensor:
        x = x + self.self_attention(self.input_norm(x), rope, key_start, sequences)
        return x + self.mlp(self.pre_mlp_norm(x))

    def forward_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     cache: SlidingKVCache) -> torch.Tensor:
        """`forward` for the next tokens `[1, n, D]` of a sequence cached in `cache`."""
        x = x + self.self_attention.forward_step(self.input_norm(x), rope, cache)
        return x + self.mlp(self.pre_mlp_norm(x))
