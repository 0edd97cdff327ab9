"""--record-memory-history: Megatron-LM's record of the CUDA caching allocator, for memory_viz.

With the flag the last global rank (the one that logs, as in Megatron-LM) records every
allocation and free of the CUDA caching allocator, with its Python and C++ stack, from before the
first iteration (the last MAX_ENTRIES events are kept). It writes the allocator's snapshot, a
pickle that https://pytorch.org/memory_viz draws, to --memory-snapshot-path after every iteration
divisible by --log-interval, and a last time when training ends, however it ends: after an
out-of-memory error the snapshot shows what held the memory and the allocation that failed. Each
write replaces the file whole (a new file renamed over the old one), so a run killed mid-write
leaves the previous snapshot; a snapshot that cannot be written (a full disk) is dropped with one
line and training goes on. CUDA only: the flag checks refuse it without a GPU. Nothing here
imports torch at import time.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

from megatron_lst.training.flag_checks import ArgumentError

MAX_ENTRIES = 100_000
"""Allocator events kept (Megatron-LM's figure): the newest are kept when there are more."""
SNAPSHOT_FILENAME = "memory_snapshot.pickle"
"""--memory-snapshot-path's default, under --save."""


def validate_memory_history(args: argparse.Namespace) -> None:
    """--memory-snapshot-path only with --record-memory-history, which fills in its default
    (<--save>/memory_snapshot.pickle). ArgumentError naming the flags and the fix otherwise."""
    if args.memory_snapshot_path is not None and not args.record_memory_history:
        raise ArgumentError("--memory-snapshot-path only takes effect with "
                            "--record-memory-history: add --record-memory-history or drop it")
    if not args.record_memory_history:
        return
    if args.memory_snapshot_path is not None:
        if Path(args.memory_snapshot_path).is_dir():
            raise ArgumentError(f"--memory-snapshot-path {args.memory_snapshot_path} is a "
                                f"directory; name the snapshot file, e.g. "
                                f"{Path(args.memory_snapshot_path) / SNAPSHOT_FILENAME}")
        return
    if args.save is None:
        raise ArgumentError("--record-memory-history writes the allocator's snapshot to "
                            "--memory-snapshot-path (default: <--save>/" + SNAPSHOT_FILENAME
                            + "): give one of them")
    args.memory_snapshot_path = str(Path(args.save) / SNAPSHOT_FILENAME)


def check_cuda_memory_history(args: argparse.Namespace) -> None:
    """--record-memory-history records CUDA's allocator: it needs a GPU here."""
    import torch

    if args.record_memory_history and not torch.cuda.is_available():
        raise ArgumentError("--record-memory-history records the CUDA caching allocator, and "
                            "this machine has no CUDA device: drop the flag (on CPU, "
                            "--profile --use-pytorch-profiler shows the operators' time)")


def check_snapshot_directory_writable(args: argparse.Namespace) -> None:
    """--memory-snapshot-path's directory can be written (created if missing), before any work
    starts."""
    from megatron_lst.training.save_directory import SaveDirectoryError, check_writable

    if args.record_memory_history:
        try:
            check_writable(str(Path(args.memory_snapshot_path).parent),
                           "--memory-snapshot-path's directory", "the memory snapshots")
        except SaveDirectoryError as err:
            raise ArgumentError(str(err)) from None


class MemoryHistory:
    """The record of one rank's run that trains the iterations after `first_iteration`
    (module docstring). `path` None: this rank records nothing and every method is a no-op."""

    def __init__(self, path: Path | None, log_interval: int, first_iteration: int, rank: int):
        self.path = path
        self.log_interval = log_interval
        self.rank = rank
        self.first_iteration = first_iteration
        self._recording = False
        self._written_once = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, first_iteration: int, rank: int,
                  world_size: int) -> MemoryHistory:
        records = args.record_memory_history and rank == world_size - 1
        return cls(Path(args.memory_snapshot_path) if records else None, args.log_interval,
                   first_iteration, rank)

    def start(self) -> None:
        """Before the first iteration: the allocator starts recording."""
        if self.path is None:
            return
        import torch

        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="all",
                                                 max_entries=MAX_ENTRIES)
        self._recording = True

    def after_iteration(self, iteration: int) -> None:
        """A snapshot after every iteration this run trained that is divisible by the log
        interval."""
        if (self._recording and iteration > self.first_iteration
                and iteration % self.log_interval == 0):
            self._write(f"after iteration {iteration}")

    def close(self, last_iteration: int) -> None:
        """The last snapshot, of a run whose last finished iteration is `last_iteration` (and of
        the error that ended training if one did), and the allocator stops recording. Safe
        without `start()`."""
        if not self._recording:
            return
        import torch

        self._recording = False
        try:
            self._write(f"at the end of training, after iteration {last_iteration}", last=True)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, when: str, last: bool = False) -> None:
        """The snapshot taken `when`, to `path`; `last`: the one `close()` writes."""
        import torch

        snapshot = torch.cuda.memory._snapshot()
        partial = self.path.with_name(self.path.name + f".partial{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                pickle.dump(snapshot, file)
            os.replace(partial, self.path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            print(f"rank {self.rank}: the memory snapshot {when} could not be written to "
                  f"{self.path} ({error}); training goes on without it", flush=True)
            return
        if last:
            print(f"rank {self.rank}: last memory snapshot, {when}, written to {self.path}",
                  flush=True)
        elif not self._written_once:
            print(f"rank {self.rank}: memory snapshot {when} written to {self.path} (open it at "
                  f"https://pytorch.org/memory_viz); rewritten every --log-interval iterations "
                  f"and when training ends", flush=True)
        self._written_once = True
