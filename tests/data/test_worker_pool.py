"""`worker_pool` stops early without `Pool.terminate()`: leaving the block by an exception cancels
what no worker has started, lets the running tasks finish, and leaves no process behind."""

import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from megatron_lst.data.worker_pool import worker_pool


def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _die() -> None:
    os._exit(3)


@pytest.fixture
def no_new_processes():
    """Every process the test starts has ended by its end (processes of earlier tests, such as
    a checkpoint writer's manager, may live on)."""
    before = set(multiprocessing.active_children())
    yield
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_results_come_back_from_the_workers(start_method, no_new_processes):
    with worker_pool(2, start_method) as pool:
        pids = {pool.submit(_nap, 0.0).result() for _ in range(6)}
    assert os.getpid() not in pids


def test_leaving_early_cancels_the_tasks_not_started_and_ends_the_workers(no_new_processes):
    futures = []
    with pytest.raises(RuntimeError, match="bad line"):
        with worker_pool(2) as pool:
            futures = [pool.submit(_nap, 0.2) for _ in range(40)]
            futures[0].result()
            raise RuntimeError("bad line")
    assert all(future.done() for future in futures)
    cancelled = sum(future.cancelled() for future in futures)
    finished = sum(not future.cancelled() for future in futures)
    assert cancelled >= 30 and finished >= 1  # at most the running ones and the queue ran


def test_a_dead_worker_is_an_error_not_a_hang(no_new_processes):
    with worker_pool(2) as pool:
        with pytest.raises(BrokenProcessPool):
            pool.submit(_die).result()
