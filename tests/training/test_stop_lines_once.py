"""`lst-train` under torchrun prints a refusal every rank makes alike once into the launcher's
shared log, not once per rank, and a rank's own refusal once, naming the rank
(`stop_together`, docs/training.md, "The log line")."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from distributed.harness import run_torchrun

from training.training_cases import tiny_flags, write_corpus

# `cli.main` on every rank, its first argument a case: the flag checks refusing on rank 1 alone
# a --config it cannot read, or every rank stopping after the process group started (as the
# training loop's errors do), on the same error or on rank 1's own.
ENTRY = """
import os, sys

if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron_lst.training import cli, config_files, loop, stop_together

    case = sys.argv.pop(1)
    rank = int(os.environ["RANK"])

    def stops_after_arming(message):
        def pretrain(args):
            import torch
            from megatron_lst.data.dataset import DatasetError

            torch.distributed.init_process_group("gloo")
            stop_together.arm()
            torch.distributed.destroy_process_group()
            raise DatasetError(message)
        return pretrain

    if case == "config-unreadable-on-rank-1" and rank == 1:
        def unreadable(path):
            raise config_files.ConfigError(f"--config {path}: [Errno 5] Input/output error")
        config_files.load_config = unreadable
    elif case == "alike":
        loop.pretrain = stops_after_arming("speech.idx is truncated")
    elif case == "rank-1-differs":
        loop.pretrain = stops_after_arming(
            "rank 1's copy of speech.idx is truncated" if rank == 1
            else "rank 1 failed to build the datasets")
    sys.exit(cli.main())
"""


def three_rank_flags(tmp_path):
    """A tiny run's flags, its batches split between three ranks."""
    return [*tiny_flags(write_corpus(tmp_path)), "--train-iters", "2", "--global-batch-size", "6"]


def run_on_three_ranks(tmp_path, case, flags):
    """The output of ENTRY's `case` with `flags` on three ranks, and their exit statuses."""
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    output = run_torchrun(3, [entry, case, *flags]).output
    return output, re.findall(r"exitcode  : (-?\d+)", output)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("bad_flag, line", [
    (["--micro-batch-size", "0"], "lst-train: --micro-batch-size must be at least 1, got 0"),
    (["--seq-length", "x"], "lst-train: error: argument --seq-length: invalid int value: 'x'"),
], ids=["flag-checks", "argparse"])
def test_a_flag_refused_alike_on_every_rank_is_printed_once(tmp_path, bad_flag, line):
    """Worked out from the command line alone, the same on every rank: rank 0 prints it."""
    output, codes = run_on_three_ranks(tmp_path, "as-is", [*three_rank_flags(tmp_path), *bad_flag])
    assert output.count("lst-train: ") == 1 and f"\n{line}\n" in f"\n{output}", output[-3000:]
    assert "2" in codes and set(codes) <= {"2", "-15"}, output[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_flag_refusal_of_what_one_rank_reads_is_printed_by_that_rank(tmp_path):
    """A file one node cannot read: rank 0 did not refuse it, so rank 1 must say it."""
    config = tmp_path / "run.yaml"
    config.write_text("seed: 7\n")
    output, codes = run_on_three_ranks(tmp_path, "config-unreadable-on-rank-1", [
        *three_rank_flags(tmp_path), "--config", str(config)])
    assert output.count("lst-train: ") == 1, output[-3000:]
    assert (f"[rank 1] lst-train: --config {config}: [Errno 5] Input/output error"
            in output), output[-3000:]
    assert "2" in codes, output[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stop_every_rank_makes_alike_is_printed_once(tmp_path):
    output, codes = run_on_three_ranks(tmp_path, "alike", three_rank_flags(tmp_path))
    assert output.count("lst-train: ") == 1, output[-3000:]
    assert "\nlst-train: bad training data: speech.idx is truncated\n" in f"\n{output}"
    assert "4" in codes and set(codes) <= {"4", "-15"}, output[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_stops_that_differ_are_each_printed_once_the_later_naming_its_rank(tmp_path):
    """Rank 1's own error, and ranks 0 and 2 stopping with it: each line once; whichever came
    second to the store names the rank that printed it. The processes' prints reach the shared
    output in either order (a rank can print after a later one registered and printed)."""
    output, codes = run_on_three_ranks(tmp_path, "rank-1-differs", three_rank_flags(tmp_path))
    lines = sorted(line for line in output.splitlines() if "lst-train: " in line)
    own = "lst-train: bad training data: rank 1's copy of speech.idx is truncated"
    others = "lst-train: bad training data: rank 1 failed to build the datasets"
    assert lines in (sorted([own, f"[rank 0] {others}"]), sorted([own, f"[rank 2] {others}"]),
                     sorted([others, f"[rank 1] {own}"])), output[-3000:]
    assert "4" in codes and set(codes) <= {"4", "-15"}, output[-3000:]


# `cli.main` whose flag checks hang until a SIGINT, each rank saying it got there: SIGINT
# unblocked and Python's handler first (a child may inherit it ignored or blocked).
HANGS_IN_THE_FLAG_CHECKS = """
import os, signal, sys, time
from pathlib import Path

if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from megatron_lst.training import cli

    ready = Path(sys.argv.pop(1))

    def hangs(*args):
        (ready / f"rank{os.environ['RANK']}").touch()
        time.sleep(120)

    cli.validate_args = hangs
    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_during_the_flag_checks_is_printed_once(tmp_path):
    """torchrun passes the SIGINT (Ctrl-C) it gets to every worker: each printed the line."""
    entry = tmp_path / "entry.py"
    entry.write_text(HANGS_IN_THE_FLAG_CHECKS)
    ready = tmp_path / "ready"
    ready.mkdir()
    with open(tmp_path / "torchrun.log", "w+") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
             str(entry), str(ready), *three_rank_flags(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            while len(list(ready.iterdir())) < 3 and launcher.poll() is None:
                time.sleep(0.1)
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    assert output.count("lst-train: ") == 1, output[-3000:]
    assert ("\nlst-train: interrupted by SIGINT (Ctrl-C) during the flag checks: nothing was "
            "trained or saved\n" in f"\n{output}"), output[-3000:]
