"""ArgumentError and the small checks that `lst-train`'s flag validation is built from.

`arguments.parse_args` raises ArgumentError for a flag it cannot take; `arguments.validate_args`
runs the checks of `validation` and `checkpoint_flags`, which raise it naming the flags and the
fix. `lst-train` exits with status 2 on it (`cli.main`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator


class ArgumentError(ValueError):
    """A flag value or a combination of flags that cannot run; the message says which and why."""

    # Whether every rank of a launch raises it alike, worked out from the flags alone (which
    # every rank is given alike): `lst-train` prints it on rank 0 alone. False for the refusals
    # of what a rank reads (`seen_by_this_rank`).
    same_on_every_rank = True


@contextlib.contextmanager
def seen_by_this_rank() -> Iterator[None]:
    """Marks the ArgumentErrors raised in the block as not `same_on_every_rank`: the checks in
    it read what this rank sees (files, directories, its GPUs and installed packages), which
    another node of the launch may see otherwise."""
    try:
        yield
    except ArgumentError as error:
        error.same_on_every_rank = False
        raise


def flag_name(dest: str) -> str:
    """The flag of an argparse destination: `micro_batch_size` -> `--micro-batch-size`."""
    return "--" + dest.replace("_", "-")


def require(args: argparse.Namespace, *dests: str) -> None:
    """ArgumentError naming every flag of `dests` that was not given."""
    missing = [flag_name(d) for d in dests if getattr(args, d) is None]
    if missing:
        raise ArgumentError(
            f"missing {', '.join(missing)}: give them on the command line, in the --config "
            f"YAML, or pick a --preset for the model sizes"
        )


def require_positive(args: argparse.Namespace, *dests: str) -> None:
    """ArgumentError for the first flag of `dests` given below 1."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ArgumentError(f"{flag_name(dest)} must be at least 1, got {value}")
