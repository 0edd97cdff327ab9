"""Checkpoint writer processes that die with the training process.

megatron.core's dist-checkpoint save forks writer processes (`FileSystemWriterAsync`
`write_preloaded_data`, one per write bucket) and collects their results through a queue served
by a spawned `multiprocessing` manager process that lives as long as the queue. Neither watches
its parent: a training process killed with SIGKILL during a save leaves the forked writers blocked
on their result queue and the manager serving nobody, for ever. The forked writers also inherit
the trainer's Python signal handlers, so the SIGTERM that would end them only sets the trainer's
stop flag in their copy.

`writers_die_with_parent()` wraps a save: every process forked inside it asks the kernel for
SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`) and ignores the stop signals meant for
the trainer, which ends them through that; the results-queue manager is started the same way
before megatron would start its own. Processes forked outside a save (data-loader workers) are
left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
"""Signals that ask the trainer to stop (`--exit-signal`, torchrun, SLURM): a writer leaves them
to the trainer and dies with it."""

_saving_pid: int | None = None
"""The process saving right now, while `writers_die_with_parent` is active; else None."""
_fork_hook_registered = False


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed (SIGKILL) when `parent_pid`, its parent, dies; exit now
    when it is already gone. Ignores the stop signals (see `_STOP_SIGNALS`). Linux only; a
    no-op elsewhere."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def writers_die_with_parent() -> Iterator[None]:
    """Within the block, processes forked by this process, and megatron's results-queue
    manager, die with it (see the module docstring). Call from the thread that saves: the
    kernel ties PR_SET_PDEATHSIG to the thread that forked."""
    global _saving_pid, _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    _start_results_queue_manager()
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None


def _after_fork_in_child() -> None:
    global _saving_pid
    if _saving_pid is not None:
        die_with_parent(_saving_pid)
        _saving_pid = os.getpid()  # a writer's own children die with it in turn


def _start_results_queue_manager() -> None:
    """Give megatron's `FileSystemWriterAsync` its process-wide results queue from a manager
    that dies with this process (megatron starts a plain `Manager()` on first use otherwise)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    # The queue proxy keeps the manager referenced, as megatron's own `Manager().Queue()` does.
    filesystem_async._results_queue = manager.Queue()
