"""Stopping a run whose weights went wrong, with the checkpoint to go back to.

Three signs, each checked once per iteration on every rank alike (the loss, the gradient norm
and the skip decision are the same everywhere):
- a NaN or infinite training loss (`check_loss_finite`);
- a NaN or infinite gradient norm under a finite loss, outside fp16 (`check_grad_norm_finite`):
  the update has just put it into the weights, which the loss would show only an iteration later
  (and blame on that iteration's batch); fp16's scaler skips such an update instead;
- fp16 gradients that overflow update after update with the loss scale at its lowest
  (`SkippedUpdates`): the scaler backs off no further there, so every update would be skipped to
  --train-iters while the loss stays finite.
Each raises a `NonFiniteLossError` (exit 5 from `lst-train`) that says what to change and which
checkpoint holds weights from before it went wrong (`checkpoint_advice.describe_good_checkpoint`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_lst.training import checkpoint_advice

# How many updates in a row fp16 may skip with its loss scale at the lowest before the run stops,
# beyond the --hysteresis overflows in a row that the scaler waits for before each back-off. At
# the lowest scale (--min-loss-scale, or a constant --loss-scale) it backs off no more: overflowing
# gradients are then skipped to --train-iters, the loss staying finite (no NaN stop), the whole
# allocation spent without an update. The margin lets a short burst of bad batches pass.
SKIPS_AT_LOWEST_SCALE_MARGIN = 10


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss."""


class NonFiniteGradientError(NonFiniteLossError):
    """A NaN or infinite gradient norm under a finite loss."""


class StuckLossScaleError(NonFiniteLossError):
    """fp16 skipped every update of many iterations in a row at its lowest loss scale."""


def check_loss_finite(losses: Mapping[str, float], iteration: int, fp16: bool = False,
                      clip_grad: float | None = None) -> None:
    """Raise NonFiniteLossError, saying what to try, if any loss is NaN or infinite. `fp16` and
    `clip_grad` (the run's flags; 0 turns clipping off) tailor the advice."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if not bad:
        return
    described = ", ".join(f"{name} = {value}" for name, value in bad.items())
    precision_hint = ("with --fp16, lower --initial-loss-scale or switch to --bf16"
                      if fp16 else "if the run uses reduced precision, try --bf16 or fp32")
    clip_hint = ("turn gradient clipping on (--clip-grad 1.0; it is off)" if clip_grad == 0
                 else "lower --clip-grad")
    raise NonFiniteLossError(
        f"iteration {iteration}: {described}. The run diverged or met bad data: lower --lr or "
        f"lengthen --lr-warmup-iters, {clip_hint}, check the batches of this iteration, "
        f"{precision_hint}; then resume from the last good checkpoint with --load (with "
        f"--override-opt_param-scheduler where you change --lr or the warm-up: the checkpoint "
        f"continues its own learning-rate schedule otherwise)"
    )


def check_grad_norm_finite(grad_norm: float | None, loss: float, iteration: int) -> None:
    """Raise NonFiniteGradientError if `grad_norm` (None: not measured, as for an update fp16
    skipped; megatron.core measures it with --clip-grad 0 too) is NaN or infinite while `loss`
    was finite."""
    if grad_norm is None or math.isfinite(grad_norm):
        return
    raise NonFiniteGradientError(
        f"iteration {iteration}: the gradient norm is {grad_norm} while the loss was finite "
        f"({loss:.6g}): a NaN or infinity arose in the backward pass on this iteration's batch, "
        f"and its update has put it into the weights (they are not saved). Check the batches of "
        f"this iteration, lower --lr or lengthen --lr-warmup-iters; if the run uses reduced "
        f"precision, try fp32 to find where it arises")


def good_checkpoint(args: argparse.Namespace, diverged_at: int,
                    passed_over_because: str | None = None) -> str:
    """`checkpoint_advice.describe_good_checkpoint` of the run of `args`, whose weights went
    wrong at iteration `diverged_at` (a non-finite loss, unless `passed_over_because` says
    otherwise)."""
    return checkpoint_advice.describe_good_checkpoint(
        args.save if args.save is not None else args.load,
        getattr(args, "resume_from", None), getattr(args, "finetune", False),
        nonfinite_loss_at=diverged_at, passed_over_because=passed_over_because)


@dataclass
class SkippedUpdates:
    """The updates fp16 skipped in a row (gradients that overflowed), the same on every rank."""

    lowest_scale: float | None
    """--min-loss-scale, or a constant --loss-scale; None without --fp16 (nothing is skipped)."""
    limit: int
    """Skips in a row at `lowest_scale` that stop the run."""
    first: int | None = None
    """The iteration of the first skip in a row; None after an update."""
    at_lowest: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SkippedUpdates:
        lowest = None
        if args.fp16:
            lowest = args.loss_scale if args.loss_scale is not None else args.min_loss_scale
        return cls(lowest, args.hysteresis + SKIPS_AT_LOWEST_SCALE_MARGIN)

    def stuck_since(self, iteration: int, skipped: bool, loss_scale: float | None) -> int | None:
        """Count iteration `iteration` (`skipped` its update, at `loss_scale`); the first
        iteration of the skips in a row once `limit` of them came at the lowest scale, else
        None."""
        if not skipped:
            self.first, self.at_lowest = None, 0
            return None
        if self.first is None:
            self.first = iteration
        if loss_scale is not None and loss_scale <= self.lowest_scale:
            self.at_lowest += 1
        return self.first if self.at_lowest >= self.limit else None

    def check(self, args: argparse.Namespace, iteration: int, skipped: bool,
              loss_scale: float | None, loss: float) -> None:
        """Count iteration `iteration` (`stuck_since`); raise StuckLossScaleError, naming the
        checkpoint to go back to, once fp16 skipped `limit` updates in a row at its lowest loss
        scale."""
        first = self.stuck_since(iteration, skipped, loss_scale)
        if first is None:
            return
        scale_flag = "--loss-scale" if args.loss_scale is not None else "--min-loss-scale"
        good = good_checkpoint(args, first, f"it holds the weights whose gradients overflowed "
                                            f"from iteration {first} on")
        raise StuckLossScaleError(
            f"iteration {iteration}: the gradients overflowed fp16 (NaN or infinity) in each of "
            f"the last {self.at_lowest} iterations with the loss scale at its lowest, "
            f"{self.lowest_scale:g} ({scale_flag}), so no update was made since iteration "
            f"{first} and none would be until --train-iters, though the loss is finite "
            f"({loss:.6g}). Train with --bf16 (fp32's range), or lower --lr, lengthen "
            f"--lr-warmup-iters or lower {scale_flag}. {good}")
