"""This process's place in its launch, as the launcher's environment gives it.

torchrun (which the SLURM script runs on each node) gives every worker RANK and WORLD_SIZE.
Before the process group starts (the flag checks, the console log's rank prefix, the stop lines
of `training.stop_together`), they are all a rank knows of its launch; without them the process
is a world of one. `parallel.initialize_parallel` starts the process group from the same
variables. Torch-free, so that the flag checks stay quick to import.
"""

from __future__ import annotations

import os


class LaunchEnvironmentError(ValueError):
    """A launch variable that is not a whole number in its range."""


def launch_rank() -> int:
    """RANK (0 without it)."""
    return _whole_number("RANK", default=0, least=0)


def launch_world_size() -> int:
    """WORLD_SIZE (1 without it)."""
    return _whole_number("WORLD_SIZE", default=1, least=1)


def _whole_number(variable: str, default: int, least: int) -> int:
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise LaunchEnvironmentError(
            f"the environment variable {variable}={text!r} is not a whole number of at least "
            f"{least}; launch with torchrun (which sets it), or unset it to run one process")
    return value
