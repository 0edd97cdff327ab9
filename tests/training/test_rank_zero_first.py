"""Rank 0 first, the other ranks after it: waits on the store's keys, not on a timed collective
(threads stand in for ranks and share one in-memory store)."""

import logging
import threading

import pytest
import torch

from megatron_lst.training import rank_zero_first as module
from megatron_lst.training.rank_zero_first import OtherRankFailed, run_rank_zero_first


class CountingStore:
    """A `HashStore` that counts the polls of each key (`check` and `add(key, 0)`)."""

    def __init__(self):
        self.store = torch.distributed.HashStore()
        self.polls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.polled = threading.Condition(self.lock)

    def _count(self, key):
        with self.polled:
            self.polls[key] = self.polls.get(key, 0) + 1
            self.polled.notify_all()

    def wait_for_polls(self, key, count, timeout=60.0):
        with self.polled:
            assert self.polled.wait_for(lambda: self.polls.get(key, 0) >= count, timeout), \
                f"{key} polled {self.polls.get(key, 0)} times, not {count}, in {timeout} s"

    def check(self, keys):
        self._count(keys[0])
        return self.store.check(keys)

    def add(self, key, value):
        if value == 0:
            self._count(key)
        return self.store.add(key, value)

    def get(self, key):
        return self.store.get(key)

    def set(self, key, value):
        self.store.set(key, value)


def run_ranks(works, store, hosts=None):
    """Each rank's `works[rank]` under `run_rank_zero_first` on its own thread (on `hosts[rank]`,
    default one host); returns their results (or raised exceptions) in rank order and the
    threads, running."""
    outcomes = [None] * len(works)
    hosts = hosts or ["node0"] * len(works)

    def rank_main(rank):
        try:
            outcomes[rank] = run_rank_zero_first(works[rank], "build the datasets", store, "k",
                                                 rank, len(works), hosts[rank])
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcomes[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True)
               for rank in range(len(works))]
    for thread in threads:
        thread.start()
    return outcomes, threads


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(module, "POLL_SECONDS", 0.001)
    monkeypatch.setattr(module, "REPORT_SECONDS", 0.0)  # a log line every poll


def test_other_ranks_wait_for_a_slow_rank_zero_however_long_it_takes(caplog):
    # Was a broadcast: a row-index build longer than --distributed-timeout-minutes killed the
    # waiting ranks with a gloo/NCCL timeout.
    store, order = CountingStore(), []
    reported, release = threading.Event(), threading.Event()

    def slow_rank_zero():
        module.report_progress("row index of data/speech: 5 of 10 rows")
        reported.set()
        release.wait()  # building, for as long as the test likes
        order.append("rank 0 built")
        return "datasets 0"

    def loading(rank):
        def work():
            order.append(f"rank {rank} loaded")
            return f"datasets {rank}"
        return work

    with caplog.at_level(logging.INFO, logger=module.__name__):
        outcomes, threads = run_ranks([slow_rank_zero, loading(1), loading(2)], store)
        reported.wait()
        store.wait_for_polls("k/rank0", store.polls.get("k/rank0", 0) + 100)  # still waiting
        assert order == []
        release.set()
        for thread in threads:
            thread.join()
    assert outcomes == ["datasets 0", "datasets 1", "datasets 2"]
    assert order[0] == "rank 0 built" and sorted(order[1:]) == ["rank 1 loaded", "rank 2 loaded"]
    waits = [r.getMessage() for r in caplog.records if "waiting for rank 0" in r.getMessage()]
    assert waits and waits[0].startswith("waiting for rank 0 to build the datasets: ")
    assert "--distributed-timeout-minutes does not apply" in waits[0]
    assert all(r.thread == threads[1].ident for r in caplog.records
               if "waiting for rank 0" in r.getMessage())  # one rank reports, not every rank
    # With rank 0's progress, passed on through the store.
    assert waits[-1].endswith("does not apply to this wait); row index of data/speech: 5 of 10 "
                              "rows")
    module.report_progress("after the work")  # a no-op outside it
    assert store.get("k/rank0/progress") == b"row index of data/speech: 5 of 10 rows"


def test_no_rank_leaves_while_another_still_builds():
    # A rank without rank 0's cache (storage of its own) builds again: rank 0 waits for it here
    # instead of in the next collective, which would time out.
    store = CountingStore()
    release = threading.Event()

    def slow_rank_one():
        release.wait()
        return 1

    outcomes, threads = run_ranks([lambda: 0, slow_rank_one], store)
    store.wait_for_polls("k/finished", 100)
    assert threads[0].is_alive() and outcomes == [None, None]
    release.set()
    for thread in threads:
        thread.join()
    assert outcomes == [0, 1]


def test_on_each_host_one_rank_works_before_the_others():
    # A copy of the data on each node's own disk misses rank 0's cache: every rank of the node
    # built the same row index at once, over the same CPUs. Now the host's first rank builds it
    # and the host's other ranks load it.
    store, started = CountingStore(), []
    release = threading.Event()
    lock = threading.Lock()

    def work(rank, slow=False):
        def run():
            with lock:
                started.append(rank)
            if slow:
                release.wait()
            return rank
        return run

    hosts = ["node0", "node0", "node1", "node1", "node1"]
    leader_of_node1 = []

    def node1_rank(rank):
        def run():
            with lock:
                first = not leader_of_node1
                leader_of_node1.append(rank)
            return work(rank, slow=first)()
        return run

    outcomes, threads = run_ranks([work(0), work(1), node1_rank(2), node1_rank(3),
                                   node1_rank(4)], store, hosts)
    store.wait_for_polls("k/host/node1/done", 100)  # node1's others wait for its first rank
    with lock:
        assert sorted(started) == [0, 1, leader_of_node1[0]]
    release.set()
    for thread in threads:
        thread.join()
    assert outcomes == [0, 1, 2, 3, 4]
    assert sorted(started) == [0, 1, 2, 3, 4]


def test_a_host_leader_failing_stops_the_ranks_waiting_for_it():
    store, started = CountingStore(), []
    lock = threading.Lock()

    def node1_rank(rank):
        def run():
            with lock:
                started.append(rank)
                leads = len(started) == 1
            if leads:
                raise ValueError("no space left on device")
            return rank
        return run

    outcomes, threads = run_ranks([lambda: 0, node1_rank(1), node1_rank(2)], store,
                                  ["node0", "node1", "node1"])
    for thread in threads:
        thread.join()
    leader = started[0]
    assert started == [leader]  # the host's other rank never started
    assert isinstance(outcomes[leader], ValueError)
    for rank in (0, 3 - leader):
        assert isinstance(outcomes[rank], OtherRankFailed)
        # On another node than the leader's: its own log does not show the leader's message.
        assert str(outcomes[rank]) == (f"rank {leader} failed to build the datasets (ValueError: "
                                       f"no space left on device); this rank stops with it")


def test_when_rank_zero_fails_the_others_stop_without_working():
    store, worked = CountingStore(), []

    def failing():
        raise ValueError("bad.idx: truncated")

    outcomes, threads = run_ranks([failing, lambda: worked.append(1)], store)
    for thread in threads:
        thread.join()
    assert isinstance(outcomes[0], ValueError)
    assert isinstance(outcomes[1], OtherRankFailed)
    assert str(outcomes[1]) == ("rank 0 failed to build the datasets (ValueError: bad.idx: "
                                "truncated); this rank stops with it")
    assert worked == []


def test_when_another_rank_fails_rank_zero_stops_instead_of_waiting():
    store = CountingStore()

    def failing():
        raise FileNotFoundError("no such file:\n  data/speech.idx\n")

    outcomes, threads = run_ranks([lambda: 0, lambda: 1, failing], store)
    for thread in threads:
        thread.join()
    assert isinstance(outcomes[2], FileNotFoundError)
    for outcome in outcomes[:2]:
        assert isinstance(outcome, OtherRankFailed)
        assert str(outcome) == ("rank 2 failed to build the datasets (FileNotFoundError: no such "
                                "file: data/speech.idx); this rank stops with it")


def test_a_lost_store_is_named():
    class GoneStore(CountingStore):
        def check(self, keys):
            raise RuntimeError("Connection reset by peer")

    outcomes, threads = run_ranks([lambda: 0, lambda: 1], GoneStore())
    for thread in threads:
        thread.join()
    assert [type(outcome) for outcome in outcomes] == [OtherRankFailed, OtherRankFailed]
    assert str(outcomes[1]).startswith(
        "lost the process group's store while waiting for rank 0 to build the datasets "
        "(Connection reset by peer): the rank or launcher serving it has stopped")
    assert "waiting for the other ranks to build the datasets" in str(outcomes[0])


def test_a_single_process_just_works():
    assert module.rank_zero_first(lambda: 7, "build the datasets") == 7
