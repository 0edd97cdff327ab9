"""Work that rank 0 does first and the other ranks after it (building the datasets' row indices,
which the other ranks then load from rank 0's cache), with waits that no timeout cuts short.

A collective (a barrier, a broadcast) waits at most `--distributed-timeout-minutes`, and building
the row indices of a large corpus can take longer (minutes per million documents, see
docs/data.md): the waiting ranks then died in an opaque gloo/NCCL timeout. Here the ranks wait on
keys of the process group's key-value store instead, polled every `POLL_SECONDS` without a
deadline and with a log line every `REPORT_SECONDS`:

1. rank 0 does the work and sets `<key>/rank0` to "done", or "failed" if it raised;
2. the other ranks wait for that key (and raise `OtherRankFailed` when rank 0 failed); then on
   each host the first rank to get there does the work, and the host's other ranks wait for it
   before they do theirs: ranks that do not find rank 0's cache (a copy of the data on each
   node's own disk is a different file, with a row index of its own) build it once per host and
   load it from there, instead of every rank of the host building it at once over the same CPUs;
3. every rank adds itself to `<key>/finished` (or sets `<key>/failed` to its rank when its work
   raised) and waits until all have, so that no rank leaves for the next collective while
   another still builds.

The rank that others wait on passes on how far it has got: `report_progress(text)`, called
from the work (the row-index build calls it with its progress line), sets a key whose latest text
the waiting ranks add to their log lines.

A rank whose work raises stops the others with `OtherRankFailed`, which carries the failing
rank's error on one line (set under `<key>/failed` before the rank says it failed): on a
multi-node run the failing rank's own message is in another node's log. The entry point has
every rank that stops print why before any exits (`stop_together`). A rank that dies without a
word leaves the others waiting until the launcher (torchrun, SLURM) stops them, as it does when a
rank exits; when the store's server goes (rank 0 serves it without torchrun), the polls end
with `OtherRankFailed` at once.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from megatron_lst.parallel import has_other_ranks
from megatron_lst.rank_failures import one_line
from megatron_lst.training.stop_together import attempt_token

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
REPORT_SECONDS = 60.0
_DONE, _FAILED = b"done", b"failed"
_calls = itertools.count()  # every rank makes the same calls in the same order
# (store, key) where this process's work reports its progress, while other ranks wait for it.
_progress_key: tuple[object, str] | None = None

T = TypeVar("T")


class OtherRankFailed(RuntimeError):
    """Another rank failed at the work (the message names it and its error), or its store went
    away."""


def rank_zero_first(work: Callable[[], T], what: str) -> T:
    """`work()` on rank 0, then on the other ranks of the default process group (first one per
    host); returns on every rank once every rank has done it. `what` (e.g. "build the
    datasets") names the work in the wait's log lines and errors. Without a process group of
    several ranks: `work()`."""
    if not has_other_ranks():
        return work()
    from torch.distributed.distributed_c10d import _get_default_store

    key = f"lst_rank_zero_first/{attempt_token()}/{next(_calls)}"
    return run_rank_zero_first(work, what, _get_default_store(), key,
                               torch.distributed.get_rank(), torch.distributed.get_world_size(),
                               socket.gethostname())


def report_progress(text: str) -> None:
    """Tell the ranks waiting for this process's work how far it has got (a no-op unless this
    process does work of `rank_zero_first` that other ranks wait for)."""
    if _progress_key is not None:
        store, key = _progress_key
        store.set(key, text)


def run_rank_zero_first(work: Callable[[], T], what: str, store, key: str, rank: int,
                        world_size: int, host: str) -> T:
    """`rank_zero_first` on an explicit `store` (a `torch.distributed.Store` every rank shares)
    under `key`, as `rank` of `world_size` running on `host`."""
    host_key = f"{key}/host/{host}"
    if rank == 0:
        store.add(f"{host_key}/arrivals", 1)  # first on its host: the others come after it
        leads_host = True
    else:
        _wait(f"rank 0 to {what}", quiet=rank != 1,
              done=lambda: store.check([f"{key}/rank0"]),
              progress=(store, f"{key}/rank0/progress"))
        if store.get(f"{key}/rank0") != _DONE:
            raise _failure(store, key)  # rank 0 set <key>/failed before <key>/rank0
        arrival = store.add(f"{host_key}/arrivals", 1)
        leads_host = arrival == 1
        if not leads_host:
            _wait(f"the first rank on {host} to {what}", quiet=arrival != 2,
                  done=lambda: _failed(store, key) or store.check([f"{host_key}/done"]),
                  progress=(store, f"{host_key}/progress"))
    global _progress_key
    progress_key = f"{key}/rank0/progress" if rank == 0 else f"{host_key}/progress"
    _progress_key = (store, progress_key) if leads_host else None
    try:
        result = work()
    except BaseException as error:
        store.set(f"{key}/failed", f"rank {rank} failed to {what} ({one_line(error)})")
        if rank == 0:
            store.set(f"{key}/rank0", _FAILED)
        raise
    finally:
        _progress_key = None
    if rank == 0:
        store.set(f"{key}/rank0", _DONE)
    if leads_host:
        store.set(f"{host_key}/done", _DONE)
    store.add(f"{key}/finished", 1)
    _wait(f"the other ranks to {what}", quiet=rank != 0,
          done=lambda: _failed(store, key)
          or store.add(f"{key}/finished", 0) >= world_size)
    return result


def _failed(store, key: str) -> bool:
    """False, or `_failure` raised when a rank has set `<key>/failed`."""
    if store.check([f"{key}/failed"]):
        raise _failure(store, key)
    return False


def _failure(store, key: str) -> OtherRankFailed:
    """OtherRankFailed with what the rank that failed set under `<key>/failed`."""
    return OtherRankFailed(f"{store.get(f'{key}/failed').decode()}; this rank stops with it")


def _wait(whom: str, quiet: bool, done: Callable[[], bool],
          progress: tuple[object, str] | None = None) -> None:
    """Poll `done()` until it holds; unless `quiet`, log every `REPORT_SECONDS` of waiting, with
    the latest text at `progress` (store, key) when there is one."""
    started = last_report = time.monotonic()
    while True:
        try:
            if done():
                return
        except OtherRankFailed:
            raise
        except (RuntimeError, OSError) as error:  # the store's server is gone
            raise OtherRankFailed(f"lost the process group's store while waiting for {whom} "
                                  f"({error}): the rank or launcher serving it has stopped, and "
                                  f"the job's first error says why") from None
        time.sleep(POLL_SECONDS)
        if not quiet and time.monotonic() - last_report >= REPORT_SECONDS:
            last_report = time.monotonic()
            logger.info("waiting for %s: %.0f min so far (no time limit: "
                        "--distributed-timeout-minutes does not apply to this wait)%s",
                        whom, (last_report - started) / 60, _latest(progress))


def _latest(progress: tuple[object, str] | None) -> str:
    """"; <text>" of the progress key when set, else ""."""
    if progress is None:
        return ""
    store, key = progress
    return f"; {store.get(key).decode()}" if store.check([key]) else ""
