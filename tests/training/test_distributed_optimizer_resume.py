"""Resuming a distributed-optimizer run on a plain PyTorch install (no Apex, no Transformer
Engine: megatron.core's torch.optim.Adam fallback) continues the uninterrupted run.

Pipeline 2 x data parallel 2 with `--use-distributed-optimizer`, fp32 on gloo: 4 iterations
straight and 2 + save + `--load` + 2 give the same losses bit for bit. The checkpoint also resumes
under another layout (tensor 2 x data parallel 2): the optimizer state is stored in model space,
so it reshards; the losses then agree to fp32 rounding (reductions run in another order).
`--overlap-grad-reduce` trains the same run.
"""

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from training.test_resume import _command, _losses, _resume_runs
from training.training_cases import tiny_flags, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"


def _flags(data_path: list[str], tp: int, pp: int) -> list[str]:
    return tiny_flags(data_path) + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--use-distributed-optimizer", "--lr", "1e-2", "--micro-batch-size", "1"]


def test_resume_under_pipeline_by_data_parallel_is_bitwise(tmp_path):
    flags = _flags(write_corpus(tmp_path / "data"), tp=1, pp=2)
    pp2 = _resume_runs(flags, tmp_path / "ckpt")
    # The same checkpoint (iteration 2) resumed under TP2 x DP2.
    resharded = _command(_flags(write_corpus(tmp_path / "data"), tp=2, pp=1) + [
        "--lr-decay-iters", "4", "--eval-interval", "1000", "--train-iters", "4",
        "--load", str(tmp_path / "ckpt")])
    # The straight run again, with the data-parallel reduction overlapped with backward.
    overlapped = _command(flags + ["--lr-decay-iters", "4", "--eval-interval", "1000",
                                   "--train-iters", "4", "--overlap-grad-reduce"])
    ranks = run_distributed(WORKER, 4, [*pp2, "--training-run", resharded,
                                        "--training-run", overlapped], timeout=500)
    for whole, before, after, other_layout, overlap in ranks:
        assert _losses(overlap) == pytest.approx(_losses(whole), rel=1e-6)
        assert after["resumed_from"] == 2
        stitched = {**_losses(before), **_losses(after)}
        assert stitched == _losses(whole)  # bitwise
        assert other_layout["resumed_from"] == 2
        assert _losses(other_layout) == pytest.approx(
            {k: v for k, v in _losses(whole).items() if k > 2}, rel=1e-5)
