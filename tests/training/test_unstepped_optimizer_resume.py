"""Checkpoints of optimizers whose state torch creates lazily resume the uninterrupted run.

- fp16 skips its first steps while the dynamic loss scale comes down (from 2^32 by default), so
  a save in those iterations (a preemption, a short --save-interval) finds an optimizer that has
  not stepped yet and has no per-parameter state. The distributed optimizer used to fail that
  save (megatron.core asserts on the missing step); the plain one saved a checkpoint without the
  moments that loading asks for (KeyError on resume).
- SGD: megatron.core builds it without a state initialiser, and loading called it (TypeError),
  so no SGD checkpoint could be resumed.

Each case: N iterations straight, and 2 + stop (--exit-interval) + resume to N, with the same
losses bit for bit (fp16 and fp32 on CPU are deterministic).

A checkpoint without the state this run's optimizer loads (another --optimizer, SGD without
momentum, or an fp16 checkpoint of an older version saved before the first step) is refused
naming the missing state, both runs' optimizer flags and --no-load-optim, instead of megatron.core's
KeyError listing every key of the checkpoint.
"""

import io
import re

import pytest

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training import optimizer_state
from megatron_lst.training.arguments import parse_args, validate_args
from training.training_cases import tiny_flags, write_corpus

# From 2^15 the loss scale halves twice (--hysteresis 1) before the steps stop overflowing.
SKIPS_TWO_STEPS = ["--fp16", "--initial-loss-scale", "32768", "--hysteresis", "1"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> list[str]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _straight_and_stitched(flags: list[str], save, iterations: int):
    from megatron_lst.training.loop import pretrain

    flags = flags + ["--train-iters", str(iterations), "--lr-decay-iters", str(iterations),
                     "--eval-interval", "1000"]
    log = io.StringIO()
    straight = pretrain(validate_args(parse_args(flags), 1), stream=log)
    resumable = flags + ["--save", str(save), "--load", str(save)]
    stopped = pretrain(validate_args(parse_args(resumable + ["--exit-interval", "2"]), 1))
    resumed = pretrain(validate_args(parse_args(resumable), 1))
    assert (stopped.iteration, resumed.resumed_from, resumed.iteration) == (2, 2, iterations)
    return straight.losses, {**stopped.losses, **resumed.losses}, log.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_flags", [[], ["--use-distributed-optimizer"]],
                         ids=["plain", "distributed"])
def test_fp16_checkpoint_saved_before_the_first_step_resumes_exactly(data_path, tmp_path,
                                                                     optimizer_flags):
    flags = tiny_flags(data_path) + SKIPS_TWO_STEPS + optimizer_flags
    straight, stitched, log = _straight_and_stitched(flags, tmp_path / "ckpt", 5)
    skipped = [int(n) for n in re.findall(r"number of skipped iterations: +(\d+)", log)]
    assert skipped == [1, 1, 0, 0, 0]  # the checkpoint of iteration 2 precedes the first step
    assert stitched == straight


@pytest.mark.slow
@pytest.mark.parametrize("momentum", ["0.9", "0"])
def test_sgd_checkpoint_resumes_exactly(data_path, tmp_path, momentum):
    flags = tiny_flags(data_path) + ["--optimizer", "sgd", "--sgd-momentum", momentum]
    straight, stitched, _ = _straight_and_stitched(flags, tmp_path / "ckpt", 4)
    assert stitched == straight


def _save_two_iterations(flags: list[str], save) -> list[str]:
    """Train and save 2 iterations of `flags` into `save`; the flags to resume them to 4."""
    from megatron_lst.training.loop import pretrain

    common = ["--train-iters", "4", "--lr-decay-iters", "4", "--eval-interval", "1000",
              "--save", str(save), "--load", str(save)]
    pretrain(validate_args(parse_args(flags + common + ["--exit-interval", "2"]), 1))
    return common


# Another --optimizer is refused by the flag checks, from the checkpoint's flags; SGD's momentum
# on (a buffer) or off (none) by loading, from the tensors.
OTHER_OPTIMIZER = (r"iter_0000002 was trained with --optimizer {saved} and this run uses "
                   r"--optimizer {resumed}: .* add --no-load-optim")
NO_MOMENTUM_BUFFER = (r"iter_0000002 holds no optimizer state 'optimizer\.state\.momentum_buffer"
                      r"\.[^']+', which this run's optimizer loads: it was saved with --optimizer "
                      r"sgd --sgd-momentum 0.0 and this run uses --optimizer sgd.* add "
                      r"--no-load-optim")


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed, refusal", [
    (["--optimizer", "adam"], ["--optimizer", "sgd"],
     OTHER_OPTIMIZER.format(saved="adam", resumed="sgd")),
    (["--optimizer", "sgd", "--sgd-momentum", "0"], ["--optimizer", "sgd"], NO_MOMENTUM_BUFFER),
    (["--optimizer", "sgd"], ["--optimizer", "adam"],
     OTHER_OPTIMIZER.format(saved="sgd", resumed="adam")),
])
def test_a_checkpoint_of_another_optimizer_is_refused_naming_both(data_path, tmp_path, saved,
                                                                  resumed, refusal):
    from megatron_lst.training.loop import pretrain

    common = _save_two_iterations(tiny_flags(data_path) + saved, tmp_path / "ckpt")
    resume = tiny_flags(data_path) + resumed + common
    with pytest.raises(CheckpointError, match=refusal):
        pretrain(validate_args(parse_args(resume), 1))
    resumed_fresh = pretrain(validate_args(parse_args(resume + ["--no-load-optim"]), 1))
    assert (resumed_fresh.resumed_from, resumed_fresh.iteration) == (2, 4)


@pytest.mark.slow
def test_an_old_fp16_checkpoint_without_moments_is_refused_naming_no_load_optim(
        data_path, tmp_path, monkeypatch):
    """What older versions saved before fp16's first step: no Adam moments."""
    from megatron_lst.training.loop import pretrain

    flags = tiny_flags(data_path) + SKIPS_TWO_STEPS
    with monkeypatch.context() as patched:
        patched.setattr(optimizer_state, "_initialise_state", lambda optimizer: None)
        common = _save_two_iterations(flags, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=(
            r"holds no optimizer state 'optimizer\.state\.exp_avg\.[^']+'.* saved with "
            r"--optimizer adam, as this run is, but before the optimizer's first step .* add "
            r"--no-load-optim")):
        pretrain(validate_args(parse_args(flags + common), 1))
