"""A step every rank takes on its own, whose failure on any rank stops every rank.

A rank that fails such a step (opening the log writers, reading its copy of the training data)
and stops alone leaves the others waiting for it in their next collective, which breaks with a
gloo traceback ('Connection closed by peer') once it has exited. So each rank hands in its
outcome in one collective, `share_or_stop`, and every rank raises the same error when any rank
failed. A step that rank 0 alone takes is `checkpointing.on_rank0`; a wait on the store that a
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
