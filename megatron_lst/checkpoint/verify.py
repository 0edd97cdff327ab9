"""Self-check of a conversion: the same fixed batch through the model before and after.

Both models are TP=1/PP=1 `LSTModel`s in one process (`model_state.build_full_model`); a
conversion from or to a sharded checkpoint loads it into such a model (dist checkpointing
reshards on load), so the check covers what was written, whatever its layout.
"""

from __future__ import annotations

from typing import TextIO

import torch

from megatron_lst.models.config import LSTConfig

# fp32 forward of the same weights through the same code: any difference is a conversion bug,
# not rounding (the reference fixture reproduces to ~1e-6).
DEFAULT_TOLERANCE = 1e-5


class VerificationError(RuntimeError):
    """The converted model computes another function than the original."""


def fixed_batch(config: LSTConfig, batch_size: int = 2, num_tokens: int = 48,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch under the trainer's contract: tokens `[B, N]` drawn from the whole
    vocabulary, patch_lengths `[B, P]` with a first patch of 1, patches of 1..6 tokens,
    `sum == N + 1`, and zero-length patches padding the shorter rows."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, num_tokens), generator=generator)
    rows = []
    for _ in range(batch_size):
        lengths, remaining = [1], num_tokens
        while remaining:
            length = min(remaining, int(torch.randint(1, 7, (1,), generator=generator)))
            lengths.append(length)
            remaining -= length
        rows.append(lengths)
    patch_lengths = torch.zeros(batch_size, max(map(len, rows)), dtype=torch.int32)
    for b, lengths in enumerate(rows):
        patch_lengths[b, : len(lengths)] = torch.tensor(lengths, dtype=torch.int32)
    return {"tokens": tokens, "patch_lengths": patch_lengths}


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits `[B, N, V]` of a TP=1/PP=1 model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(batch["tokens"], batch["patch_lengths"]).float()
    finally:
        model.train(was_training)


def verify_same_function(before, after, what: str, tolerance: float = DEFAULT_TOLERANCE,
                         stream: TextIO | None = None) -> float:
    """Max |logits(before) - logits(after)| on `fixed_batch`; printed to `stream`, and a
    `VerificationError` when above `tolerance`."""
    batch = fixed_batch(before.lst_config)
    expected, actual = logits(before, batch), logits(after, batch)
    difference = (expected - actual).abs().max().item()
    if stream is not None:
        print(f"verify {what}: max |logits before - after| = {difference:.3e} "
              f"(tolerance {tolerance:.0e}, batch {tuple(batch['tokens'].shape)})", file=stream)
    if not difference <= tolerance:
        raise VerificationError(
            f"{what}: the converted model's logits differ by {difference:.3e} (> {tolerance:.0e}) "
            "from the original's on a fixed batch; the conversion is wrong")
    return difference
