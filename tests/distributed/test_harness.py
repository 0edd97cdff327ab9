"""The torchrun harness brings records back in rank order and surfaces worker failures and hangs.

A hung run fails after its timeout instead of blocking the suite: torchrun starts each worker in a
session of its own, and killing the launcher's process group left them running with the output
pipe open, which `run_distributed` then read for ever (a deadlocked collective blocked pytest, and
CI, until the workers were killed by hand).
"""

import threading
import time

import psutil
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


TIMEOUT_S = 15


def test_a_hung_worker_fails_the_test_after_the_timeout_and_is_killed(tmp_path):
    outcome = {}

    def launch():
        try:
            run_distributed(WORKERS_DIR / "sleep_forever.py", 2, ["--pid-dir", tmp_path],
                            timeout=TIMEOUT_S)
        except BaseException as error:  # pytest.fail raises an exception outside Exception
            outcome["error"] = error

    # In a daemon thread, so that a harness that still hangs fails this test, not the suite.
    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    thread.join(timeout=TIMEOUT_S + 120)
    assert not thread.is_alive(), "run_distributed kept waiting after its timeout"
    assert isinstance(outcome.get("error"), pytest.fail.Exception)
    assert f"timed out after {TIMEOUT_S} s" in str(outcome["error"])
    pids = [int(path.read_text()) for path in sorted(tmp_path.glob("*.pid"))]
    assert len(pids) == 2, "the workers did not start before the timeout: raise TIMEOUT_S"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids), "a worker outlived the timed-out test"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
