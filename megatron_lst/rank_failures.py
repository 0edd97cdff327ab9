"""A step every rank takes on its own, whose failure on any rank stops every rank.

A rank that fails such a step (opening the log writers, reading its copy of the training data)
and stops alone leaves the others waiting for it in their next collective, which breaks with a
gloo traceback ('Connection closed by peer') once it has exited. So each rank hands in its
outcome in one collective, `share_or_stop`, and every rank raises the same error when any rank
failed. A step that rank 0 alone takes is `checkpoint_save.on_rank0`; a wait on the store that a
rank's failure ends is `rank_zero_first`. Each passes on why the failing rank failed (an error as
`one_line(error)` puts it), so that every rank's log says why, not only the failing rank's
(another node's, on a multi-node run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def share_or_stop(part: T, failure: str | None,
                  error: Callable[[list[tuple[int, str]]], Exception]) -> list[T]:
    """Collective over the default process group (one `all_gather_object`): every rank's `part`,
    in rank order, on every rank. When any rank's `failure` (why its step failed; None: it did
    not) is set, every rank raises `error(failed)` instead, `failed` holding `(rank, failure)`
    of each rank that failed, in rank order."""
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (part, failure))
    failed = [(rank, message) for rank, (_, message) in enumerate(outcomes)
              if message is not None]
    if failed:
        raise error(failed)
    return [each for each, _ in outcomes]


def one_line(error: BaseException) -> str:
    """`error` as the other ranks print it: its type and message, on one line."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def outcome(action: Callable[[], T]) -> tuple[T | None, str | None]:
    """This rank's `(part, failure)` for `share_or_stop`: `(action(), None)`, or `(None,
    one_line(error))` when `action` raised (any exception: the other ranks must not wait for
    this one). `action` must hold no collective, which the other ranks would wait in."""
    try:
        return action(), None
    except Exception as error:  # whatever it is, every rank stops with it
        return None, one_line(error)


class RankStepError(RuntimeError):
    """A step failed on some rank(s); raised alike on every rank (`step_failed`)."""


def step_failed(what: str) -> Callable[[list[tuple[int, str]]], RankStepError]:
    """`share_or_stop`'s `error` for a step whose failure reads "rank R could not <what>": a
    RankStepError naming each rank that failed and its error."""
    return lambda failed: RankStepError("; ".join(
        f"rank {rank} could not {what} ({message})" for rank, message in failed))
