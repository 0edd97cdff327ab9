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

The ranks of a launcher share one log, where the same refusal from each of 512 ranks buried it:
`say_why_once` does not write a line again that another rank of the armed group wrote, and
`say_why_before_arming` (the flag checks run before the process group starts) leaves a line that
every rank says alike to rank 0, as `say_why_of_the_launchers_signal` does a stop on the
launcher's signal, which every rank gets.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import secrets
import sys
import time

import torch

from megatron_lst.launch_environment import launch_rank, launch_world_size
from megatron_lst.parallel import has_other_ranks

# How long a rank that stops waits for the other ranks to say that they stop too.
STOP_WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
_arms = itertools.count()  # every rank arms as often, in the same order
# (store, key, world size, rank) where this process counts itself in when it stops, and shares
# what it says; None: alone.
_armed: tuple[object, str, int, int] | None = None


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
              torch.distributed.get_world_size(), torch.distributed.get_rank())


def say_why(line: str) -> None:
    """Write `line` and its newline to stderr in one write. The ranks of a launcher share one
    log, and Python's stderr writes through to the file at every call: `print`'s two writes
    (the text, then the newline) let two ranks' stop lines run together into one line."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def say_why_once(line: str) -> None:
    """`say_why(line)`, unless a rank of the armed process group wrote `line` already (each rank
    of a run stopping on the same error said it once more). The first line of the group is
    written as it is; a later line unlike every earlier one (a failure of its rank alone, a rank
    that stops because another failed) is prefixed with the rank that wrote it first:
    `[rank R] line`. Unarmed, or when the store's server is gone, `line` is written as it is:
    no line is ever left unwritten for want of the store. Call it before
    `stop_with_the_others`."""
    if _armed is None:
        say_why(line)
        return
    store, key, _, rank = _armed
    said = f"{key}/said/{hashlib.sha256(line.encode()).hexdigest()}"
    try:
        if store.add(said, 1) > 1:  # another rank wrote it
            return
        first = store.add(f"{key}/lines", 1) == 1
    except (RuntimeError, OSError):  # the store's server is gone: nobody to share lines with
        first = True
    say_why(line if first else f"[rank {rank}] {line}")


def say_why_before_arming(line: str, same_on_every_rank: bool) -> None:
    """`say_why(line)` before `arm()`, in a launch of the RANK and WORLD_SIZE environment
    variables (torchrun's): with no store to share lines through yet, a line that
    `same_on_every_rank` (worked out from the flags alone, which every rank is given alike) is
    written by rank 0 alone, while the other ranks wait, at most `STOP_WAIT_SECONDS`, for the
    launcher to end them once rank 0 has exited (one that exited first had rank 0 ended before
    its line), and write it themselves, prefixed with their rank (`[rank R] line`), if it has
    not. Any other line (worked out from what this rank reads: a file another node may see
    otherwise, its GPUs) is written at once, prefixed with the rank."""
    rank = launch_rank()
    if launch_world_size() == 1 or (same_on_every_rank and rank == 0):
        say_why(line)
        return
    if same_on_every_rank:
        time.sleep(STOP_WAIT_SECONDS)
    say_why(f"[rank {rank}] {line}")


def say_why_of_the_launchers_signal(line: str) -> None:
    """`say_why(line)` for a stop that a signal of the launcher caused before `arm()`: rank 0
    alone writes it. torchrun starts each worker in a session of its own (a terminal's Ctrl-C
    reaches torchrun alone), passes a SIGINT it gets to every worker and waits for each to exit:
    every rank stops on it alike, and none is ended before its line. A SIGINT sent to one worker
    of a rank R > 0 alone (`kill -INT PID`) thus leaves no line of ours; torchrun's summary
    names rank R and its exit code."""
    if launch_rank() == 0:
        say_why(line)


def stop_with_the_others() -> None:
    """Count this rank in as stopping (call it once it has printed why) and wait until every
    rank of the armed process group has, for at most `STOP_WAIT_SECONDS`. Once only per
    `arm()`; a no-op without one."""
    global _armed
    if _armed is None:
        return
    store, key, world_size, _ = _armed
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
