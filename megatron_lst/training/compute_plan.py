"""Compute-controlled planning: how many steps LST and the token-level baseline train for, under
one control mode (`ControlMode`), from a budget (`Budget`) and the work of one step
(`StepShape`), with the closed-form FLOPs of `flops.py`. `tools/plan_compute.py` prints it."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from fractions import Fraction

from megatron_lst.training.flops import FlopBreakdown, ModelShape, estimate_flops

__all__ = [
    "ControlMode",
    "Budget",
    "StepShape",
    "ModelPlan",
    "ComputePlan",
    "plan",
]


class ControlMode(str, enum.Enum):
    """How LST and the baseline are made comparable.

    COMPUTE: the paper's compute control: equal steps of equal global positions (LST's positions
        are patches, the baseline's tokens), so the global models do equal work.
    FLOPS: equal total FLOPs, local modules and head included.
    DATA: equal raw tokens seen.
    """

    COMPUTE = "compute"
    FLOPS = "flops"
    DATA = "data"


@dataclass(frozen=True)
class Budget:
    """A training budget: total FLOPs, or steps of the `reference` model ("lst" or
    "baseline"). Under COMPUTE and DATA control the reference model spends a FLOP budget and the
    other follows it; under FLOPS control both spend it."""

    flops: float | None = None
    steps: int | None = None
    reference: str = "baseline"

    def __post_init__(self) -> None:
        if (self.flops is None) == (self.steps is None):
            raise ValueError(f"Budget: give exactly one of flops and steps, got {self}")
        if not 0 < (self.flops if self.flops is not None else self.steps) < math.inf:
            raise ValueError(f"Budget: the budget must be positive and finite, got {self}")
        if self.reference not in ("lst", "baseline"):
            raise ValueError(f"Budget.reference = {self.reference!r}; use 'lst' or 'baseline'")


@dataclass(frozen=True)
class StepShape:
    """The work of one step: `global_batch_size` rows of `seq_length` global positions; an LST
    row holds `tokens_per_patch` real input tokens per patch on average (input tokens N over
    patches P: the data a step consumes).

    `max_tokens` is the token positions of an LST row (`lst-train --max-tokens`): rows are padded
    to it and the model computes every position, so an LST step's FLOPs count `max_tokens` tokens
    per row, the same count the training log reports. None: rows hold exactly
    `seq_length * tokens_per_patch` positions (no padding).
    """

    seq_length: int
    global_batch_size: int
    tokens_per_patch: float
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.seq_length < 2 or self.global_batch_size < 1
                or not 1 <= self.tokens_per_patch < math.inf):
            raise ValueError(
                f"StepShape {self}: needs seq_length >= 2, global_batch_size >= 1 and a finite "
                "tokens_per_patch >= 1 (a patch holds at least one token)"
            )
        if self.max_tokens is None:
            return
        if self.max_tokens < self.seq_length:
            raise ValueError(
                f"max_tokens {self.max_tokens} is smaller than seq_length {self.seq_length}: an "
                "LST row of P patches needs at least P token positions (lst-train refuses it too)"
            )
        if self.tokens_per_patch * self.seq_length > self.max_tokens:
            raise ValueError(
                f"tokens_per_patch {self.tokens_per_patch:g} x seq_length {self.seq_length} = "
                f"{self.tokens_per_patch * self.seq_length:g} real tokens per row do not fit in "
                f"max_tokens {self.max_tokens} positions; a row holds at most "
                f"{self.max_tokens / self.seq_length:g} tokens per patch: lower tokens_per_patch "
                "or raise max_tokens"
            )

    def tokens_per_row(self, shape: ModelShape) -> float:
        """Real input tokens per row (the data a step consumes)."""
        return self.seq_length if shape.is_baseline else self.seq_length * self.tokens_per_patch

    def computed_tokens_per_row(self, shape: ModelShape) -> float:
        """Token positions the model computes per row, padding included."""
        if shape.is_baseline or self.max_tokens is None:
            return self.tokens_per_row(shape)
        return self.max_tokens

    def flops(self, shape: ModelShape) -> FlopBreakdown:
        """Training FLOPs of one step (closed-form estimate, `estimate_flops`) over the
        positions the model computes."""
        flops = estimate_flops(
            shape, self.computed_tokens_per_row(shape), self.seq_length, self.global_batch_size
        )
        if not math.isfinite(flops.total):
            raise ValueError(
                f"StepShape {self}: one step of this model would cost {flops.total} FLOPs (beyond "
                "float range); give a realistic seq_length, global_batch_size and tokens_per_patch"
            )
        return flops


@dataclass(frozen=True)
class ModelPlan:
    """One model's share of a plan."""

    steps: int
    tokens_per_step: float
    global_positions_per_step: int
    flops_per_step: FlopBreakdown

    @property
    def tokens(self) -> float:
        return self.steps * self.tokens_per_step

    @property
    def global_positions(self) -> int:
        return self.steps * self.global_positions_per_step

    @property
    def flops(self) -> FlopBreakdown:
        return self.flops_per_step.scaled(self.steps)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "global_positions": self.global_positions,
            "flops": self.flops.as_dict(),
            "flops_per_step": self.flops_per_step.as_dict(),
            "flops_per_global_position": self.flops_per_step.total / self.global_positions_per_step,
            "flops_per_token": self.flops_per_step.total / self.tokens_per_step,
        }


@dataclass(frozen=True)
class ComputePlan:
    control: ControlMode
    budget: Budget
    step: StepShape
    lst: ModelPlan
    baseline: ModelPlan

    def as_dict(self) -> dict:
        return {
            "control": self.control.value,
            "budget": dataclasses.asdict(self.budget),
            "step": dataclasses.asdict(self.step),
            "lst": self.lst.as_dict(),
            "baseline": self.baseline.as_dict(),
        }


def plan(budget: Budget, lst_shape: ModelShape, baseline_shape: ModelShape, mode: ControlMode | str,
         step: StepShape) -> ComputePlan:
    """Steps for LST and the baseline under one control mode.

    Steps are rounded down, so no model exceeds its budget; "equal" FLOPs or tokens are equal to
    within one step of the model that follows.
    """
    mode = ControlMode(mode)
    if lst_shape.is_baseline or not baseline_shape.is_baseline:
        raise ValueError("plan: pass the LST shape first, then the token baseline's")
    shapes = {"lst": lst_shape, "baseline": baseline_shape}
    flops_per_step = {name: step.flops(shape) for name, shape in shapes.items()}
    tokens_per_step = {
        name: step.tokens_per_row(shape) * step.global_batch_size for name, shape in shapes.items()
    }
    # Exact rational arithmetic, so that a model following itself gets exactly its own steps.
    per_step = {name: Fraction(flops.total) for name, flops in flops_per_step.items()}
    reference = budget.reference
    if budget.steps is not None:
        reference_steps, total_flops = budget.steps, budget.steps * per_step[reference]
    else:
        total_flops = Fraction(budget.flops)
        reference_steps = math.floor(total_flops / per_step[reference])
    reference_tokens = reference_steps * Fraction(tokens_per_step[reference])

    def steps_for(name: str) -> int:
        if mode is ControlMode.FLOPS:
            return math.floor(total_flops / per_step[name])
        if name == reference or mode is ControlMode.COMPUTE:
            return reference_steps
        return math.floor(reference_tokens / Fraction(tokens_per_step[name]))

    plans = {
        name: ModelPlan(
            steps=steps_for(name),
            tokens_per_step=tokens_per_step[name],
            global_positions_per_step=step.seq_length * step.global_batch_size,
            flops_per_step=flops_per_step[name],
        )
        for name in shapes
    }
    for name, model in sorted(plans.items(), key=lambda item: item[0] != reference):
        if model.steps < 1:
            raise ValueError(
                f"plan: the budget buys no training step of {name} under {mode.value} control "
                f"(one step costs {float(per_step[name]):.3e} FLOPs); raise the budget or make "
                f"the step smaller (--global-batch-size, --seq-length)")
    return ComputePlan(mode, budget, step, **plans)
