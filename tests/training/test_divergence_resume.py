"""A run that diverges stops naming its last good checkpoint, and the advice it gives can be
followed: resuming from that checkpoint with a lower --lr is refused unless
--override-opt_param-scheduler says to follow the new schedule (as the message says), and with
it follows this run's --lr and --min-lr from the checkpoint's position: the learning rates of a
straight run with those flags. (megatron.core keeps the learning-rate bounds in the optimizer's
parameter groups, which came back from the checkpoint: the override used to change the decay
and the warm-up but keep the checkpoint's learning rates, so a diverged run resumed with the
lower --lr it was advised diverged again.)"""

import math

import pytest

from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.divergence import NonFiniteLossError
from megatron_lst.training.metrics import read_metrics
from megatron_lst.training.resume_check import ResumeConfigError
from training.training_cases import tiny_flags, write_corpus


def _with(flags: list[str], name: str, value: str) -> list[str]:
    at = flags.index(name)
    return flags[:at + 1] + [value] + flags[at + 2:]


@pytest.mark.slow
def test_a_diverged_run_resumes_from_its_last_good_checkpoint_as_advised(tmp_path):
    from megatron_lst.training.loop import pretrain

    save = tmp_path / "ckpt"
    base = _with(tiny_flags(write_corpus(tmp_path / "data")), "--clip-grad", "0") + [
        "--train-iters", "6", "--eval-interval", "1000", "--save-interval", "2"]
    flags = base + ["--save", str(save), "--load", str(save)]
    pretrain(validate_args(parse_args(flags + ["--exit-interval", "2"]), 1))
    with pytest.raises(NonFiniteLossError) as diverged:  # a learning rate far too high
        pretrain(validate_args(parse_args(_with(flags, "--lr", "1e6")
                                          + ["--override-opt_param-scheduler"]), 1))
    message = str(diverged.value)
    assert f"The newest checkpoint, {save / 'iter_0000002'} (iteration 2)" in message
    assert "lower --lr" in message
    assert "with --override-opt_param-scheduler where you change --lr" in message

    lower = _with(_with(flags, "--lr", "1e-3"), "--min-lr", "1e-4")
    with pytest.raises(ResumeConfigError, match=r"--lr 0.003 -> 0.001; --min-lr 0.0003 -> "
                                                r"0.0001.*--override-opt_param-scheduler"):
        pretrain(validate_args(parse_args(lower), 1))
    resumed = pretrain(validate_args(parse_args(lower + ["--override-opt_param-scheduler"]), 1))
    assert (resumed.resumed_from, resumed.iteration) == (2, 6)
    assert all(math.isfinite(loss) for loss in resumed.losses.values()), resumed.losses

    straight = tmp_path / "straight"
    pretrain(validate_args(parse_args(_with(_with(base, "--lr", "1e-3"), "--min-lr", "1e-4")
                                      + ["--save", str(straight)]), 1))
    rates = {r["iteration"]: r["learning_rate"] for r in read_metrics(save)}
    expected = {r["iteration"]: r["learning_rate"] for r in read_metrics(straight)}
    assert [rates[i] for i in range(3, 7)] == pytest.approx([expected[i] for i in range(3, 7)],
                                                            rel=1e-12)
    assert expected[3] < 1e-3 and expected[6] == pytest.approx(1e-4)  # the new bounds


@pytest.mark.slow
def test_a_run_that_diverges_right_after_a_save_is_sent_to_the_checkpoint_before_it(tmp_path):
    """With --save-interval 1 the advice named the checkpoint of the iteration before the NaN
    loss, whose weights gave that loss: resuming from it with a sane --lr replayed the same batch
    on the same weights and stopped at the same iteration again."""
    from megatron_lst.training.loop import pretrain

    save = tmp_path / "ckpt"
    flags = _with(tiny_flags(write_corpus(tmp_path / "data")), "--clip-grad", "0") + [
        "--train-iters", "8", "--eval-interval", "1000", "--save-interval", "1",
        "--save", str(save), "--load", str(save)]
    pretrain(validate_args(parse_args(flags + ["--exit-interval", "2"]), 1))
    with pytest.raises(NonFiniteLossError) as diverged:
        pretrain(validate_args(parse_args(_with(flags, "--lr", "1e6")
                                          + ["--override-opt_param-scheduler"]), 1))
    message = str(diverged.value)
    at = int(message.removeprefix("iteration ").split(":")[0])
    passed_over = save / f"iter_{at - 1:07d}"
    assert f"{passed_over} (iteration {at - 1}) is passed over" in message
    assert f"The newest checkpoint before it, {save / f'iter_{at - 2:07d}'}" in message
    with pytest.raises(NonFiniteLossError, match=f"^iteration {at}: "):  # what it was sent to
        pretrain(validate_args(parse_args(flags + ["--override-opt_param-scheduler"]), 1))
    aside = save / f"diverging_iter_{at - 1:07d}"
    assert f"mv {passed_over} {aside}" in message
    assert f"--load {save} --ckpt-step {at - 2}," in message
    passed_over.rename(aside)  # as advised, then resume with the sane --lr
    result = pretrain(validate_args(parse_args(
        flags + ["--ckpt-step", str(at - 2), "--override-opt_param-scheduler"]), 1))
    assert result.iteration == 8 and all(math.isfinite(loss) for loss in result.losses.values())
