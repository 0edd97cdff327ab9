"""Training log: interval averages and throughput, the Megatron-style line, writers, NaN check."""

import errno
import io
import logging
import math
import re
from datetime import datetime

import pytest

from megatron_lst.training import train_logging
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.train_logging import (
    IntervalSummary,
    LoggingSetupError,
    TrainingLogger,
    build_training_logger,
    format_log_line,
)


class RecordingWriter:
    """Stands in for SummaryWriter and a W&B run: records what is written."""

    def __init__(self):
        self.scalars, self.logged, self.closed = [], [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def log(self, values, step):
        self.logged.append((dict(values), step))

    def flush(self):
        pass

    def close(self):
        self.closed = True

    def finish(self):
        self.closed = True


def make_logger(**overrides):
    settings = dict(train_iters=10, log_interval=4, global_batch_size=8, seq_length=32,
                    world_size=2, stream=io.StringIO())
    settings.update(overrides)
    return TrainingLogger(**settings)


def step(logger, iteration, loss=2.0, **overrides):
    values = dict(consumed_samples=8 * iteration, learning_rate=1e-3, losses={"lm loss": loss},
                  step_seconds=0.5, num_tokens=1000, grad_norm=1.0, flops=4e12)
    values.update(overrides)
    return logger.on_iteration(iteration, **values)


def test_interval_averages_and_throughput():
    logger = make_logger()
    assert step(logger, 1, loss=1.0, grad_norm=0.5) is None
    assert step(logger, 2, loss=2.0, grad_norm=1.5, step_seconds=1.5) is None
    assert step(logger, 3, loss=math.nan) is None  # a NaN iteration: counted, not averaged
    summary = step(logger, 4, skipped=True, loss=1e9)  # skipped: counted, not averaged
    assert summary.losses == {"lm loss": pytest.approx(1.5)}
    assert summary.grad_norm == pytest.approx(1.0)
    assert (summary.nan_iterations, summary.skipped_iterations) == (1, 1)
    seconds = 0.5 + 1.5 + 0.5 + 0.5
    assert summary.ms_per_iteration == pytest.approx(1e3 * seconds / 4)
    assert summary.tokens_per_s == pytest.approx(4 * 1000 / seconds)
    assert summary.global_positions_per_s == pytest.approx(4 * 8 * 32 / seconds)
    assert summary.tflops_per_device == pytest.approx(4 * 4e12 / seconds / 2 / 1e12)
    assert summary.mfu is None  # no peak known (CPU)
    assert summary.consumed_samples == 32


def test_next_interval_starts_fresh_and_last_iteration_always_logs():
    logger = make_logger()
    for i in range(1, 5):
        step(logger, i, loss=10.0)
    for i in range(5, 10):
        summary = step(logger, i, loss=float(i))
        assert (summary is not None) == (i == 8)
        if i == 8:
            assert summary.losses["lm loss"] == pytest.approx(6.5)  # iterations 5..8 only
    last = step(logger, 10, loss=10.0)
    assert last is not None and last.losses["lm loss"] == pytest.approx(9.5)


def test_mfu_with_a_known_peak_and_no_flops_without_a_count():
    logger = make_logger(log_interval=1, peak_flops=1e12, world_size=1)
    summary = step(logger, 1, flops=0.25e12, step_seconds=1.0)
    assert summary.mfu == pytest.approx(0.25)
    assert step(make_logger(log_interval=1), 1, flops=None).tflops_per_device is None


def test_log_line_matches_megatron_layout():
    summary = IntervalSummary(
        iteration=40, train_iters=100, consumed_samples=320, global_batch_size=8,
        ms_per_iteration=812.34, learning_rate=3e-4, losses={"lm loss": 4.8123456},
        grad_norm=0.91234, loss_scale=1.0, tokens_per_s=1234.56, global_positions_per_s=80.12,
        tflops_per_device=0.1234, mfu=0.4123, skipped_iterations=0, nan_iterations=2)
    line = format_log_line(summary, now=datetime(2026, 1, 2, 3, 4, 5))
    assert line.startswith("[2026-01-02 03:04:05] iteration  40/100 | consumed samples:")
    for part in ("elapsed time per iteration (ms): 812.3", "learning rate: 3.000000E-04",
                 "global batch size:     8", "lm loss: 4.812346E+00", "loss scale: 1.0",
                 "grad norm: 0.912", "tokens/s: 1234.6", "global positions/s: 80.1",
                 "TFLOP/s/device: 0.12", "MFU: 41.2%", "number of skipped iterations:   0",
                 "number of nan iterations:   2"):
        assert f"| {part} |" in line, part
    assert line.endswith(" |") and "\n" not in line


def test_writes_line_and_scalars_only_when_enabled():
    stream, writer, run = io.StringIO(), RecordingWriter(), RecordingWriter()
    logger = make_logger(log_interval=2, stream=stream, tensorboard_writer=writer, wandb_run=run)
    step(logger, 1)
    assert stream.getvalue() == "" and writer.scalars == []
    step(logger, 2)
    assert re.search(r"iteration\s+2/10 \| consumed samples:\s+16 \|", stream.getvalue())
    tags = {tag for tag, _, at in writer.scalars if at == 2}
    assert {"loss/lm loss", "learning-rate", "grad-norm", "throughput/tokens-per-s",
            "throughput/global-positions-per-s", "throughput/tflops-per-device"} <= tags
    assert "throughput/mfu" not in tags and "loss-scale" not in tags  # None values left out
    assert run.logged == [({t: v for t, v, _ in writer.scalars}, 2)]
    logger.close()
    assert writer.closed and run.closed

    quiet_stream, quiet_writer = io.StringIO(), RecordingWriter()
    quiet = make_logger(log_interval=1, stream=quiet_stream, tensorboard_writer=quiet_writer,
                        enabled=False)
    assert step(quiet, 1) is not None
    assert quiet_stream.getvalue() == "" and quiet_writer.scalars == []


class FullDiskWriter(RecordingWriter):
    def add_scalar(self, tag, value, step):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_scalar_writer_that_fails_is_dropped_and_the_run_goes_on(caplog):
    """A TensorBoard write failing on a full disk raised on the logging rank alone, which
    stopped while the other ranks waited for it in their next collective."""
    stream, writer, run = io.StringIO(), FullDiskWriter(), RecordingWriter()
    logger = make_logger(log_interval=1, stream=stream, tensorboard_writer=writer, wandb_run=run)
    with caplog.at_level(logging.ERROR):
        step(logger, 1)
        step(logger, 2)
    assert re.search(r"iteration\s+2/10 \|", stream.getvalue())  # the log lines go on
    assert [at for _, at in run.logged] == [1, 2]  # and so does the other writer
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("--tensorboard-dir: writing the scalars of iteration 1 failed "
                            "(OSError: [Errno 28] No space left on device)")


class UnclosableWriter(RecordingWriter):
    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def finish(self):
        raise RuntimeError("wandb service gone")


def test_a_writer_that_fails_to_close_is_reported_and_the_others_still_close(caplog):
    """Closing raised on the logging rank at the end of the run (TensorBoard flushing onto a
    full disk): that rank failed after training and its last save, the others exited 0."""
    unclosable, run = UnclosableWriter(), RecordingWriter()
    logger = make_logger(log_interval=1, stream=io.StringIO(), tensorboard_writer=unclosable,
                         wandb_run=run)
    step(logger, 1)
    with caplog.at_level(logging.ERROR):
        logger.close()
    assert run.closed
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("--tensorboard-dir: closing the writer at the end of the run failed "
                            "(OSError: [Errno 28] No space left on device)")
    logger = make_logger(log_interval=1, stream=io.StringIO(), wandb_run=UnclosableWriter())
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        logger.close()
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("--wandb-project: closing the writer at the end of the run failed "
                            "(RuntimeError: wandb service gone)")


def test_progress_bar_only_on_a_terminal_and_not_with_no_progress_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    flags = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
             "--seq-length", "4", "--train-iters", "4", "--lr", "1", "--log-interval", "2"]
    args = validate_args(parse_args(flags), 1)
    terminal = Terminal()
    logger = build_training_logger(args, world_size=1, enabled=True, stream=terminal)
    for i in range(1, 5):
        step(logger, i)
    logger.close()
    output = terminal.getvalue()
    assert "4/4" in output and "\r" in output  # tqdm redraws in place
    assert output.count("| consumed samples:") == 2  # lines still printed, above the bar

    no_bar = validate_args(parse_args([*flags, "--no-progress-bar"]), 1)
    plain = Terminal()
    logger = build_training_logger(no_bar, world_size=1, enabled=True, stream=plain)
    step(logger, 1)
    step(logger, 2)
    assert "\r" not in plain.getvalue()
    piped = io.StringIO()
    logger = build_training_logger(args, world_size=1, enabled=True, stream=piped)
    step(logger, 1)
    step(logger, 2)
    assert "\r" not in piped.getvalue()


def test_missing_optional_package_names_the_flag_and_pip(monkeypatch):
    monkeypatch.setattr(train_logging.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoggingSetupError, match=r"--wandb-project needs the 'wandb' package.*"
                                                r"pip install wandb"):
        train_logging.require_optional_package("wandb")


@pytest.mark.slow  # imports megatron.core in a fresh interpreter
def test_megatron_fallback_warnings_are_filtered_in_every_process():
    import subprocess
    import sys

    # A fresh interpreter, as a spawned checkpoint writer is: the package comes first.
    code = ("import megatron_lst, megatron.core.optimizer, megatron.core.models.backends, "
            "megatron.core.distributed")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                            text=True, timeout=120, check=True)
    assert "not installed" not in result.stderr, result.stderr


def test_console_logging_quiets_megatron_dumps_and_names_missing_packages(caplog, monkeypatch):
    import logging

    levels = {name: logging.getLogger(name).level for name in train_logging.QUIET_MEGATRON_LOGGERS}
    monkeypatch.setattr(train_logging.importlib.util, "find_spec", lambda name: None)
    try:
        with caplog.at_level(logging.INFO):
            train_logging.configure_console_logging(0)
            train_logging.note_missing_fused_kernels()
            logging.getLogger("megatron.core.distributed.distributed_data_parallel").info(
                "Setting up DistributedDataParallel with config ...")
            logging.getLogger("megatron.core.datasets.indexed_dataset").info("Load the _IndexReader")
            logging.getLogger("megatron.core.optimizer").warning("a real problem")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert caplog.messages == ["Transformer Engine and Apex not installed: megatron.core uses "
                               "its PyTorch fallbacks", "a real problem"]


@pytest.mark.parametrize("precision_flags, allow_tf32, peak", [
    (["--bf16"], False, 989e12), (["--fp16"], False, 989e12), ([], False, 67e12), ([], True, 494e12),
])
def test_mfu_peak_is_the_runs_precision(monkeypatch, precision_flags, allow_tf32, peak):
    """MFU was always taken over the bf16 peak: an fp32 run on an H100 (no TF32, torch's
    default) showed 15x too low a utilisation."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    flags = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
             "--seq-length", "4", "--train-iters", "4", "--lr", "1", *precision_flags]
    args = validate_args(parse_args(flags), 1)
    before = torch.backends.cuda.matmul.allow_tf32  # monkeypatch cannot set this one
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        logger = build_training_logger(args, world_size=1, enabled=True, stream=io.StringIO())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert logger.peak_flops == peak
    logger.close()
