"""Interleaved rotary position embedding (RoPE) tables for the local and global models.

The reference rotates interleaved pairs `(x[2i], x[2i+1])` by angle `pos * theta^(-2i/d)`, with the
inverse frequencies in fp32 and positions 0..S-1 per row. Megatron calls this layout
`rotary_interleaved=True`. `rotary_angles` returns the table in megatron's `[S, 1, 1, d]` format
(each frequency repeated for its pair), so the same table drives megatron's global attention
(`rotary_pos_emb=`) and the local layers (`apply_interleaved_rope`). It equals what megatron's
`RotaryEmbedding(rotary_interleaved=True)` produces (tested), without its CUDA-only placement.
"""

from __future__ import annotations

import torch


class RotaryTable:
    """RoPE tables of positions 0..S-1, one per device, computed at a length of at least S (the
    next power of two, grown when a longer one is asked for) and returned as slices of it. A
    position's entry does not depend on the table's length (tested bitwise), and one table per
    length grew memory with the square of the length in generation, which asks for one more
    position every step."""

    def __init__(self, head_dim: int, theta: float):
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        # per device: angles [L, 1, 1, d], cos and sin [1, L, 1, d]
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _table(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < seq_len:
            length = 1 << max(seq_len - 1, 0).bit_length()
            angles = rotary_angles(length, self.head_dim, self.theta, device)  # [L, 1, 1, d]
            rows = angles[:, 0].unsqueeze(0)  # [1, L, 1, d]
            table = self._tables[device] = (angles, rows.cos(), rows.sin())
        return table

    def angles(self, seq_len: int, device) -> torch.Tensor:
        """`[S, 1, 1, d]` fp32, megatron's `rotary_pos_emb` format."""
        return self._table(seq_len, device)[0][:seq_len]

    def cos_sin(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, each `[1, S, 1, d]` fp32, for `apply_interleaved_rope` on `[B, S, H, d]`."""
        _, cos, sin = self._table(seq_len, device)
        return cos[:, :seq_len], sin[:, :seq_len]

    def cos_sin_at(self, positions: torch.Tensor | None, seq_len: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos_sin` at per-row positions `[B, S]` (each `[B, S, 1, d]`; packed documents with
        reset positions), or the shared table of 0..S-1 when `positions` is None."""
        cos, sin = self.cos_sin(seq_len, device)  # [1, S, 1, d]
        if positions is None:
            return cos, sin
        return cos[0, positions], sin[0, positions]

    def angles_at(self, positions: torch.Tensor | None, seq_len: int, device) -> torch.Tensor:
        """`angles` at per-row positions `[B, S]` as `[S, B, 1, d]`, or `[S, 1, 1, d]` of 0..S-1
        when `positions` is None."""
        angles = self.angles(seq_len, device)  # [S, 1, 1, d]
        if positions is None:
            return angles
        return angles[positions.t(), 0]  # [S, B, 1, d]


def rotary_angles(seq_len: int, head_dim: int, theta: float, device) -> torch.Tensor:
    """Angles `[S, 1, 1, d]` (fp32): entry (s, 2i) and (s, 2i+1) are `s * theta^(-2i/d)`."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )  # [d/2]
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)  # [S]
    freqs = torch.outer(positions, inv_freq)  # [S, d/2]
    return freqs.repeat_interleave(2, dim=-1)[:, None, None, :]  # [S, 1, 1, d]


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, S, H, d]` by `RotaryTable.cos_sin` tables, pairs interleaved; fp32 math
    (one fp32 copy of a half-precision `x`, read twice)."""
    x32 = x.float()  # [B, S, H, d]
    pairs = x32.unflatten(-1, (-1, 2))  # [B, S, H, d/2, 2]
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # [B, S, H, d]
    return (x32 * cos + rotated * sin).to(x.dtype)
