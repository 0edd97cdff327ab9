"""--profile and --manual-gc: Megatron-LM's profiler window and manual garbage collection.

The loop calls `IterationHooks.before_iteration(n)` before iteration n (1-based, the number the
log line shows), runs validation inside `evaluation()`, and `close()`s the hooks when training
ends, however it ends. The hooks also drive --record-memory-history (`memory_history`).

--profile profiles the iterations --profile-step-start .. --profile-step-end - 1 (that many
iterations: Megatron-LM's PyTorch-profiler window) on the global ranks --profile-ranks, counted
across resumes (a run resumed past the window profiles nothing):

    --use-pytorch-profiler   torch.profiler over the window, the iteration before it warming the
                             profiler up; each profiled rank writes one Chrome / TensorBoard trace,
                             rank<R>.iterations_<first>-<last>.<ns>.pt.trace.json, to
                             --profile-dir. Its ProfilerStep#k marks this run's k-th iteration
                             (the logged iteration unless the run resumed).
    without it               torch.cuda.profiler.start() before the window and stop() after it,
                             with NVTX ranges for every operator (torch.autograd.profiler.emit_nvtx)
                             in between, for `nsys profile --capture-range=cudaProfilerApi`; CUDA
                             only (the flag checks refuse it without a GPU).

--manual-gc turns Python's automatic garbage collection off for the training loop and collects
on every rank at the same points instead, so that no rank stalls the others' collectives with a
collection of its own: once before the first iteration, after every iteration divisible by
--manual-gc-interval (0: none), and around each validation (a full collection before, the
youngest generation after; off with --no-manual-gc-eval). `close()` turns automatic collection
back on. Nothing here imports torch at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_lst.training.flag_checks import ArgumentError
from megatron_lst.training.memory_history import MemoryHistory

PROFILE_DEFAULTS = {"profile_step_start": 10, "profile_step_end": 12, "profile_ranks": [0]}
"""Megatron-LM's defaults of the window and ranks flags, which take effect with --profile only."""
PROFILE_SUBDIRECTORY = "profile"
"""--profile-dir's default under --save when there is no --tensorboard-dir."""


# --- the flag checks ---------------------------------------------------------------------

def validate_profiling(args: argparse.Namespace, world_size: int) -> None:
    """The --profile and --manual-gc flags describe a run; fills in the profiler window's and
    ranks' defaults and `profile_dir`. ArgumentError naming the flags and the fix otherwise."""
    _require_switch(args.profile, "--profile", {
        "--use-pytorch-profiler": args.use_pytorch_profiler,
        "--profile-step-start": args.profile_step_start is not None,
        "--profile-step-end": args.profile_step_end is not None,
        "--profile-ranks": args.profile_ranks is not None,
        "--profile-dir": args.profile_dir is not None})
    _require_switch(args.use_pytorch_profiler, "--use-pytorch-profiler", {
        "--profile-dir": args.profile_dir is not None})
    _require_switch(args.manual_gc, "--manual-gc", {
        "--manual-gc-interval": args.manual_gc_interval != 0,
        "--no-manual-gc-eval": not args.manual_gc_eval})
    if args.manual_gc_interval < 0:
        raise ArgumentError(f"--manual-gc-interval must be >= 0 (0: collect only around "
                            f"validation), got {args.manual_gc_interval}")
    if not args.profile:
        return
    for flag, default in PROFILE_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    start, end = args.profile_step_start, args.profile_step_end
    if start < 1 or end <= start:
        raise ArgumentError(
            f"--profile-step-start {start} and --profile-step-end {end} must satisfy 1 <= start "
            f"< end: the iterations start .. end - 1 are profiled (the first is 1)")
    if start > args.train_iters:
        raise ArgumentError(
            f"--profile-step-start {start} is past --train-iters {args.train_iters}: nothing "
            f"would be profiled; lower it")
    outside = sorted({rank for rank in args.profile_ranks if not 0 <= rank < world_size})
    if outside:
        raise ArgumentError(
            f"--profile-ranks {' '.join(map(str, outside))}: not a global rank of this launch "
            f"of {world_size} processes (ranks 0 .. {world_size - 1})")
    if args.use_pytorch_profiler and args.profile_dir is None:
        args.profile_dir = args.tensorboard_dir or (
            str(Path(args.save) / PROFILE_SUBDIRECTORY) if args.save is not None else None)
        if args.profile_dir is None:
            raise ArgumentError(
                "--use-pytorch-profiler writes a trace per profiled rank to --profile-dir "
                "(default: --tensorboard-dir, else <--save>/profile): give one of them")


def _require_switch(switched_on: bool, switch: str, given: dict[str, bool]) -> None:
    """ArgumentError for the flags of `given` (flag -> whether it was given) that only take
    effect with `switch` when `switch` is off."""
    needless = [flag for flag, is_given in given.items() if is_given]
    if needless and not switched_on:
        raise ArgumentError(f"{', '.join(needless)} only {'takes' if len(needless) == 1 else 'take'}"
                            f" effect with {switch}: add {switch} or drop "
                            f"{'it' if len(needless) == 1 else 'them'}")


def check_cuda_profiler(args: argparse.Namespace) -> None:
    """--profile without --use-pytorch-profiler drives CUDA's profiler: it needs a GPU here."""
    import torch

    if args.profile and not args.use_pytorch_profiler and not torch.cuda.is_available():
        raise ArgumentError(
            "--profile without --use-pytorch-profiler starts CUDA's profiler for `nsys profile "
            "--capture-range=cudaProfilerApi`, and this machine has no CUDA device: add "
            "--use-pytorch-profiler for a PyTorch trace")


def check_profile_dir_writable(args: argparse.Namespace) -> None:
    """--profile-dir can be written (created if missing), before any work starts."""
    from megatron_lst.training.save_directory import SaveDirectoryError, check_writable

    if args.profile and args.use_pytorch_profiler:
        try:
            check_writable(args.profile_dir, "--profile-dir", "the profiler's traces")
        except SaveDirectoryError as err:
            raise ArgumentError(str(err)) from None


# --- the hooks of the training loop ------------------------------------------------------

class IterationHooks:
    """What --profile and --manual-gc do around the iterations of one run (module docstring)."""

    def __init__(self, profiler: _TorchProfilerWindow | _CudaProfilerWindow | None,
                 manual_gc: ManualGC, memory_history: MemoryHistory):
        self._profiler = profiler
        self._manual_gc = manual_gc
        self._memory_history = memory_history

    @classmethod
    def from_args(cls, args: argparse.Namespace, first_iteration: int, rank: int,
                  world_size: int) -> IterationHooks:
        """The hooks of global rank `rank` of `world_size` in a run that trains the iterations
        after `first_iteration` (0, or the iteration it resumed at)."""
        profiler = None
        if args.profile and rank in args.profile_ranks:
            window = range(max(args.profile_step_start, first_iteration + 1),
                           args.profile_step_end)
            if not window:
                print(f"rank {rank}: not profiling: the run resumed after iteration "
                      f"{first_iteration}, past --profile-step-end {args.profile_step_end}",
                      flush=True)
            elif args.use_pytorch_profiler:
                profiler = _TorchProfilerWindow(window, first_iteration, rank,
                                                Path(args.profile_dir))
            else:
                profiler = _CudaProfilerWindow(window, rank)
        return cls(profiler,
                   ManualGC(args.manual_gc, args.manual_gc_interval, args.manual_gc_eval,
                            first_iteration),
                   MemoryHistory.from_args(args, first_iteration, rank, world_size))

    def start(self) -> None:
        """Before the first iteration."""
        self._manual_gc.start()
        self._memory_history.start()
        if self._profiler is not None:
            self._profiler.start()

    def before_iteration(self, iteration: int) -> None:
        """Between iteration - 1 (with its validation and checkpoint) and `iteration`."""
        self._manual_gc.after_iteration(iteration - 1)
        self._memory_history.after_iteration(iteration - 1)
        if self._profiler is not None:
            self._profiler.before_iteration(iteration)

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        """Around a validation."""
        return self._manual_gc.evaluation()

    def close(self, last_iteration: int) -> None:
        """After the last iteration, or on the error that stopped training (`last_iteration`:
        the last finished one): ends the profiler window (writing the trace of the iterations
        it recorded), writes the last memory snapshot and turns automatic garbage collection
        back on. Safe to call without `start()`."""
        try:
            if self._profiler is not None:
                self._profiler.close()
        finally:
            try:
                self._memory_history.close(last_iteration)
            finally:
                self._manual_gc.restore()


class ManualGC:
    """Megatron-LM's --manual-gc: automatic collection off, full collections at fixed points
    of a run that trains the iterations after `first_iteration`. Without the flag (`enabled`
    False) every method is a no-op."""

    def __init__(self, enabled: bool, interval: int, around_evaluation: bool,
                 first_iteration: int):
        self.enabled = enabled
        self.interval = interval
        self.around_evaluation = around_evaluation
        self.first_iteration = first_iteration
        self._was_enabled = False

    def start(self) -> None:
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        """A full collection after every iteration divisible by the interval that this run
        trained (`start()` has just collected before the first)."""
        if (self.enabled and self.interval and iteration > self.first_iteration
                and iteration % self.interval == 0):
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """A full collection before a validation, and one of the objects it made after."""
        collect = self.enabled and self.around_evaluation
        if collect:
            gc.collect()
        yield
        if collect:
            gc.collect(generation=0)

    def restore(self) -> None:
        """Automatic collection back on, if it was on at `start()`."""
        if self._was_enabled:
            gc.enable()
        self._was_enabled = False


class _TorchProfilerWindow:
    """--use-pytorch-profiler: torch.profiler over the iterations of `window`."""

    def __init__(self, window: range, first_iteration: int, rank: int, directory: Path):
        self.window = window
        self.rank = rank
        self.directory = directory
        self._first_iteration = first_iteration
        self._last_recorded: int | None = None
        self._profiler = None

    def start(self) -> None:
        import torch

        # torch's schedule counts the profiler's steps: step k is this run's k-th iteration (the
        # loop calls `step()` before each one); the step before the window warms it up.
        first_step = self.window.start - self._first_iteration
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=first_step - 1, warmup=1,
                                             active=len(self.window), repeat=1),
            on_trace_ready=self._write_trace, record_shapes=True, with_stack=True)
        self._profiler.start()

    def before_iteration(self, iteration: int) -> None:
        if self._profiler is None:
            return
        if iteration == self.window.stop:
            self.close()
            return
        self._profiler.step()
        if iteration in self.window:
            self._last_recorded = iteration

    def close(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()

    def _write_trace(self, profiler) -> None:
        """The trace, to a new file; a trace that cannot be written (a full disk) is dropped
        with one line and training goes on."""
        first, last = self.window.start, self._last_recorded
        path = self.directory / (f"rank{self.rank}.iterations_{first}-{last}."
                                 f"{time.time_ns()}.pt.trace.json")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(path))
        except OSError as error:
            print(f"rank {self.rank}: the profile of iterations {first}-{last} could not be "
                  f"written to {path} ({error}); training goes on without it", flush=True)
            return
        print(f"rank {self.rank}: profile of iterations {first}-{last} written to {path}",
              flush=True)


class _CudaProfilerWindow:
    """--profile without --use-pytorch-profiler: CUDA's profiler API (for nsys) over `window`."""

    def __init__(self, window: range, rank: int):
        self.window = window
        self.rank = rank
        self._nvtx: contextlib.ExitStack | None = None

    def start(self) -> None:
        """Nothing before the window."""

    def before_iteration(self, iteration: int) -> None:
        if iteration == self.window.start:
            import torch

            torch.cuda.profiler.start()
            self._nvtx = contextlib.ExitStack()
            self._nvtx.enter_context(torch.autograd.profiler.emit_nvtx(record_shapes=True))
            print(f"rank {self.rank}: CUDA profiler started before iteration {iteration}",
                  flush=True)
        elif iteration == self.window.stop:
            self.close()

    def close(self) -> None:
        nvtx, self._nvtx = self._nvtx, None
        if nvtx is not None:
            import torch

            nvtx.close()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"rank {self.rank}: CUDA profiler stopped", flush=True)
