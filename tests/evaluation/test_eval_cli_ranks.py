"""lst-eval under torchrun: a refusal every rank makes alike is printed once, by whichever rank
says it first, before any rank exits (the launcher ends every rank once one has exited;
`stop_together`)."""

import re
from pathlib import Path

import pytest
from distributed.harness import WORKERS_DIR, run_torchrun

from megatron_lst.evaluation.eval_cli import eval_main
from megatron_lst.training import stop_together

LATE_LINE = WORKERS_DIR / "late_line.py"


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



@pytest.mark.parametrize("flags, line, same_on_every_rank", [
    (["--items", "items.jsonl", "--batch-size", "0"], "--batch-size must be >= 1, got 0", True),
    (["--items", "missing.jsonl"], "--items missing.jsonl does not exist", False),
], ids=["from-the-flags", "from-a-file"])
def test_rank_1_leaves_a_flag_refusal_to_rank_0_unless_it_read_a_file(
        tmp_path, monkeypatch, capsys, flags, line, same_on_every_rank):
    """Before the process group starts, rank 1 waits for torchrun to end it once rank 0 has
    printed a refusal of the flags alone (it prints it, named, only if the wait runs out), and
    prints one of a file it reads at once, named: another node may see the file otherwise."""
    monkeypatch.chdir(tmp_path)
    Path("items.jsonl").write_text("{}\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    waits = []
    monkeypatch.setattr(stop_together.time, "sleep", waits.append)
    assert eval_main(["--load", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"[rank 1] lst-eval: {line}")
    assert waits == ([stop_together.STOP_WAIT_SECONDS] if same_on_every_rank else [])

def run_eval_on_two_ranks(tmp_path, flags) -> str:
    """The output of lst-eval with `flags` and an --items file on two ranks, rank 1's lines 6 s
    late."""
    items = tmp_path / "items.jsonl"
    items.write_text("{}\n")
    return run_torchrun(2, [LATE_LINE, "eval", "--late", "6", *flags, "--items", items]).output
