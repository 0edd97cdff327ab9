"""Reducing the models' per-token cross entropy `[B, N]` with the batch's `loss_mask [B, N]`.

- `masked_token_mean`: the reference trainer's loss, `sum(ce * mask) / (sum(mask) + 1e-6)` over
  one batch. Use it to compare with the reference.
- `masked_token_sum`: for Megatron training, `(sum(ce * mask), sum(mask))` per micro-batch. With
  `calculate_per_token_loss=True`, megatron's schedule adds both over micro-batches, and
  `finalize_model_grads` divides the gradients by the token count summed over micro-batches and
  data-parallel ranks, so every real token of the global batch weighs the same whatever its
  micro-batch or rank: the global loss is `sum over the global batch of ce * mask / sum of mask`.
"""

from __future__ import annotations

import torch


def masked_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Scalar: the reference's masked mean (`+ 1e-6` keeps an all-padding batch finite)."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / (mask.sum() + 1e-6)


def masked_token_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss sum, token count)`, both fp32 scalars, for per-token reduction across micro-batches."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum(), mask.sum()
