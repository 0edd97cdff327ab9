"""Training log: Megatron-style lines, TensorBoard scalars, Weights & Biases, a progress bar.

Every iteration the training loop hands `TrainingLogger.on_iteration` what it measured; every
`--log-interval` iterations the logger averages the interval and emits one line like Megatron-LM's:

    [2026-01-01 12:00:00] iteration  100/1000 | consumed samples:          400 | elapsed time per
    iteration (ms): 812.3 | learning rate: 3.000000E-04 | global batch size:     4 | lm loss:
    4.812345E+00 | loss scale: 1.0 | grad norm: 0.912 | tokens/s: 1234.5 | global positions/s:
    80.1 | TFLOP/s/device: 0.12 | number of skipped iterations:   0 | number of nan iterations:   0 |

(one line in practice; MFU is added on GPUs whose peak `training.device_peak` knows). The same
values go to TensorBoard and W&B as scalars against the iteration.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from megatron_lst.training.args_json import args_to_dict

OPTIONAL_PACKAGES = {"tensorboard": "--tensorboard-dir", "wandb": "--wandb-project"}


# megatron.core loggers whose INFO messages dump configurations (DDP, optimizer), every
# parameter name of each gradient bucket, and the index reader's steps for each dataset it opens.
QUIET_MEGATRON_LOGGERS = ("megatron.core.datasets.indexed_dataset", "megatron.core.distributed",
                          "megatron.core.optimizer")


def configure_console_logging(rank: int) -> None:
    """Logging of a training process: rank 0 logs INFO, the other ranks WARNING, each line tagged
    with the rank; megatron.core's configuration dumps (`QUIET_MEGATRON_LOGGERS`) only at WARNING."""
    import logging

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    for name in QUIET_MEGATRON_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def note_missing_fused_kernels() -> None:
    """Say once (INFO: rank 0) which optional fused-kernel packages are missing; megatron.core's
    own warnings about them are filtered in `megatron_lst/__init__.py`. Called once the flags are
    valid, so that `--help` and a refused flag print nothing else."""
    import logging

    missing = [name for name, module in (("Transformer Engine", "transformer_engine"),
                                         ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if missing:
        logging.getLogger(__name__).info(
            "%s not installed: megatron.core uses its PyTorch fallbacks", " and ".join(missing))


class LoggingSetupError(RuntimeError):
    """A logging flag whose optional package is missing, or whose writer (TensorBoard, a W&B
    run) cannot be opened."""


def require_optional_package(package: str) -> None:
    """Raise LoggingSetupError naming the flag and the pip command when `package` is missing."""
    if importlib.util.find_spec(package) is None:
        raise LoggingSetupError(
            f"{OPTIONAL_PACKAGES[package]} needs the {package!r} package, which is not "
            f"installed; run `pip install {package}` or drop {OPTIONAL_PACKAGES[package]}"
        )


@dataclass(frozen=True)
class IntervalSummary:
    """The averages of one log interval: what a log line and the scalars show."""

    iteration: int
    train_iters: int
    consumed_samples: int
    global_batch_size: int
    ms_per_iteration: float
    learning_rate: float
    losses: dict[str, float]
    """Mean of each loss over the interval's iterations that were neither skipped nor NaN."""
    grad_norm: float | None
    loss_scale: float | None
    tokens_per_s: float
    global_positions_per_s: float
    tflops_per_device: float | None
    mfu: float | None
    skipped_iterations: int
    nan_iterations: int

    def scalars(self) -> dict[str, float]:
        """The values as TensorBoard / W&B scalars (None values left out)."""
        values: dict[str, float | None] = {
            "learning-rate": self.learning_rate,
            "consumed-samples": self.consumed_samples,
            "iteration-time-ms": self.ms_per_iteration,
            "grad-norm": self.grad_norm,
            "loss-scale": self.loss_scale,
            "throughput/tokens-per-s": self.tokens_per_s,
            "throughput/global-positions-per-s": self.global_positions_per_s,
            "throughput/tflops-per-device": self.tflops_per_device,
            "throughput/mfu": self.mfu,
            "skipped-iterations": self.skipped_iterations,
            "nan-iterations": self.nan_iterations,
        }
        values.update({f"loss/{name}": value for name, value in self.losses.items()})
        return {name: float(value) for name, value in values.items() if value is not None}


def format_log_line(summary: IntervalSummary, now: datetime | None = None) -> str:
    """Megatron-LM's training log line for one interval."""
    now = now if now is not None else datetime.now()
    width = len(str(summary.train_iters))
    parts = [
        f"[{now:%Y-%m-%d %H:%M:%S}] iteration {summary.iteration:>{width}}/{summary.train_iters}",
        f"consumed samples: {summary.consumed_samples:>12}",
        f"elapsed time per iteration (ms): {summary.ms_per_iteration:.1f}",
        f"learning rate: {summary.learning_rate:.6E}",
        f"global batch size: {summary.global_batch_size:>5}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in summary.losses.items()]
    if summary.loss_scale is not None:
        parts.append(f"loss scale: {summary.loss_scale:.1f}")
    if summary.grad_norm is not None:
        parts.append(f"grad norm: {summary.grad_norm:.3f}")
    parts.append(f"tokens/s: {summary.tokens_per_s:.1f}")
    parts.append(f"global positions/s: {summary.global_positions_per_s:.1f}")
    if summary.tflops_per_device is not None:
        parts.append(f"TFLOP/s/device: {summary.tflops_per_device:.2f}")
    if summary.mfu is not None:
        parts.append(f"MFU: {100 * summary.mfu:.1f}%")
    parts.append(f"number of skipped iterations: {summary.skipped_iterations:>3}")
    parts.append(f"number of nan iterations: {summary.nan_iterations:>3}")
    return " | ".join(parts) + " |"


@dataclass
class _Interval:
    """Sums since the last log line."""

    iterations: int = 0
    seconds: float = 0.0
    tokens: int = 0
    global_positions: int = 0
    flops: float | None = 0.0
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_counts: dict[str, int] = field(default_factory=dict)
    grad_norm_sum: float = 0.0
    grad_norm_count: int = 0
    skipped: int = 0
    nans: int = 0


class TrainingLogger:
    """Collects per-iteration measurements and writes them out every `log_interval` iterations.

    Only the rank that logs (Megatron: the last one, which holds the loss) should pass
    `enabled=True`; the others keep the same calls and write nothing. `tensorboard_writer` has
    `add_scalar(tag, value, step)` (a `torch.utils.tensorboard.SummaryWriter`), `wandb_run` has
    `log(dict, step=...)`; `build_training_logger` makes both from the flags. MFU is the model
    FLOP/s per device over `peak_flops` (one device's peak; None on CPU: no MFU).
    """

    def __init__(self, *, train_iters: int, log_interval: int, global_batch_size: int,
                 seq_length: int, world_size: int, start_iteration: int = 0,
                 peak_flops: float | None = None, enabled: bool = True,
                 progress_bar: bool = False, tensorboard_writer: Any = None,
                 wandb_run: Any = None, stream: TextIO | None = None) -> None:
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.global_batch_size = global_batch_size
        self.positions_per_iteration = global_batch_size * seq_length
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.enabled = enabled
        self.tensorboard_writer = tensorboard_writer if enabled else None
        self.wandb_run = wandb_run if enabled else None
        self.stream = stream if stream is not None else sys.stdout
        self._interval = _Interval()
        self._progress = None
        if enabled and progress_bar:
            from tqdm import tqdm

            self._progress = tqdm(total=train_iters, initial=start_iteration, unit="it",
                                  dynamic_ncols=True, file=self.stream)

    def on_iteration(self, iteration: int, *, consumed_samples: int, learning_rate: float,
                     losses: Mapping[str, float], step_seconds: float, num_tokens: int,
                     grad_norm: float | None = None, loss_scale: float | None = None,
                     flops: float | None = None, skipped: bool = False) -> IntervalSummary | None:
        """Record iteration `iteration` (1-based: iterations done); returns the interval summary
        when this iteration ends a log interval, else None.

        `losses`: this iteration's losses by name (e.g. {"lm loss": 4.2}); `num_tokens`: real
        tokens of the global batch; `flops`: model FLOPs of the global batch (None: no TFLOP/s);
        `skipped`: the optimizer skipped the update (fp16 overflow).
        """
        interval = self._interval
        interval.iterations += 1
        interval.seconds += step_seconds
        interval.tokens += num_tokens
        interval.global_positions += self.positions_per_iteration
        interval.flops = (interval.flops + flops
                          if interval.flops is not None and flops is not None else None)
        finite = all(math.isfinite(v) for v in losses.values())
        if skipped:
            interval.skipped += 1
        elif not finite:
            interval.nans += 1
        else:
            for name, value in losses.items():
                interval.loss_sums[name] = interval.loss_sums.get(name, 0.0) + value
                interval.loss_counts[name] = interval.loss_counts.get(name, 0) + 1
            if grad_norm is not None:
                interval.grad_norm_sum += grad_norm
                interval.grad_norm_count += 1
        if self._progress is not None:
            self._progress.update(1)
            if finite and losses:
                self._progress.set_postfix({n: f"{v:.4f}" for n, v in losses.items()},
                                           refresh=False)
        if iteration % self.log_interval and iteration != self.train_iters:
            return None
        summary = self._summarise(iteration, consumed_samples, learning_rate, loss_scale)
        self._interval = _Interval()
        if self.enabled:
            self._write(summary)
        return summary

    def _summarise(self, iteration: int, consumed_samples: int, learning_rate: float,
                   loss_scale: float | None) -> IntervalSummary:
        interval = self._interval
        seconds = max(interval.seconds, 1e-12)
        tflops_per_device = per_device_per_s = None
        if interval.flops is not None:
            per_device_per_s = interval.flops / seconds / self.world_size
            tflops_per_device = per_device_per_s / 1e12
        return IntervalSummary(
            iteration=iteration,
            train_iters=self.train_iters,
            consumed_samples=consumed_samples,
            global_batch_size=self.global_batch_size,
            ms_per_iteration=1e3 * interval.seconds / interval.iterations,
            learning_rate=learning_rate,
            losses={name: total / interval.loss_counts[name]
                    for name, total in interval.loss_sums.items()},
            grad_norm=(interval.grad_norm_sum / interval.grad_norm_count
                       if interval.grad_norm_count else None),
            loss_scale=loss_scale,
            tokens_per_s=interval.tokens / seconds,
            global_positions_per_s=interval.global_positions / seconds,
            tflops_per_device=tflops_per_device,
            mfu=(per_device_per_s / self.peak_flops
                 if per_device_per_s is not None and self.peak_flops is not None else None),
            skipped_iterations=interval.skipped,
            nan_iterations=interval.nans,
        )

    def _write(self, summary: IntervalSummary) -> None:
        line = format_log_line(summary)
        if self._progress is not None:
            self._progress.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        scalars = summary.scalars()
        if self.tensorboard_writer is not None and not _sent(
                "--tensorboard-dir", self._to_tensorboard, scalars, summary.iteration):
            self.tensorboard_writer = None
        if self.wandb_run is not None and not _sent(
                "--wandb-project", self._to_wandb, scalars, summary.iteration):
            self.wandb_run = None

    def _to_tensorboard(self, scalars: dict[str, float], iteration: int) -> None:
        for tag, value in scalars.items():
            self.tensorboard_writer.add_scalar(tag, value, iteration)
        self.tensorboard_writer.flush()

    def _to_wandb(self, scalars: dict[str, float], iteration: int) -> None:
        self.wandb_run.log(scalars, step=iteration)

    def close(self) -> None:
        """Close the progress bar and flush and close the writers. A writer that fails to close
        is reported in one error line (`_closed`) and the run's outcome stays what it was."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.tensorboard_writer is not None:
            _closed("--tensorboard-dir", self.tensorboard_writer.close)
            self.tensorboard_writer = None
        if self.wandb_run is not None:
            _closed("--wandb-project", self.wandb_run.finish)
            self.wandb_run = None


def _closed(flag: str, close) -> None:
    """Run `close` (the writer of `flag`'s close or finish). One that fails (TensorBoard
    flushing onto a full disk, W&B's service gone) is reported once and not raised: training and
    its last save are done, and raising failed the logging rank alone while the others exited 0."""
    try:
        close()
    except Exception as error:  # TensorBoard and W&B raise errors of their own
        import logging

        logging.getLogger(__name__).error(
            "%s: closing the writer at the end of the run failed (%s: %s); the scalars it had "
            "not flushed are lost (the log lines keep them)", flag, type(error).__name__, error)


def _sent(flag: str, send, scalars: dict[str, float], iteration: int) -> bool:
    """Whether `send(scalars, iteration)` wrote the scalars of the writer of `flag`. One that
    fails (a full disk under --tensorboard-dir, W&B's service gone) is reported once and the run
    goes on without it: only the logging rank writes, and raising there left the other ranks
    waiting for it in their next collective. The log lines keep the values."""
    try:
        send(scalars, iteration)
    except Exception as error:  # TensorBoard and W&B raise errors of their own
        import logging

        logging.getLogger(__name__).error(
            "%s: writing the scalars of iteration %d failed (%s: %s); no more scalars go there "
            "this run (the log lines keep them)", flag, iteration, type(error).__name__, error)
        return False
    return True


def build_training_logger(args: argparse.Namespace, *, world_size: int, enabled: bool,
                          start_iteration: int = 0, peak_flops: float | None = None,
                          stream: TextIO | None = None) -> TrainingLogger:
    """The logger the flags describe: TensorBoard under `--tensorboard-dir`, W&B for
    `--wandb-project`, and a progress bar when `stream` is a terminal and `--no-progress-bar` is
    not given. Writers are created only where `enabled` (the logging rank). `peak_flops` (one
    device's peak FLOP/s, for MFU) defaults to `training.device_peak.device_peak_flops()` on CUDA,
    in the precision the run multiplies in (--bf16, --fp16, else fp32 or TF32)."""
    import torch

    stream = stream if stream is not None else sys.stdout
    if peak_flops is None and torch.cuda.is_available():
        from megatron_lst.training.device_peak import device_peak_flops, matmul_precision

        peak_flops = device_peak_flops(precision=matmul_precision(args.bf16, args.fp16))
    tensorboard_writer = wandb_run = None
    if enabled and args.tensorboard_dir is not None:
        require_optional_package("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        tensorboard_writer = SummaryWriter(log_dir=args.tensorboard_dir)
    if enabled and args.wandb_project is not None:
        require_optional_package("wandb")
        wandb = importlib.import_module("wandb")
        wandb_run = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                               config=args_to_dict(args))
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    return TrainingLogger(
        train_iters=args.train_iters, log_interval=args.log_interval,
        global_batch_size=args.global_batch_size, seq_length=args.seq_length,
        world_size=world_size, start_iteration=start_iteration, peak_flops=peak_flops,
        enabled=enabled, progress_bar=interactive and not args.no_progress_bar,
        tensorboard_writer=tensorboard_writer, wandb_run=wandb_run, stream=stream,
    )

