"""The torchrun harness brings records back in rank order and surfaces worker failures."""

import pytest

from distributed.harness import WORKERS_DIR, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = WORKERS_DIR / "rank_report.py"


def test_records_come_back_in_rank_order():
    records = run_distributed(WORKER, 2, timeout=120)
    assert records == [
        {"rank": 0, "world_size": 2, "rank_sum": 3.0},
        {"rank": 1, "world_size": 2, "rank_sum": 3.0},
    ]


def test_a_failing_rank_fails_the_test_with_its_error():
    with pytest.raises(pytest.fail.Exception, match="rank 0 fails on purpose"):
        run_distributed(WORKER, 1, ["--fail-on-rank", "0"], timeout=120)


def test_missing_worker_script_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_worker.py"):
        run_distributed(WORKERS_DIR / "no_such_worker.py", 1)
