"""Ranks that stop on an error wait (bounded) until every rank has said why before any exits:
a launcher ends all ranks once one has exited (threads stand in for ranks and share one store)."""

import threading

import pytest
import torch

from megatron_lst.training import stop_together


class PolledStore:
    """A `HashStore` that keeps what each poll (`add(key, 0)`) saw; a test can wait for them."""

    def __init__(self):
        self.store = torch.distributed.HashStore()
        self.seen: list[int] = []
        self.polled = threading.Condition()

    def add(self, key, value):
        total = self.store.add(key, value)
        if value == 0:
            with self.polled:
                self.seen.append(total)
                self.polled.notify_all()
        return total

    def wait_for_polls(self, seeing, count, timeout=60.0):
        """Until `count` polls have seen `seeing` ranks counted in."""
        with self.polled:
            assert self.polled.wait_for(lambda: self.seen.count(seeing) >= count, timeout), \
                f"{self.seen.count(seeing)} polls saw {seeing}, not {count}, in {timeout} s"


def stopping_rank(store, world_size):
    thread = threading.Thread(target=stop_together.wait_for_every_rank,
                              args=(store, "stop", world_size), daemon=True)
    thread.start()
    return thread


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(stop_together, "POLL_SECONDS", 0.001)


def test_a_stopping_rank_waits_until_every_rank_has_said_why(monkeypatch):
    monkeypatch.setattr(stop_together, "STOP_WAIT_SECONDS", 600.0)
    store = PolledStore()
    first = stopping_rank(store, 3)
    store.wait_for_polls(seeing=1, count=2)  # it looked again after seeing itself alone
    second = stopping_rank(store, 3)
    store.wait_for_polls(seeing=2, count=3)  # and they went on after seeing two of three
    assert first.is_alive() and second.is_alive()
    stop_together.wait_for_every_rank(store, "stop", 3)  # the last: nobody left to wait for
    first.join(timeout=60)
    second.join(timeout=60)
    assert not first.is_alive() and not second.is_alive()
    assert store.store.add("stop", 0) == 3


def test_a_rank_that_stops_alone_waits_only_so_long(monkeypatch):
    """The others may be in a collective, or at work that ends later."""
    monkeypatch.setattr(stop_together, "STOP_WAIT_SECONDS", 0.05)
    store = PolledStore()
    stop_together.wait_for_every_rank(store, "stop", 2)
    assert store.store.add("stop", 0) == 1


def test_a_store_that_went_away_ends_the_wait_quietly():
    class GoneStore:
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    stop_together.wait_for_every_rank(GoneStore(), "stop", 2)


def test_without_a_process_group_of_several_ranks_nobody_is_waited_for(monkeypatch):
    monkeypatch.setattr(stop_together, "STOP_WAIT_SECONDS", 600.0)
    assert not torch.distributed.is_initialized()
    stop_together.arm()
    stop_together.stop_with_the_others()  # returns at once


def test_each_arming_waits_under_a_key_of_its_own_once(monkeypatch):
    """A process may train twice in one process group (and an elastic attempt keeps the last
    one's store): a key that an earlier stop filled would let a rank exit without waiting."""
    store = torch.distributed.HashStore()
    broadcasts = []

    def broadcast(objects, src):
        broadcasts.append(src)
        objects[0] = "token"

    for name, value in [("is_initialized", lambda: True), ("get_world_size", lambda: 2),
                        ("get_rank", lambda: 0), ("broadcast_object_list", broadcast)]:
        monkeypatch.setattr(torch.distributed, name, value)
    monkeypatch.setattr(torch.distributed.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(stop_together, "_armed", None)
    stop_together.attempt_token.cache_clear()
    monkeypatch.setattr(stop_together, "STOP_WAIT_SECONDS", 0.0)
    keys = []
    for _ in range(2):
        stop_together.arm()
        keys.append(stop_together._armed[1])
        stop_together.stop_with_the_others()
        stop_together.stop_with_the_others()  # once per arming: this one counts nothing
    stop_together.attempt_token.cache_clear()
    assert keys[0] != keys[1] and all(key.startswith("lst_stop_together/token/") for key in keys)
    assert [store.add(key, 0) for key in keys] == [1, 1]
    assert broadcasts == [0]  # the token is drawn once per process


class _Writes:
    """Stands for stderr: keeps each write apart, as the file of a shared log sees them."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_stop_line_reaches_the_shared_log_in_one_write(monkeypatch):
    """`print` wrote the text and then its newline: two ranks' stop lines ran together into
    one line of the launcher's log (and a test matching each rank's line found one)."""
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    stop_together.say_why("lst-train: saving the checkpoint failed")
    assert stderr.writes == ["lst-train: saving the checkpoint failed\n"]


def say_on_rank(monkeypatch, store, rank: int, line: str) -> None:
    """`say_why_once(line)` as rank `rank` of three armed on `store`."""
    monkeypatch.setattr(stop_together, "_armed", (store, "stop", 3, rank))
    stop_together.say_why_once(line)


def test_a_line_every_rank_says_reaches_the_shared_log_once(monkeypatch):
    """Each of 512 ranks stopping on the same refusal wrote it once more into the shared log; a
    line of one rank alone is still written, naming the rank."""
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    store = torch.distributed.HashStore()
    for rank, line in [(2, "lst-train: A"), (0, "lst-train: A"), (1, "lst-train: B"),
                       (0, "lst-train: B"), (1, "lst-train: A")]:
        say_on_rank(monkeypatch, store, rank, line)
    assert stderr.writes == ["lst-train: A\n", "[rank 1] lst-train: B\n"]


def test_without_the_store_every_line_is_written(monkeypatch):
    class GoneStore:
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    for rank in (0, 1):
        say_on_rank(monkeypatch, GoneStore(), rank, "lst-train: A")
    assert stderr.writes == ["lst-train: A\n", "lst-train: A\n"]


@pytest.mark.parametrize("rank, world_size, same_on_every_rank, written, waited", [
    (0, 1, False, "lst-train: A\n", False),  # alone: as it is
    (0, 3, True, "lst-train: A\n", False),
    # another rank waits for the launcher to end it once rank 0 printed: it has not here
    (2, 3, True, "[rank 2] lst-train: A\n", True),
    (2, 3, False, "[rank 2] lst-train: A\n", False),  # what rank 2 read: its own, at once
])
def test_before_arming_a_line_every_rank_says_alike_is_left_to_rank_0(
        monkeypatch, rank, world_size, same_on_every_rank, written, waited):
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    written_before_waiting = []
    monkeypatch.setattr(stop_together.time, "sleep",
                        lambda seconds: written_before_waiting.append((seconds, stderr.writes[:])))
    stop_together.say_why_before_arming("lst-train: A", same_on_every_rank)
    assert stderr.writes == [written]
    assert written_before_waiting == ([(stop_together.STOP_WAIT_SECONDS, [])] if waited else [])
