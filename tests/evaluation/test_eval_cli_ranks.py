"""lst-eval under torchrun: a refusal every rank makes alike is printed once, by whichever rank
says it first, before any rank exits (the launcher ends every rank once one has exited;
`stop_together`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LATE_LINE = Path(__file__).resolve().parents[1] / "distributed" / "workers" / "late_line.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_directory_without_a_checkpoint_every_rank_refuses_is_printed_once(tmp_path):
    """Rank 1 prints its line 6 s late here (rank 0 takes a few seconds to exit after its own):
    torchrun ended it before its line, which a busy machine could delay as much; whichever rank
    prints it first, the line is in the log once (it was there once per rank)."""
    empty = tmp_path / "save"
    empty.mkdir()
    output = run_eval_on_two_ranks(tmp_path, ["--load", str(empty)])
    assert output.count("lst-eval: ") == 1, output[-3000:]
    assert f"\nlst-eval: {empty} holds no complete checkpoint" in f"\n{output}", output[-3000:]
    # No worker's traceback (torchrun prints one of its own for a failed job).
    assert not re.search(r"\[rank\d\]: Traceback", output), output[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, output[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_flag_refused_alike_on_every_rank_is_printed_once(tmp_path):
    """Worked out from the flags alone, before the process group starts: rank 0 prints it."""
    output = run_eval_on_two_ranks(tmp_path, ["--load", str(tmp_path), "--batch-size", "0"])
    assert output.count("lst-eval: ") == 1, output[-3000:]
    assert "\nlst-eval: --batch-size must be >= 1, got 0\n" in f"\n{output}", output[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, output[-3000:]


def run_eval_on_two_ranks(tmp_path, flags) -> str:
    """The output of lst-eval with `flags` and an --items file on two ranks, rank 1's lines 6 s
    late."""
    items = tmp_path / "items.jsonl"
    items.write_text("{}\n")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(LATE_LINE), "eval", "--late", "6", *flags, "--items", str(items)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    return run.stdout + run.stderr
