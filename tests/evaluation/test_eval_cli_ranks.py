"""lst-eval under torchrun: every rank that refuses the checkpoint says so before any exits (the
launcher ends every rank once one has exited; `stop_together`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LATE_LINE = Path(__file__).resolve().parents[1] / "distributed" / "workers" / "late_line.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_refuses_a_directory_without_a_checkpoint_with_one_line(tmp_path):
    """Rank 1 prints its line 6 s late here (rank 0 takes a few seconds to exit after its own):
    torchrun ended it before its line, which a busy machine could delay as much."""
    empty = tmp_path / "save"
    empty.mkdir()
    items = tmp_path / "items.jsonl"
    items.write_text("{}\n")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(LATE_LINE), "eval", "--late", "6", "--load", str(empty), "--items", str(items)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    output = run.stdout + run.stderr
    assert output.count(f"lst-eval: {empty} holds no complete checkpoint") == 2, output[-3000:]
    # No worker's traceback (torchrun prints one of its own for a failed job).
    assert not re.search(r"\[rank\d\]: Traceback", output), output[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, output[-3000:]
