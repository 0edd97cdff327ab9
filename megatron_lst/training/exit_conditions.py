"""When training stops before --train-iters: Megatron-LM's exit conditions.

    --exit-signal-handler [--exit-signal SIG ...]   a signal (default SIGTERM) received by any
                                                     rank: preemption, SLURM's --signal
    --exit-duration-in-mins M                        M minutes since `pretrain` started
    --exit-interval N                                after every iteration divisible by N

The loop asks `ExitMonitor.reason(iteration)` after each iteration (and again after a periodic
save, for a signal that came during it); a reason makes it save a checkpoint of that iteration
(with --save, unless that save was just made) and return, and `pretrain_lst.py` exits with status 0,
as Megatron-LM does: a batch script decides from the latest checkpoint whether to requeue. The
answer is the same on every rank: signals and the clock are combined over ranks by one all-reduce
(MAX) per iteration, made only when a signal or a duration is being watched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lst.parallel import collective_device


@dataclass(frozen=True)
class ExitConditions:
    """What ends a run early; empty (the default) trains to --train-iters."""

    signals: tuple[signal.Signals, ...] = ()
    duration_minutes: float | None = None
    interval: int | None = None
    saves: bool = True
    """Whether the run saves a checkpoint when it stops (it has a --save directory)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExitConditions:
        signals = ()
        if args.exit_signal_handler:
            signals = tuple(dict.fromkeys(signal.Signals[name] for name in args.exit_signal))
        return cls(signals, args.exit_duration_in_mins, args.exit_interval,
                   saves=bool(getattr(args, "save", None)))


class ExitMonitor:
    """Watches `ExitConditions` for one run; a context manager that installs the signal handlers
    (main thread only, as Python requires) and restores the previous ones on exit.

    `start_time` (`time.monotonic()`) is when the run's clock started.
    """

    def __init__(self, conditions: ExitConditions, start_time: float):
        self.conditions = conditions
        self.start_time = start_time
        self.received: signal.Signals | None = None
        self._saving = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> ExitMonitor:
        if threading.current_thread() is threading.main_thread():
            for sig in self.conditions.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def saving(self):
        """Within the block a checkpoint is being saved, after which the loop asks `reason`
        again: a signal received then stops the run with that checkpoint, not another one."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def _handle(self, signum: int, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signal.Signals(signum)
            if self._saving:
                plan = "exiting once the checkpoint being saved is written"
            elif self.conditions.saves:
                plan = "saving a checkpoint after this iteration, then exiting"
            else:
                plan = "exiting after this iteration (no --save: no checkpoint is written)"
            _say_from_handler(f"received {name}: {plan}\n")
        elif self.conditions.saves:  # a scheduler's repeated notice, or an impatient user
            _say_from_handler(f"received {name}: already stopping after this iteration's "
                              f"checkpoint (a SIGKILL before it is written loses this "
                              f"iteration's work)\n")
        else:
            _say_from_handler(f"received {name}: already stopping after this iteration\n")

    def reason(self, iteration: int) -> str | None:
        """Collective (when signals or a duration are watched): why the run stops after
        `iteration`, or None to go on. The same on every rank."""
        conditions = self.conditions
        if conditions.signals or conditions.duration_minutes is not None:
            minutes = (time.monotonic() - self.start_time) / 60
            signal_number = float(self.received) if self.received is not None else 0.0
            # [signal number received (0: none), minutes elapsed], the largest of any rank.
            flags = torch.tensor([signal_number, minutes], dtype=torch.float64,
                                 device=collective_device())
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signal_number, minutes = flags.tolist()
            if signal_number:
                return f"received {signal.Signals(int(signal_number)).name}"
            if conditions.duration_minutes is not None and minutes >= conditions.duration_minutes:
                return (f"--exit-duration-in-mins {conditions.duration_minutes:g} reached "
                        f"({minutes:.1f} minutes)")
        if conditions.interval and iteration % conditions.interval == 0:
            return f"--exit-interval {conditions.interval} reached at iteration {iteration}"
        return None


def _say_from_handler(text: str) -> None:
    """Write `text` to the process's stderr (fd 2) from a signal handler. Not through
    `sys.stderr`: a signal that interrupts a write to it (a log line into a full pipe) runs the
    handler while that stream's buffer is locked, and a `print` there raised RuntimeError
    ('reentrant call inside <_io.BufferedWriter>') in the training loop, which then crashed
    instead of saving."""
    try:
        os.write(2, text.encode())
    except OSError:  # no stderr to tell: the stop itself is what matters
        pass
