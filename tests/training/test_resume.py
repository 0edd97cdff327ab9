"""Resuming `pretrain_lst`'s loop continues the same run, single-process and under TP=2 x PP=2;
data parallelism gives the single-process losses.

The tiny models train in fp32 on gloo, where every reduction is deterministic: N iterations
straight and N/2 + stop + `--load` + N/2 must give the same losses (relative 1e-9), which needs
the model, optimizer, scheduler, RNG, data position and curriculum step all restored. The run that stops is a shorter `--train-iters` with the straight run's
`--lr-decay-iters`, so both follow one learning-rate schedule.
"""

import shlex
from pathlib import Path

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from training.training_cases import tiny_flags, write_corpus

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
ITERATIONS = 6


def _command(flags: list[str]) -> str:
    return shlex.join(flags)


def _losses(run: dict) -> dict[int, float]:
    return {int(k): v for k, v in run["losses"].items()}


@pytest.mark.distributed
def test_stop_and_resume_gives_the_straight_run_losses(tmp_path):
    base = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--lr-decay-iters", str(ITERATIONS), "--eval-interval", "1000"]
    straight = base + ["--train-iters", str(ITERATIONS)]
    first_half = base + ["--train-iters", str(ITERATIONS // 2), "--save", str(tmp_path / "ckpt")]
    second_half = straight + ["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")]

    [runs] = run_distributed(WORKER, 1, [
        "--training-run", _command(straight), "--training-run", _command(first_half),
        "--training-run", _command(second_half)], timeout=240)
    whole, before, after = runs

    assert before["checkpoints"][-1].endswith(f"iter_{ITERATIONS // 2:07d}")
    assert after["resumed_from"] == ITERATIONS // 2
    assert after["consumed_samples"] == whole["consumed_samples"] == 4 * ITERATIONS
    stitched = {**_losses(before), **_losses(after)}
    assert sorted(stitched) == list(range(1, ITERATIONS + 1))
    for iteration, loss in _losses(whole).items():
        assert stitched[iteration] == pytest.approx(loss, rel=1e-9, abs=0), iteration
    # The FLOP count continues across the resume.
    assert after["flops"][str(ITERATIONS)] == pytest.approx(whole["flops"][str(ITERATIONS)])


def _parallel_flags(data_path: list[str], patching_mode: str = "curriculum") -> list[str]:
    return tiny_flags(data_path, patching_mode) + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--lr", "1e-2"]


def _resume_runs(base: list[str], save_dir: Path) -> list[str]:
    """Worker arguments: 4 iterations straight, then 2 + save, then `--load` + 2 more."""
    base = base + ["--lr-decay-iters", "4", "--eval-interval", "1000"]
    straight = base + ["--train-iters", "4"]
    first_half = base + ["--train-iters", "2", "--save", str(save_dir)]
    second_half = straight + ["--load", str(save_dir)]
    return ["--training-run", _command(straight), "--training-run", _command(first_half),
            "--training-run", _command(second_half)]


def _assert_resumed_exactly(whole: dict, before: dict, after: dict) -> None:
    assert after["resumed_from"] == 2
    stitched = {**_losses(before), **_losses(after)}
    assert stitched == pytest.approx(_losses(whole), rel=1e-9, abs=0)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """One TP=2 x PP=2 launch (4 processes): LST for 16 iterations with an evaluation every 4,
    then the token baseline's stop-and-resume runs."""
    root = tmp_path_factory.mktemp("parallel")
    data_path = write_corpus(root / "data")
    lst = _parallel_flags(data_path) + ["--train-iters", "16", "--eval-interval", "4"]
    return run_distributed(WORKER, 4, [
        "--training-run", _command(lst),
        *_resume_runs(_parallel_flags(data_path, "none"), root / "baseline_ckpt")], timeout=300)


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_lst_lowers_the_validation_loss(parallel_runs):
    first = parallel_runs[0][0]
    for other in parallel_runs[1:]:  # every rank reports the same global-batch losses
        assert _losses(other[0]) == pytest.approx(_losses(first), rel=1e-12)
    eval_losses = {int(k): v for k, v in first["eval_losses"].items()}
    assert sorted(eval_losses) == [4, 8, 12, 16]
    assert eval_losses[16] < eval_losses[4] - 0.1, eval_losses


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_baseline_resumes_exactly(parallel_runs):
    for rank_runs in parallel_runs:
        _assert_resumed_exactly(*rank_runs[1:])


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_lst_resumes_exactly(tmp_path):
    flags = _parallel_flags(write_corpus(tmp_path / "data"))
    ranks = run_distributed(WORKER, 4, _resume_runs(flags, tmp_path / "ckpt"), timeout=300)
    for rank_runs in ranks:
        _assert_resumed_exactly(*rank_runs)


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_run_has_the_single_process_losses(tmp_path):
    """Two data-parallel ranks each take one micro-batch of every global batch; the token-mean
    loss over the global batch, and so the whole run, must match one process taking both."""
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "4", "--eval-interval", "2"]
    [[single]] = run_distributed(WORKER, 1, ["--training-run", _command(flags)], timeout=240)
    ranks = run_distributed(WORKER, 2, ["--training-run", _command(flags)], timeout=240)
    for [run] in ranks:
        assert _losses(run) == pytest.approx(_losses(single), rel=1e-5)
        assert run["eval_losses"] == pytest.approx(single["eval_losses"], rel=1e-5)
