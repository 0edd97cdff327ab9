"""Patching modes, including the ones that pick a rule per document (docs/data.md#patching-modes).

- `none`: every token its own patch; `--seq-length` then counts tokens.
- `static`: `static_patch_lengths` with `patch_size`.
- `aligned`: `aligned_patch_lengths` with `silence`.
- `mixed`: per document, static with probability `prob_static`, else aligned; at inference
  (step None: validation rows too) always static.
- `curriculum`: per document, aligned with probability
      1                                  for step <= aligned_until_step   (tau1)
      (tau2 - step) / (tau2 - tau1)      for tau1 < step < tau2
      0                                  for step >= static_from_step     (tau2), step > tau1
  else static; at inference (step None) always static. The reference's schedule (its
  `patcher_curr_align_steps` / `patcher_curr_mixed_steps`: aligned through step tau1, also
  when tau1 == tau2).

Steps count the optimizer steps done before a row's iteration, as the reference's `curr_step`
(its train state's step, 0 on the first): the first iteration, which the training loop logs as
iteration 1, is step 0, and iteration i is step i - 1. So iteration tau1 + 1 is the last one
patched aligned throughout and iteration `first_static_step` + 1 the first patched statically
throughout.

The random choice uses the generator the caller passes, drawn from (seed, epoch, document), so it
is deterministic; the step comes from the sample's place in the training order (the dataset
derives it), so it needs no state from the training loop and survives a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.patching.patchers import (
    SILENCE_MODES,
    PatchingError,
    aligned_patch_lengths,
    static_patch_lengths,
    token_patch_lengths,
)

PATCHING_MODES = ("none", "static", "aligned", "mixed", "curriculum")


@dataclass(frozen=True)
class PatchingConfig:
    mode: str = "static"
    patch_size: int = 4
    """p of static patching (units per patch)."""
    silence: str = "separate"
    """Aligned patching: silences as their own patches ("separate") or joined to a word ("merged")."""
    prob_static: float = 0.5
    """Mixed mode: probability that a document is patched statically."""
    aligned_until_step: int | None = None
    """Curriculum tau1: aligned up to and including this step."""
    static_from_step: int | None = None
    """Curriculum tau2: static only from this step on (after tau1 when the two are equal)."""

    @property
    def first_static_step(self) -> int | None:
        """Curriculum: the first step at which every document is static (tau2, or tau1 + 1 when
        tau1 == tau2, as step tau1 is still aligned); None for the other modes."""
        if self.mode != "curriculum":
            return None
        tau1, tau2 = self.aligned_until_step, self.static_from_step
        return tau1 + 1 if tau1 == tau2 else tau2

    def __post_init__(self):
        if self.mode not in PATCHING_MODES:
            raise PatchingError(f"patching mode must be one of {PATCHING_MODES}, got {self.mode!r}")
        if self.patch_size < 1:
            raise PatchingError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.silence not in SILENCE_MODES:
            raise PatchingError(f"silence must be one of {SILENCE_MODES}, got {self.silence!r}")
        if not 0.0 <= self.prob_static <= 1.0:
            raise PatchingError(f"prob_static must be in [0, 1], got {self.prob_static}")
        if self.mode == "curriculum":
            tau1, tau2 = self.aligned_until_step, self.static_from_step
            if tau1 is None or tau2 is None or not 0 <= tau1 <= tau2:
                raise PatchingError(
                    f"curriculum patching needs 0 <= aligned_until_step <= static_from_step, got "
                    f"{tau1} and {tau2}; set both (the steps where the mix starts and ends)")


class Patcher:
    """Patch lengths for one document under a `PatchingConfig`."""

    def __init__(self, config: PatchingConfig):
        self.config = config

    @property
    def needs_rng(self) -> bool:
        return self.config.mode in ("mixed", "curriculum")

    def probability_aligned(self, step: int | None) -> float:
        """P(aligned) for a document of a sample at training step `step` (None: inference)."""
        c = self.config
        if c.mode in ("none", "static"):
            return 0.0
        if c.mode == "aligned":
            return 1.0
        if step is None:  # mixed and curriculum models are static at inference
            return 0.0
        if c.mode == "mixed":
            return 1.0 - c.prob_static
        tau1, tau2 = c.aligned_until_step, c.static_from_step
        if step <= tau1:
            return 1.0
        if step >= tau2:
            return 0.0
        return (tau2 - step) / (tau2 - tau1)

    @property
    def candidate_rules(self) -> tuple[str, ...]:
        """The rules a document can get: one for fixed modes, static or aligned for the others."""
        mode = self.config.mode
        return (mode,) if mode in ("none", "static", "aligned") else ("static", "aligned")

    def rules_at_steps(self, steps: range | None) -> tuple[str, ...]:
        """The rules a document patched at one of `steps` can get (None: at inference, the
        validation rows' step None), in `candidate_rules` order. P(aligned) does not rise with
        the step, so aligned is possible when it is above 0 at the first step and static when it
        is below 1 at the last."""
        if steps is not None and not len(steps):
            return ()
        first, last = (None, None) if steps is None else (steps[0], steps[-1])
        possible = {"aligned": self.probability_aligned(first) > 0.0,
                    "static": self.probability_aligned(last) < 1.0}
        return tuple(rule for rule in self.candidate_rules if possible.get(rule, True))

    def rule_for_draw(self, draw: float | None, step: int | None) -> str:
        """The rule of a document whose generator's first `random()` gave `draw` (None for the
        fixed modes, which draw nothing)."""
        mode = self.config.mode
        if mode in ("none", "static", "aligned"):
            return mode
        if draw is None:
            raise PatchingError(f"{mode} patching draws a rule per document: pass a generator")
        return "aligned" if draw < self.probability_aligned(step) else "static"

    def rule(self, rng: np.random.Generator | None, step: int | None) -> str:
        """The fixed rule for one document: "none", "static" or "aligned"."""
        draw = rng.random() if self.needs_rng and rng is not None else None
        return self.rule_for_draw(draw, step)

    def lengths_for_rule(self, doc: InterleavedDocument, rule: str) -> np.ndarray:
        """[P] int32 lengths of `doc` under one rule ("none", "static" or "aligned")."""
        if rule == "none":
            return token_patch_lengths(doc)
        if rule == "static":
            return static_patch_lengths(doc, self.config.patch_size)
        return aligned_patch_lengths(doc, self.config.silence)

    def patch_lengths(self, doc: InterleavedDocument, rng: np.random.Generator | None = None,
                      step: int | None = None) -> np.ndarray:
        """[P] int32 lengths summing to len(doc)."""
        return self.lengths_for_rule(doc, self.rule(rng, step))
