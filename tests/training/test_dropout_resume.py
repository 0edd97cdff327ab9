"""A run with dropout, stopped and resumed, continues with the uninterrupted run's dropout masks.

On CPU hidden dropout draws from torch's global generator, which a checkpoint saves and a resume
restores. The data loaders used to draw their workers' base seed from that generator too, once
per iterator: the resumed run's training loader drew once more after the restore, so its masks,
and its losses, left the uninterrupted run's from the first iteration after the checkpoint.
Evaluations in between (a loader each) are included.
"""

import pytest

from megatron_lst.training.arguments import parse_args, validate_args
from training.training_cases import tiny_flags, write_corpus


@pytest.mark.slow
def test_stop_and_resume_with_dropout_gives_the_straight_run_losses(tmp_path):
    from megatron_lst.training.loop import pretrain

    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--hidden-dropout", "0.1", "--train-iters", "4", "--lr-decay-iters", "4",
        "--eval-interval", "1"]
    straight = pretrain(validate_args(parse_args(flags), 1))
    save = tmp_path / "ckpt"
    resumable = flags + ["--save", str(save), "--load", str(save)]
    stopped = pretrain(validate_args(parse_args(resumable + ["--exit-interval", "2"]), 1))
    resumed = pretrain(validate_args(parse_args(resumable), 1))

    assert (stopped.iteration, resumed.resumed_from) == (2, 2)
    assert {**stopped.losses, **resumed.losses} == straight.losses  # bitwise
    assert resumed.eval_losses == {i: straight.eval_losses[i] for i in (3, 4)}
