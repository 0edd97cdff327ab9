"""`rank_failures.share_or_stop`: a step every rank takes on its own stops every rank, with the
same error naming each rank that failed, when any rank fails it."""

import pytest


@pytest.mark.distributed
def test_every_rank_gets_the_parts_or_the_error_naming_each_failed_rank():
    from distributed.harness import TESTS_DIR, run_distributed

    ranks = run_distributed(TESTS_DIR / "training" / "workers" / "rank_failures_worker.py", 3)
    for got in ranks:
        assert got == {
            "none": [{"rank": 0}, {"rank": 1}, {"rank": 2}],
            "rank 1": ["RuntimeError", "[(1, 'rank 1 broke')]"],
            "ranks 0 and 1": ["RuntimeError", "[(0, 'rank 0 broke'), (1, 'rank 1 broke')]"],
        }
