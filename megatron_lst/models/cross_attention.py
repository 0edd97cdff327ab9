"""Cross-attention between patch slots and tokens, over one contiguous key range per query.

Used both ways (docs/architecture.md#attention-ranges): in the encoder, patch slots query the tokens of their last W
patches; in the decoder, tokens query the slots of their last W visible global patches. The key
ranges come from `lst_kernels.encoder_key_ranges` / `decoder_key_ranges` and the attention itself
is `lst_kernels.patch_cross_attention`, so no `[queries, keys]` mask is ever built.
"""

from __future__ import annotations

import torch
from lst_kernels import patch_cross_attention


class PatchCrossAttention(torch.nn.Module):
    """RMSNorm on queries and on keys/values, multi-head attention without RoPE, output projection.

    Returns the update only (`Wo(attn)`, `[B, Sq, D]`); the caller owns the residual.
    """

    def __init__(self, hidden_size: int, num_heads: int, norm_eps: float, kernel_backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.kernel_backend = kernel_backend
        self.norm_q = torch.nn.RMSNorm(hidden_size, eps=norm_eps)
        self.norm_kv = torch.nn.RMSNorm(hidden_size, eps=norm_eps)
        self.linear_q = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.linear_kv = torch.nn.Linear(hidden_size, 2 * hidden_size, bias=False)  # rows [k; v]
        self.linear_proj = torch.nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self,
        queries: torch.Tensor,  # [B, Sq, D]
        keys: torch.Tensor,  # [B, Sk, D]
        key_start: torch.Tensor,  # [B, Sq] int
        key_end: torch.Tensor,  # [B, Sq] int
    ) -> torch.Tensor:
        return self.attend(queries, *self.keys_values(keys), key_start, key_end)

    def keys_values(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`keys [B, Sk, D]` -> attention keys and values, each `[B, Sk, H, d]` (generation
        caches them per patch)."""
        k, v = self.linear_kv(self.norm_kv(keys)).unflatten(-1, (2, self.num_heads, -1)).unbind(2)
        return k, v

    def attend(self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_start: torch.Tensor, key_end: torch.Tensor) -> torch.Tensor:
        """`queries [B, Sq, D]` over `keys_values` output -> the update `[B, Sq, D]`."""
        q = self.linear_q(self.norm_q(queries)).unflatten(-1, (self.num_heads, -1))  # [B, Sq, H, d]
        out = patch_cross_attention(q, k, v, key_start, key_end, backend=self.kernel_backend)
        return self.linear_proj(out.flatten(-2))  # [B, Sq, D]


def add_cross_attention_update(x: torch.Tensor, update: torch.Tensor, double_residual: bool) -> torch.Tensor:
    """The residual step after a cross-attention.

    The reference's `CrossAttention.forward` already returns `x + Wo(attn)` and both its local
    encoder (`patch_embeds + patch_embeds_cross`) and decoder (`h + h_cross`) add `x` once more, so
    its update is `2 * x + Wo(attn)`. `double_residual=True` reproduces that (needed to import its
    checkpoints); False gives the standard `x + Wo(attn)`.
    """
    return (2 * x if double_residual else x) + update
