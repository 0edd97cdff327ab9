"""Megatron-LM's early exits: --exit-signal-handler, --exit-duration-in-mins, --exit-interval.

`ExitMonitor.reason` in a one-process gloo world, the flags' validation, and `pretrain` stopping
with a checkpoint of the iteration it stopped after (then resuming), and the metrics file of a
resumed run holding every iteration once.
"""

import argparse
import errno
import io
import json
import logging
import os
import signal
import sys
import time

import pytest
import torch

from megatron_lst.parallel import free_local_port
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.exit_conditions import ExitConditions, ExitMonitor
from megatron_lst.training.metrics import MetricsFile, read_metrics
from training.training_cases import tiny_flags, write_corpus


@pytest.fixture
def world_of_one():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_local_port()}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _args(**overrides) -> argparse.Namespace:
    values = dict(exit_signal_handler=False, exit_signal=["SIGTERM"], exit_duration_in_mins=None,
                  exit_interval=None)
    return argparse.Namespace(**{**values, **overrides})


def test_conditions_from_args_watch_signals_only_with_the_handler():
    assert ExitConditions.from_args(_args(exit_signal=["SIGUSR1"])).signals == ()
    conditions = ExitConditions.from_args(_args(exit_signal_handler=True,
                                                exit_signal=["SIGTERM", "SIGUSR1", "SIGTERM"]))
    assert conditions.signals == (signal.SIGTERM, signal.SIGUSR1)


def test_a_received_signal_is_the_reason_and_the_handler_is_restored(world_of_one):
    before = signal.getsignal(signal.SIGUSR1)
    monitor = ExitMonitor(ExitConditions(signals=(signal.SIGUSR1,)), time.monotonic())
    with monitor:
        assert monitor.reason(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert monitor.reason(2) == "received SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


class _SignalledMidWrite(io.RawIOBase):
    """A stream whose first write is interrupted by `sig`, as a log line written into a full pipe
    is: Python runs the signal's handler while the stream's buffer is locked."""

    def __init__(self, sig: signal.Signals):
        self.sig = sig
        self.sent = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)
        return len(data)


def test_a_signal_that_interrupts_a_write_to_stderr_is_held_not_raised(world_of_one, monkeypatch,
                                                                       capfd):
    """The handler printed to sys.stderr: a signal that came while the loop wrote to it
    re-entered the stream's buffer and raised RuntimeError ('reentrant call') in the loop, which
    crashed instead of saving."""
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(
        io.BufferedWriter(_SignalledMidWrite(signal.SIGUSR1)), line_buffering=True))
    monitor = ExitMonitor(ExitConditions(signals=(signal.SIGUSR1,)), time.monotonic())
    with monitor:
        print("a log line", file=sys.stderr)
        assert monitor.reason(1) == "received SIGUSR1"
    assert "received SIGUSR1: saving a checkpoint after this iteration" in capfd.readouterr().err


def test_a_second_signal_says_the_stop_is_under_way(world_of_one, capfd):
    """A second signal repeated 'saving a checkpoint after this iteration', as if another save
    were coming; the reason stays the first signal's."""
    monitor = ExitMonitor(ExitConditions(signals=(signal.SIGUSR1, signal.SIGUSR2)),
                          time.monotonic())
    with monitor:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert monitor.reason(1) == "received SIGUSR1"
    assert capfd.readouterr().err.splitlines() == [
        "received SIGUSR1: saving a checkpoint after this iteration, then exiting",
        "received SIGUSR2: already stopping after this iteration's checkpoint (a SIGKILL "
        "before it is written loses this iteration's work)"]


def test_a_signal_during_a_save_says_the_run_stops_with_that_checkpoint(world_of_one, capfd):
    monitor = ExitMonitor(ExitConditions(signals=(signal.SIGUSR1,)), time.monotonic())
    with monitor:
        with monitor.saving():
            os.kill(os.getpid(), signal.SIGUSR1)
        assert monitor.reason(1) == "received SIGUSR1"
    assert capfd.readouterr().err.splitlines() == [
        "received SIGUSR1: exiting once the checkpoint being saved is written"]


def test_without_save_the_signal_notices_promise_no_checkpoint(world_of_one, capfd):
    conditions = ExitConditions.from_args(_args(exit_signal_handler=True,
                                                exit_signal=["SIGUSR1", "SIGUSR2"], save=None))
    assert not conditions.saves
    assert ExitConditions.from_args(_args(save="/checkpoints")).saves
    with ExitMonitor(conditions, time.monotonic()) as monitor:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert monitor.reason(1) == "received SIGUSR1"
    assert capfd.readouterr().err.splitlines() == [
        "received SIGUSR1: exiting after this iteration (no --save: no checkpoint is written)",
        "received SIGUSR2: already stopping after this iteration"]


def test_duration_and_interval_reasons(world_of_one):
    started_two_minutes_ago = time.monotonic() - 120
    assert ExitMonitor(ExitConditions(duration_minutes=3), started_two_minutes_ago).reason(5) \
        is None
    reason = ExitMonitor(ExitConditions(duration_minutes=1.5), started_two_minutes_ago).reason(5)
    assert reason.startswith("--exit-duration-in-mins 1.5 reached (2.0 minutes")
    every_four = ExitMonitor(ExitConditions(interval=4), time.monotonic())
    assert [every_four.reason(i) is not None for i in range(1, 9)] == [False] * 3 + [True] \
        + [False] * 3 + [True]


@pytest.mark.parametrize("flags, message", [
    (["--exit-interval", "0", "--save", "ckpt"], "--exit-interval must be at least 1"),
    (["--exit-duration-in-mins", "0", "--save", "ckpt"], "--exit-duration-in-mins must be positive"),
    (["--exit-signal-handler"], "--exit-signal-handler stops training early .* give --save"),
    (["--exit-signal-handler", "--exit-interval", "2"],
     "--exit-signal-handler, --exit-interval stop training early .* give --save"),
    (["--exit-signal", "SIGUSR1", "--save", "ckpt"],
     "--exit-signal SIGUSR1 is handled only with --exit-signal-handler"),
])
def test_bad_exit_flags_are_named(flags, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(parse_args(tiny_flags(["x"]) + ["--train-iters", "4"] + flags), 1)


def test_exit_interval_saves_the_iteration_it_stops_after_and_the_run_resumes(tmp_path):
    from megatron_lst.training.loop import pretrain

    save = tmp_path / "ckpt"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "3", "--eval-interval", "1000", "--save", str(save), "--load", str(save)]
    stopped = pretrain(validate_args(parse_args(flags + ["--exit-interval", "2"]), 1))
    assert (stopped.iteration, stopped.checkpoints[-1]) == (2, str(save / "iter_0000002"))
    assert stopped.exit_reason == "--exit-interval 2 reached at iteration 2"
    resumed = pretrain(validate_args(parse_args(flags), 1))
    assert (resumed.resumed_from, resumed.iteration, resumed.exit_reason) == (2, 3, None)
    assert [r["iteration"] for r in read_metrics(save)] == [1, 2, 3]


def test_a_signal_during_setup_stops_the_run_after_its_first_iteration(tmp_path, monkeypatch):
    """SLURM's warning can arrive while a run loads its checkpoint: it is held, not lost (the
    SLURM script's workers ignore it until a handler is installed) and not fatal."""
    from megatron_lst.training import loop

    setup = loop.setup

    def setup_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return setup(*args, **kwargs)

    monkeypatch.setattr(loop, "setup", setup_interrupted)
    save = tmp_path / "ckpt"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "3", "--eval-interval", "1000", "--save", str(save),
        "--exit-signal-handler", "--exit-signal", "SIGUSR1"]
    previous = signal.getsignal(signal.SIGUSR1)
    stopped = loop.pretrain(validate_args(parse_args(flags), 1))
    assert (stopped.iteration, stopped.exit_reason) == (1, "received SIGUSR1")
    assert stopped.checkpoints == [str(save / "iter_0000001")]
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_a_resumed_run_drops_the_metrics_written_after_its_checkpoint(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "loss": float(i)}) + "\n"
                            for i in range(1, 7)) + '{"iteration": 7, "lo')  # torn by a kill
    MetricsFile(path, start_iteration=4).close()
    assert [json.loads(line)["iteration"] for line in path.open()] == [1, 2, 3, 4]
    assert "dropped 2 record(s) of iterations 5-6 and a torn last line" in caplog.text


def test_a_metrics_file_with_damaged_lines_is_kept_aside_and_resumed(tmp_path, caplog):
    """A line that is no metrics record before the last one stopped the run with a ValueError
    traceback on the logging rank alone (the other ranks then waited for it)."""
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"iteration": i, "loss": float(i)}) + "\n" for i in range(1, 6)]
    original = "".join(records[:2]) + "garbage\n" + records[2] + '{"iteration": "x"}\n' + \
        "".join(records[3:])
    path.write_text(original)
    MetricsFile(path, start_iteration=4).close()
    assert [json.loads(line)["iteration"] for line in path.open()] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == original
    assert "dropped line(s) 3, 5, which are no metrics records" in caplog.text
    assert "dropped 1 record(s) of iterations 5-5" in caplog.text


def test_a_second_damaged_metrics_file_keeps_the_first_copy(tmp_path):
    """The copy of a damaged file was written over the copy an earlier resume kept aside."""
    path = tmp_path / "metrics.jsonl"
    first = json.dumps({"iteration": 1}) + "\nfrom another run\n"
    path.write_text(first)
    MetricsFile(path, start_iteration=1).close()
    second = path.read_text() + "from yet another run\n" + json.dumps({"iteration": 2}) + "\n"
    path.write_text(second)
    MetricsFile(path, start_iteration=2).close()
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == first
    assert (tmp_path / "metrics.jsonl.damaged.1").read_text() == second
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_run_from_no_checkpoint_keeps_the_metrics_of_an_earlier_run(tmp_path, caplog):
    """A run started on a --save directory whose checkpoints were moved away (what the refusal
    of newer checkpoints advises) dropped the earlier run's metrics, its only loss curve left."""
    path = tmp_path / "metrics.jsonl"
    earlier = "".join(json.dumps({"iteration": i, "loss": float(i)}) + "\n" for i in (1, 2, 3))
    path.write_text(earlier)
    MetricsFile(path, start_iteration=0).close()
    assert path.read_text() == ""
    assert (tmp_path / "metrics.jsonl.earlier").read_text() == earlier
    assert (f"this run starts from no checkpoint, so the 3 record(s) of iterations 1-3 there are "
            f"an earlier run's; the file as it was is kept as {path}.earlier") in caplog.text


def test_a_run_resumed_from_another_directory_keeps_the_later_metrics_aside(tmp_path, caplog):
    """A run resumed with --load elsewhere into a --save holding an earlier run's older
    checkpoints (allowed) dropped that run's metrics after its own start: they are not this
    run's iterations trained again."""
    path = tmp_path / "metrics.jsonl"
    earlier = "".join(json.dumps({"iteration": i, "loss": float(i)}) + "\n" for i in range(1, 7))
    path.write_text(earlier)
    MetricsFile(path, start_iteration=4, resumed_elsewhere=True).close()
    assert [json.loads(line)["iteration"] for line in path.open()] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl.earlier").read_text() == earlier
    assert (f"this run resumes from iteration 4 of another directory's checkpoint, so the 2 "
            f"record(s) of iterations 5-6 there are an earlier run's; the file as it was is kept "
            f"as {path}.earlier") in caplog.text


@pytest.mark.slow
def test_the_loop_keeps_aside_the_metrics_a_resume_from_elsewhere_drops(tmp_path):
    from megatron_lst.training import loop

    flags = tiny_flags(write_corpus(tmp_path / "data")) + ["--eval-interval", "1000",
                                                           "--lr-decay-iters", "4"]
    elsewhere, save = tmp_path / "elsewhere", tmp_path / "save"
    loop.pretrain(validate_args(parse_args(flags + ["--train-iters", "2", "--save",
                                                    str(elsewhere)]), 1))
    loop.pretrain(validate_args(parse_args(flags + ["--train-iters", "4", "--save", str(save),
                                                    "--save-interval", "1"]), 1))
    # Moved away: a run resuming from elsewhere refuses a --save holding another run's checkpoints.
    for checkpoint in save.glob("iter_*"):
        checkpoint.rename(tmp_path / checkpoint.name)
    earlier = (save / "metrics.jsonl").read_text()
    loop.pretrain(validate_args(parse_args(flags + ["--train-iters", "3", "--save", str(save),
                                                    "--load", str(elsewhere)]), 1))
    assert (save / "metrics.jsonl.earlier").read_text() == earlier
    assert [r["iteration"] for r in read_metrics(save)] == [1, 2, 3]


def test_resuming_a_metrics_file_on_a_full_disk_leaves_it_and_the_run_alone(tmp_path, caplog,
                                                                            disk_full_at):
    """Rewriting the file without the lines after the checkpoint raised OSError on the logging
    rank alone (the other ranks then waited for it in their first collective), and left a
    half-written `metrics.jsonl.tmp`."""
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"iteration": i, "loss": float(i)}) + "\n"
                       for i in range(1, 40))
    path.write_text(original)
    with disk_full_at(100):
        metrics = MetricsFile(path, start_iteration=20)
        metrics.write({"iteration": 21, "loss": 0.0})  # nothing: the file is left alone
        metrics.close()
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"cannot append to {path} (" in errors[0]


def test_read_metrics_leaves_out_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    """A run killed as it wrote a line left a file read_metrics stopped on with a bare
    JSONDecodeError (no file, no line)."""
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2))
    path.write_text(whole + '{"iteration": 3, "lo')
    assert read_metrics(tmp_path) == [{"iteration": 1}, {"iteration": 2}]
    path.write_text(whole + "garbage\n" + json.dumps({"iteration": 3}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: not a metrics record \\('garbage'\\)"):
        read_metrics(tmp_path)


def test_a_signal_during_a_periodic_save_stops_the_run_with_that_checkpoint(tmp_path,
                                                                            monkeypatch, capfd):
    """It used to train one more iteration and save again: a second save inside the kill
    window that follows the signal (torchrun's 30 s, SLURM's KillWait). Its notice then said
    'saving a checkpoint after this iteration', as if another save were to come."""
    from megatron_lst.training import checkpoint_save, loop

    save_checkpoint = checkpoint_save.save_checkpoint

    def save_then_signalled(iteration, *args, **kwargs):
        path = save_checkpoint(iteration, *args, **kwargs)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return path

    monkeypatch.setattr(checkpoint_save, "save_checkpoint", save_then_signalled)
    save = tmp_path / "ckpt"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "6", "--eval-interval", "1000", "--save", str(save),
        "--save-interval", "2", "--exit-signal-handler", "--exit-signal", "SIGUSR1"]
    stopped = loop.pretrain(validate_args(parse_args(flags), 1))
    assert (stopped.iteration, stopped.exit_reason) == (2, "received SIGUSR1")
    assert stopped.checkpoints == [str(save / "iter_0000002")]
    notices = [line for line in capfd.readouterr().err.splitlines() if "received" in line]
    assert notices == ["received SIGUSR1: exiting once the checkpoint being saved is written"]


def test_a_metrics_write_that_fails_stops_the_metrics_file_not_the_run(tmp_path, caplog,
                                                                        monkeypatch):
    """A full disk made the logging rank's append raise OSError: that rank stopped with a
    traceback and the other ranks waited for it in their next collective."""
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsFile(path)
    metrics.write({"iteration": 1, "loss": 1.0})
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(metrics._file, "write", lambda text: (_ for _ in ()).throw(full))
    metrics.write({"iteration": 2, "loss": 2.0})
    metrics.write({"iteration": 3, "loss": 3.0})  # no second error, no exception
    metrics.close()
    assert read_metrics(tmp_path) == [{"iteration": 1, "loss": 1.0}]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert str(path) in errors[0]
