"""Resuming a distributed-optimizer run on a plain PyTorch install (no Apex, no Transformer
Engine: megatron.core's torch.optim.Adam fallback) continues the uninterrupted run.

Pipeline 2 x data parallel 2 with `--use-distributed-optimizer`, fp32 on gloo, global layers
split 1 + 2 over the stages: 4 iterations straight and 2 + save + `--load` + 2 give the same
losses bit for bit. The optimizer state is stored in model space, so the checkpoint also resumes
under other layouts:

- the layers split 2 + 1: bit for bit again. The layout change moves a layer's weights and Adam
  moments to other ranks and every data-parallel shard boundary of both stages, yet no sum
  changes order: each rank runs the same layers on the same micro-batches (one pipeline stage's
  output reaches the next as an exact copy), gradients accumulate over the same two micro-batches
  in the same order, the data-parallel and encoder-replica reductions add two terms (which
  commutes), and Adam works element by element. Clipping is off (`--clip-grad 0`): the gradient
  norm is summed shard by shard, so its rounding, and a clipping factor, follow the sharding.
- the token baseline on one stage (pipeline 1 x data parallel 2, two processes): bit for bit, for
  the same reasons; every parameter's state moves to other shards. (LST itself would not: on one
  stage its token encoder back-propagates the sum of the patch encoder's and the decoder's
  gradients once, while two stages back-propagate them through separate copies and add the
  weight gradients.)
- tensor 2 x data parallel 2: to fp32 rounding only. Tensor parallelism splits the global
  block's matrix products and the vocabulary-parallel head over two ranks and adds partial
  products, which rounds otherwise than one whole product. (Changing the data-parallel size would
  too: it regroups the micro-batch gradients and the terms of the data-parallel sum.)

`--overlap-grad-reduce` trains the same run, bit for bit (it starts the same reductions earlier).
"""

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from training.test_resume import _command, _losses, _resume_runs
from training.training_cases import tiny_flags, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"


def _flags(data_path: list[str], tp: int, pp: int, first_stage_layers: int | None = None,
           patching_mode: str = "curriculum") -> list[str]:
    flags = tiny_flags(data_path, patching_mode) + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-layers", "3", "--use-distributed-optimizer", "--lr", "1e-2",
        "--micro-batch-size", "1", "--clip-grad", "0"]
    if first_stage_layers is not None:
        flags += ["--decoder-first-pipeline-num-layers", str(first_stage_layers)]
    return flags


def _resumed(flags: list[str], save_dir) -> str:
    return _command(flags + ["--lr-decay-iters", "4", "--eval-interval", "1000",
                             "--train-iters", "4", "--load", str(save_dir)])


def test_resume_under_pipeline_by_data_parallel_and_other_layouts(tmp_path):
    data_path = write_corpus(tmp_path / "data")
    flags = _flags(data_path, tp=1, pp=2, first_stage_layers=1)
    pp2 = _resume_runs(flags, tmp_path / "ckpt")
    # The checkpoint of iteration 2 resumed with the other split, and under TP2 x DP2.
    other_split = _resumed(_flags(data_path, tp=1, pp=2, first_stage_layers=2), tmp_path / "ckpt")
    tensor_parallel = _resumed(_flags(data_path, tp=2, pp=1), tmp_path / "ckpt")
    # The straight run again, with the data-parallel reduction overlapped with backward.
    overlapped = _command(flags + ["--lr-decay-iters", "4", "--eval-interval", "1000",
                                   "--train-iters", "4", "--overlap-grad-reduce"])
    ranks = run_distributed(WORKER, 4, [*pp2, "--training-run", other_split,
                                        "--training-run", tensor_parallel,
                                        "--training-run", overlapped], timeout=500)
    for whole, before, after, resplit, resharded, overlap in ranks:
        assert _losses(overlap) == _losses(whole)  # bitwise: the same sums, started earlier
        later = {k: v for k, v in _losses(whole).items() if k > 2}
        assert after["resumed_from"] == resplit["resumed_from"] == resharded["resumed_from"] == 2
        assert {**_losses(before), **_losses(after)} == _losses(whole)  # bitwise
        assert _losses(resplit) == later  # bitwise
        assert _losses(resharded) == pytest.approx(later, rel=1e-5)
        # What the bitwise comparisons are up against: another summation order shows.
        assert _losses(resharded) != later


def test_token_baseline_resumes_on_one_pipeline_stage_bitwise(tmp_path):
    data_path = write_corpus(tmp_path / "data")
    base = ["--lr-decay-iters", "4", "--eval-interval", "1000"]
    flags = _flags(data_path, tp=1, pp=2, first_stage_layers=1, patching_mode="none") + base
    [straight, first_half] = run_distributed(WORKER, 4, [
        "--training-run", _command(flags + ["--train-iters", "4"]),
        "--training-run", _command(flags + ["--train-iters", "2", "--save", str(tmp_path / "ckpt")])],
        timeout=300)[-1]
    # The same data-parallel size on two processes: one stage holds every layer.
    [resumed] = run_distributed(WORKER, 2, [
        "--training-run", _resumed(_flags(data_path, tp=1, pp=1, patching_mode="none"),
                                   tmp_path / "ckpt")], timeout=300)[-1]
    assert resumed["resumed_from"] == 2
    assert {**_losses(first_half), **_losses(resumed)} == _losses(straight)  # bitwise
