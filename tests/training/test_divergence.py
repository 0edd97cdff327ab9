"""The two signs that stop a run whose weights went wrong (`training/divergence.py`); the runs
that stop on them are in test_loop.py, test_checkpointing.py and test_divergence_resume.py."""

import math

import pytest

from megatron_lst.training.divergence import NonFiniteLossError, SkippedUpdates, check_loss_finite


def test_non_finite_loss_raises_with_iteration_and_advice():
    check_loss_finite({"lm loss": 3.2}, iteration=7)
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: lm loss = nan.*lower --lr.*"
                                                 r"--initial-loss-scale.*--load"):
        check_loss_finite({"lm loss": math.nan}, iteration=7, fp16=True)
    with pytest.raises(NonFiniteLossError, match=r"lm loss = inf.*lower --clip-grad"):
        check_loss_finite({"lm loss": math.inf}, iteration=1, clip_grad=1.0)
    with pytest.raises(NonFiniteLossError, match=r"turn gradient clipping on \(--clip-grad 1.0"):
        check_loss_finite({"lm loss": math.inf}, iteration=1, clip_grad=0.0)


def test_skipped_updates_stop_the_run_only_when_that_many_in_a_row_came_at_the_lowest_scale():
    skipped = SkippedUpdates(lowest_scale=1.0, limit=3)
    # Two skips while the scale comes down, two at the lowest, an update, two at the lowest.
    steps = [(True, 4.0), (True, 2.0), (True, 1.0), (True, 1.0), (False, 1.0), (True, 1.0),
             (True, 1.0)]
    assert [skipped.stuck_since(i, *s) for i, s in enumerate(steps, 1)] == [None] * 7
    assert skipped.stuck_since(8, True, 1.0) == 6  # three in a row at the lowest
