"""The three signs that stop a run whose weights went wrong (`training/divergence.py`); the runs
that stop on them are here and in test_loop.py, test_checkpointing.py and
test_divergence_resume.py."""

import math

import pytest

from megatron_lst.training import loop
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.divergence import (
    NonFiniteGradientError,
    NonFiniteLossError,
    SkippedUpdates,
    check_grad_norm_finite,
    check_loss_finite,
)
from training.training_cases import tiny_flags, write_corpus


def test_non_finite_loss_raises_with_iteration_and_advice():
    check_loss_finite({"lm loss": 3.2}, iteration=7)
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: lm loss = nan.*lower --lr.*"
                                                 r"--initial-loss-scale.*--load"):
        check_loss_finite({"lm loss": math.nan}, iteration=7, fp16=True)
    with pytest.raises(NonFiniteLossError, match=r"lm loss = inf.*lower --clip-grad"):
        check_loss_finite({"lm loss": math.inf}, iteration=1, clip_grad=1.0)
    with pytest.raises(NonFiniteLossError, match=r"turn gradient clipping on \(--clip-grad 1.0"):
        check_loss_finite({"lm loss": math.inf}, iteration=1, clip_grad=0.0)


def test_a_non_finite_gradient_norm_under_a_finite_loss_raises():
    for measured in (2.5, None):  # None: not measured (an update fp16 skipped)
        check_grad_norm_finite(measured, loss=3.0, iteration=4)
    with pytest.raises(NonFiniteGradientError, match=r"iteration 4: the gradient norm is inf "
                                                     r"while the loss was finite \(3.25\)"):
        check_grad_norm_finite(math.inf, loss=3.25, iteration=4)
    assert issubclass(NonFiniteGradientError, NonFiniteLossError)  # lst-train's exit status 5


@pytest.mark.slow
@pytest.mark.parametrize("clip_grad", ["1.0", "0"], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("flags", [[], ["--use-distributed-optimizer"]], ids=["ddp", "distopt"])
def test_a_nan_gradient_stops_the_run_at_its_iteration_not_the_next(tmp_path, monkeypatch, flags,
                                                                     clip_grad):
    """A NaN that came up in the backward pass under a finite loss went into the weights by the
    update: the run stopped an iteration later on a NaN loss, blaming that iteration's batch (or
    on the save of that iteration, refused for its NaN weights). The same without clipping: the
    stop relies on megatron.core's ChainedOptimizer measuring the norm with --clip-grad 0 too."""
    run_schedule, backward_passes = loop._run_schedule, []

    def nan_gradient_on_iteration_4(state, iterator, forward_only, count_flops):
        result = run_schedule(state, iterator, forward_only, count_flops)
        if not forward_only:
            backward_passes.append(None)
            if len(backward_passes) == 4:
                parameter = next(state.model[0].parameters())
                parameter.main_grad.view(-1)[0] = math.nan
        return result

    monkeypatch.setattr(loop, "_run_schedule", nan_gradient_on_iteration_4)
    save = tmp_path / "ckpt"
    args = validate_args(parse_args([*tiny_flags(write_corpus(tmp_path)), "--train-iters", "6",
                                     "--clip-grad", clip_grad, "--eval-interval", "1000",
                                     "--save", str(save), "--save-interval", "1", *flags]), 1)
    with pytest.raises(NonFiniteGradientError) as stopped:
        loop.pretrain(args, index_cache_dir=tmp_path / "rows")
    message = str(stopped.value)
    assert message.startswith("iteration 4: the gradient norm is nan while the loss was finite")
    # iteration 3's weights give the NaN again on iteration 4's batch when resumed from
    assert (f"{save / 'iter_0000003'} (iteration 3) is passed over: its weights gave "
            f"non-finite gradients on iteration 4's batch") in message
    assert f"{save / 'iter_0000002'} (iteration 2)" in message
    assert sorted(p.name for p in save.glob("iter_*")) == [
        "iter_0000001", "iter_0000002", "iter_0000003"]


def test_skipped_updates_stop_the_run_only_when_that_many_in_a_row_came_at_the_lowest_scale():
    skipped = SkippedUpdates(lowest_scale=1.0, limit=3)
    # Two skips while the scale comes down, two at the lowest, an update, two at the lowest.
    steps = [(True, 4.0), (True, 2.0), (True, 1.0), (True, 1.0), (False, 1.0), (True, 1.0),
             (True, 1.0)]
    assert [skipped.stuck_since(i, *s) for i, s in enumerate(steps, 1)] == [None] * 7
    assert skipped.stuck_since(8, True, 1.0) == 6  # three in a row at the lowest
