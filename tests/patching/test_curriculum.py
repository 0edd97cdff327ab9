"""Patching modes: the per-document rule of mixed and curriculum patching."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from patching_cases import random_interleaved

from megatron_lst.patching.curriculum import Patcher, PatchingConfig
from megatron_lst.patching.patchers import (
    PatchingError,
    aligned_patch_lengths,
    static_patch_lengths,
)


def curriculum(tau1=100, tau2=300):
    return Patcher(PatchingConfig(mode="curriculum", aligned_until_step=tau1,
                                  static_from_step=tau2))


def test_curriculum_probability_at_the_boundaries():
    p = curriculum(100, 300)
    assert p.probability_aligned(0) == 1.0
    assert p.probability_aligned(99) == 1.0
    assert p.probability_aligned(100) == 1.0
    assert p.probability_aligned(200) == pytest.approx(0.5)
    assert p.probability_aligned(299) == pytest.approx(1 / 200)
    assert p.probability_aligned(300) == 0.0
    assert p.probability_aligned(10**9) == 0.0
    assert p.probability_aligned(None) == 0.0  # inference: static
    # tau1 == tau2: a hard switch, no division by zero; aligned through step tau1, as the
    # reference's get_curr_type (step <= patcher_curr_align_steps) and as when tau1 < tau2
    # (step 50 was static).
    hard = curriculum(50, 50)
    assert [hard.probability_aligned(s) for s in (49, 50, 51)] == [1.0, 1.0, 0.0]


def test_rules_of_each_mode():
    assert Patcher(PatchingConfig(mode="static")).rule(None, 5) == "static"
    assert Patcher(PatchingConfig(mode="aligned")).rule(None, 5) == "aligned"
    assert Patcher(PatchingConfig(mode="none")).rule(None, None) == "none"
    p = curriculum(10, 20)
    rng = np.random.default_rng(0)
    assert {p.rule(rng, 5) for _ in range(50)} == {"aligned"}
    assert {p.rule(rng, 20) for _ in range(50)} == {"static"}
    assert {p.rule(rng, None) for _ in range(50)} == {"static"}
    with pytest.raises(PatchingError, match="pass a generator"):
        p.rule(None, 15)


def test_first_static_step():
    assert curriculum(10, 20).config.first_static_step == 20
    assert curriculum(5, 5).config.first_static_step == 6  # step 5 is aligned
    assert PatchingConfig(mode="mixed").first_static_step is None
    for tau1, tau2 in ((10, 20), (5, 5), (0, 0), (0, 1)):
        p = curriculum(tau1, tau2)
        first = p.config.first_static_step
        assert p.probability_aligned(first) == 0.0 and p.probability_aligned(first - 1) > 0.0


def test_rules_at_steps_are_those_the_steps_can_draw():
    """The rules a row patched at one of the steps can get: what sizes its rows are checked
    under (validation rows, step None, are static for mixed and curriculum)."""
    p = curriculum(10, 20)
    assert p.rules_at_steps(range(0, 11)) == ("aligned",)  # through tau1: aligned only
    assert p.rules_at_steps(range(0, 12)) == ("static", "aligned")
    assert p.rules_at_steps(range(19, 30)) == ("static", "aligned")  # P(aligned) = 1/10 at 19
    assert p.rules_at_steps(range(20, 30)) == ("static",)
    assert p.rules_at_steps(None) == ("static",)
    assert p.rules_at_steps(range(0)) == ()
    hard = curriculum(5, 5)
    assert hard.rules_at_steps(range(0, 6)) == ("aligned",)
    assert hard.rules_at_steps(range(6, 9)) == ("static",)
    for prob_static, rules in ((0.0, ("aligned",)), (0.5, ("static", "aligned")),
                               (1.0, ("static",))):
        mixed = Patcher(PatchingConfig(mode="mixed", prob_static=prob_static))
        assert mixed.rules_at_steps(range(3)) == rules
        assert mixed.rules_at_steps(None) == ("static",)
    for mode in ("none", "static", "aligned"):
        fixed = Patcher(PatchingConfig(mode=mode))
        assert fixed.rules_at_steps(range(3)) == fixed.rules_at_steps(None) == (mode,)


@pytest.mark.parametrize("prob_static", [0.0, 0.3, 1.0])
def test_mixed_frequency(prob_static):
    p = Patcher(PatchingConfig(mode="mixed", prob_static=prob_static))
    n = 4000
    static = sum(p.rule(np.random.default_rng([7, i]), 5) == "static" for i in range(n))
    # Binomial(n, q): 5 standard deviations.
    assert abs(static / n - prob_static) <= 5 * np.sqrt(prob_static * (1 - prob_static) / n) + 1e-12


def test_mixed_is_static_at_inference():
    """Validation rows (step None) of a mixed model drew aligned patching for 1 - prob_static of
    their documents, while the docs, lst-eval and lst-generate patch it statically."""
    p = Patcher(PatchingConfig(mode="mixed", prob_static=0.0))
    assert p.probability_aligned(None) == 0.0 and p.probability_aligned(3) == 1.0
    rngs = [np.random.default_rng([7, i]) for i in range(50)]
    assert {p.rule(rng, None) for rng in rngs} == {"static"}


def test_curriculum_frequency_in_the_ramp():
    p = curriculum(0, 1000)
    n = 4000
    aligned = sum(p.rule(np.random.default_rng([3, i]), 750) == "aligned" for i in range(n))
    assert abs(aligned / n - 0.25) <= 5 * np.sqrt(0.25 * 0.75 / n)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(0, 400))
def test_patch_lengths_follow_the_drawn_rule(seed, step):
    doc = random_interleaved(np.random.default_rng(seed))
    p = curriculum(100, 300)
    rule = p.rule(np.random.default_rng([seed, 1]), step)
    lengths = p.patch_lengths(doc, np.random.default_rng([seed, 1]), step)
    expected = (aligned_patch_lengths(doc) if rule == "aligned" else static_patch_lengths(doc, 4))
    np.testing.assert_array_equal(lengths, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="entropy"), "patching mode must be one of"),
    (dict(mode="static", patch_size=0), "patch_size must be >= 1"),
    (dict(mode="aligned", silence="skip"), "silence must be one of"),
    (dict(mode="mixed", prob_static=1.5), r"prob_static must be in \[0, 1\]"),
    (dict(mode="curriculum"), "needs 0 <= aligned_until_step <= static_from_step"),
    (dict(mode="curriculum", aligned_until_step=5, static_from_step=2), "needs 0 <="),
])
def test_config_errors(kwargs, message):
    with pytest.raises(PatchingError, match=message):
        PatchingConfig(**kwargs)
