"""Ranks that stop on an error each say why before the launcher ends them.

A launcher (torchrun, SLURM) ends every rank once one has exited. When several ranks stop on an
error (one refused --save, raised alike on every rank after a broadcast; a rank that stops
because another failed to build the datasets), the first to exit cut the others off before they
had printed their own line: a run's output then held one rank's reason, or none from the rank
that mattered, depending on which rank the machine's load let finish first.

So a rank that stops calls `stop_with_the_others()` once it has said why: it counts itself into
a key of the process group's store and waits, at most `STOP_WAIT_SECONDS`, until every rank has
counted itself in. A rank that stops alone (the others are in a collective or at work that ends
later) thus exits `STOP_WAIT_SECONDS` late, and no rank waits on a store whose server is gone.

`arm()`, a collective, runs where every rank is in step (right after the process group starts,
in `pretrain`, lst-eval and lst-generate): the key must be known before an error, when the ranks
may be anywhere, and it must be new for each elastic attempt (see `attempt_token`). It outlives
the process group, which the training loop destroys before lst-train prints.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import sys
import time

import torch

from megatron_lst.parallel import has_other_ranks

# How long a rank that stops waits for the other ranks to say that they stop too.
STOP_WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
_arms = itertools.count()  # every rank arms as often, in the same order
# (store, key, world size) where this process counts itself in when it stops; None: alone.
_armed: tuple[object, str, int] | None = None


@functools.cache
def attempt_token() -> str:
    """Collective (once per process): a token rank 0 draws and every rank of the default process
    group learns (one broadcast, the first time), naming this attempt's store keys. An elastic
    restart may keep the last attempt's store, and its restart counts differ between nodes (an
    agent whose workers were healthy restarts them without counting a failure), so neither the
    call order nor TORCHELASTIC_RESTART_COUNT tells attempts apart on every rank alike."""
    token = [secrets.token_hex(8) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def arm() -> None:
    """Collective: remember the default process group's store, world size and a fresh key for
    `stop_with_the_others`. Without a process group of several ranks, there is nobody to wait
    for."""
    global _armed
    if not has_other_ranks():
        _armed = None
        return
    from torch.distributed.distributed_c10d import _get_default_store

    _armed = (_get_default_store(), f"lst_stop_together/{attempt_token()}/{next(_arms)}",
              torch.distributed.get_world_size())


def say_why(line: str) -> None:
    """Write `line` and its newline to stderr in one write. The ranks of a launcher share one
    log, and Python's stderr writes through to the file at every call: `print`'s two writes
    (the text, then the newline) let two ranks' stop lines run together into one line."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def stop_with_the_others() -> None:
    """Count this rank in as stopping (call it once it has printed why) and wait until every
    rank of the armed process group has, for at most `STOP_WAIT_SECONDS`. Once only per
    `arm()`; a no-op without one."""
    global _armed
    if _armed is None:
        return
    store, key, world_size = _armed
    _armed = None
    wait_for_every_rank(store, key, world_size)


def wait_for_every_rank(store, key: str, world_size: int) -> None:
    """`stop_with_the_others` on an explicit `store` (a `torch.distributed.Store` every rank
    shares) under `key`, for `world_size` ranks."""
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    try:
        stopped = store.add(key, 1)
        while stopped < world_size and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            stopped = store.add(key, 0)
    except (RuntimeError, OSError):  # the store's server is gone: nobody to wait for
        pass
