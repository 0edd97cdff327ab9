"""`lst-train`'s exit status and message for bad data and a non-finite loss: one line that names
the problem, no traceback (docs/training.md, "The log line", its last paragraph)."""

import os
import re
import subprocess
import sys

import pytest
from distributed.harness import WORKERS_DIR, run_torchrun

from megatron_lst.data.dataset import DatasetError
from megatron_lst.evaluation.items import ItemError
from megatron_lst.tokenizer.vocab import VocabularyError
from megatron_lst.training import cli, loop
from megatron_lst.training.checkpointing import TRACKER_FILENAME
from megatron_lst.training.divergence import NonFiniteLossError
from megatron_lst.training.train_logging import LoggingSetupError
from training.training_cases import fake_checkpoint, tiny_flags, write_corpus

ENTRY = [sys.executable, "-m", "megatron_lst.training.cli"]
LATE_LINE = WORKERS_DIR / "late_line.py"


@pytest.mark.parametrize("error, status", [
    (DatasetError("speech: 3 documents, none usable"), cli.EXIT_BAD_DATA),
    (VocabularyError("text ids 0..511, tokenizer has 1000"), cli.EXIT_BAD_DATA),
    (NonFiniteLossError("iteration 7: lm loss = nan"), cli.EXIT_NON_FINITE_LOSS),
    # An --eval-data item was a traceback (lst-eval reports the same error with status 2).
    (ItemError("items.jsonl:1: not a JSON object"), 2),
    # A W&B run the logging rank could not start was a traceback (and a gloo one on the others).
    (LoggingSetupError("rank 1 could not open the run's log writers"), 2),
])
def test_each_failure_has_its_status_and_one_line(tmp_path, monkeypatch, capsys, error, status):
    def fail(args):
        raise error

    monkeypatch.setattr(loop, "pretrain", fail)
    assert cli.main(tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(str(error))


def test_a_malformed_launch_environment_is_one_line_with_status_2(monkeypatch, capsys):
    """RANK set by hand to something that is no rank was a ValueError traceback."""
    monkeypatch.setenv("RANK", "first")
    assert cli.main(["--help"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lst-train: the environment variable RANK='first' is not a whole number of at least 0; "
        "launch with torchrun (which sets it), or unset it to run one process")


def test_an_unexpected_error_is_printed_before_the_rank_waits_for_the_others(tmp_path, monkeypatch,
                                                                             capsys):
    """Any other error exits 1 with its traceback, printed before the rank counts itself as
    stopped: once every rank has, the launcher may end this one before Python would print it."""
    from megatron_lst.training import stop_together

    def fail(args):
        raise ZeroDivisionError("a bug")

    printed_before_waiting = []
    monkeypatch.setattr(loop, "pretrain", fail)
    monkeypatch.setattr(stop_together, "stop_with_the_others",
                        lambda: printed_before_waiting.append(capsys.readouterr().err))
    assert cli.main(tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]) == 1
    [err] = printed_before_waiting
    assert "Traceback" in err and err.strip().endswith("ZeroDivisionError: a bug")


# SIGINT delivered and Python's handler first: a child inherits SIGINT ignored (a shell's
# background job) or blocked from its parent, and in one clean-clone .ci/run the child
# exited 0 after its sleep, never interrupted; a terminal's lst-train gets Ctrl-C.
CTRL_C_DURING_TRAINING = """
import os, signal, sys, time

signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
from megatron_lst.training import cli, loop

def interrupted(*args):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)

loop.pretrain = interrupted
sys.exit(cli.main())
"""


CTRL_C_DURING_THE_FLAG_CHECKS = CTRL_C_DURING_TRAINING.replace("loop.pretrain = ",
                                                              "cli.validate_args = ")


@pytest.mark.parametrize("script, last_line", [
    (CTRL_C_DURING_TRAINING,
     "lst-train: interrupted by SIGINT (Ctrl-C): stopped without saving the iteration it was "
     "in; the checkpoints saved before are kept. To save one before stopping on SIGINT, add "
     "--exit-signal-handler --exit-signal SIGINT"),
    (CTRL_C_DURING_THE_FLAG_CHECKS,
     "lst-train: interrupted by SIGINT (Ctrl-C) during the flag checks: nothing was trained or "
     "saved"),
], ids=["training", "flag_checks"])
def test_ctrl_c_without_the_signal_handler_exits_130_with_one_line(tmp_path, script, last_line):
    """A SIGINT that --exit-signal-handler does not watch ended the run with KeyboardInterrupt's
    traceback, in the training loop or in the flag checks. Run apart: pytest takes a
    KeyboardInterrupt for its own."""
    run = subprocess.run([sys.executable, "-c", script,
                          *tiny_flags(write_corpus(tmp_path)), "--train-iters", "2"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 130, run.stderr[-3000:]  # docs/training.md: 128 + SIGINT
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == last_line


@pytest.mark.slow
def test_a_truncated_index_exits_4_naming_the_file(tmp_path):
    data_path = write_corpus(tmp_path)
    idx = tmp_path / "speech.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    run = subprocess.run([*ENTRY, *tiny_flags(data_path), "--train-iters", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == cli.EXIT_BAD_DATA, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lst-train: bad training data: {idx}: is ")
    assert "re-run tools/preprocess_data.py" in last


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_data_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 opens the datasets while the other ranks wait for its row indices: when it failed,
    they died in a broken gloo barrier, a traceback ending 'Connection closed by peer'. Rank 1
    prints its line 3 s late here: rank 0's exit let torchrun end it before that line."""
    data_path = write_corpus(tmp_path)
    idx = tmp_path / "speech.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    run = run_torchrun(2, [LATE_LINE, "train", "--late", "3", *tiny_flags(data_path),
                           "--train-iters", "2", "--save", tmp_path / "ckpt"])
    output = run.output
    assert run.returncode != 0
    assert "[rank1]: Traceback" not in output and "Connection closed by peer" not in output, \
        output[-3000:]
    # One message per rank, as they differ (the two processes' lines may interleave in the
    # shared pipe): rank 0 exits only once rank 1 has printed its line, or torchrun could end
    # rank 1 before it.
    assert output.count("lst-train: ") == 2, output[-3000:]
    assert f"lst-train: bad training data: {idx}: is " in output
    assert "lst-train: bad training data: rank 0 failed to build the datasets" in output
    # Each rank exits with 4; once rank 0 has, torchrun may end rank 1 with SIGTERM (-15) between
    # its line and its exit.
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "4" in codes and set(codes) <= {"4", "-15"}, output[-3000:]


WANDB_WITHOUT_LOGIN = """
import importlib.machinery, sys, types

if __name__ == "__main__":  # the checkpoint writers re-import this file
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    wandb.init = init
    sys.modules["wandb"] = wandb
    from megatron_lst.training import cli

    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_log_writer_the_logging_rank_cannot_open_stops_every_rank_with_one_line(tmp_path):
    """The last rank alone starts the W&B run: when it could not, it stopped with W&B's
    traceback while the other ranks waited for it in the first training collective, which broke
    with a gloo traceback ('Connection closed by peer')."""
    script = tmp_path / "wandb_without_login.py"
    script.write_text(WANDB_WITHOUT_LOGIN)
    run = run_torchrun(2, [script, *tiny_flags(write_corpus(tmp_path), patching_mode="none"),
                           "--train-iters", "2", "--wandb-project", "lst"])
    output = run.output
    # No worker traceback: neither W&B's error on rank 1 nor a broken collective on rank 0.
    assert "\nRuntimeError: " not in output and "Connection closed by peer" not in output, \
        output[-3000:]
    assert output.count("lst-train: ") == 1, output[-3000:]  # the same on both ranks
    assert ("lst-train: rank 1 could not open the run's log writers (--tensorboard-dir, "
            "--wandb-project): RuntimeError: api_key not configured (no-tty)") in output
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, output[-3000:]


# A save directory whose pointer named a missing checkpoint exited 2, the status of bad flags,
# though docs/training.md gives 3 for a damaged --load; --ckpt-step naming no checkpoint is a flag
# to correct (2).
@pytest.mark.parametrize("pointer, extra, status, message", [
    ("20", [], cli.EXIT_CHECKPOINT_REFUSED, r"names iteration 20, .*iter_0000020 is missing"),
    ("oops", [], cli.EXIT_CHECKPOINT_REFUSED, r"should hold an iteration number, found 'oops'"),
    ("10", ["--ckpt-step", "30"], 2, r"--ckpt-step 30: .* holds no complete checkpoint"),
])
def test_a_damaged_save_directory_exits_3_and_a_missing_step_2(tmp_path, capsys, pointer, extra,
                                                               status, message):
    save = tmp_path / "ckpt"
    fake_checkpoint(save, 10)
    (save / TRACKER_FILENAME).write_text(pointer)
    flags = [*tiny_flags(write_corpus(tmp_path)), "--train-iters", "2", "--load", str(save),
             "--save", str(save), *extra]
    assert cli.main(flags) == status
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"lst-train: --load {save}: .*{message}", last), last


@pytest.mark.parametrize("flags, out, err", [
    (["--help"], "usage: ", ""),
    (["--seq-length", "x"], "", "argument --seq-length: invalid int value: 'x'"),
    (["--seq-length", "8"], "", "lst-train: "),
])
def test_help_and_refused_flags_print_no_log_lines(flags, out, err):
    """`lst-train --help` and every refused flag began with '[rank 0] INFO ... Transformer
    Engine and Apex not installed', a note for a run that never starts."""
    run = subprocess.run([*ENTRY, *flags], capture_output=True, text=True, timeout=120)
    assert run.returncode == (0 if flags == ["--help"] else 2)
    assert run.stdout.startswith(out) and err in run.stderr
    assert "[rank 0]" not in run.stdout + run.stderr, run.stderr
