"""`--overlap-param-gather` trains the same run, bit for bit, and its checkpoints resume.

With it the distributed optimizer's step updates only each rank's shard of the weights and the
next forward pass all-gathers them bucket by bucket (megatron DDP's forward pre-hooks); the loop
must finish that gather before it evaluates and saves (`param_gather.ParamGatherHooks`). The gather
copies values and changes no arithmetic (both runs reduce gradients with --overlap-grad-reduce),
so the comparison is exact: training and validation losses, and every tensor of the checkpoints
saved in the middle and at the end (weights and Adam moments), under data parallel 2 and pipeline
2 x data parallel 2, fp32 on gloo. Small buckets (--ddp-bucket-size; megatron splits the first
stage's only) make the pre-hooks gather many buckets, so a weight read before its bucket arrived
would change the losses. A checkpoint
saved with the overlap on resumes it to the uninterrupted run's losses and final checkpoint.
"""

from pathlib import Path

import pytest
import torch
from distributed.harness import TESTS_DIR, run_distributed

from training.test_resume import _command, _losses
from training.training_cases import tiny_flags, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
BUCKET_SIZE = 4000
"""Parameters per bucket: 18 buckets when one stage holds the whole tiny model."""


def checkpoint_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint (model and optimizer state), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = Path(directory).with_suffix(".pt")
    dcp_to_torch_save(directory, whole)
    flat: dict[str, torch.Tensor] = {}

    def visit(value, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif torch.is_tensor(value):
            flat[name] = value

    visit(torch.load(whole, weights_only=False), "")
    return flat


def assert_same_checkpoint(actual: str, expected: str) -> None:
    actual_tensors, expected_tensors = checkpoint_tensors(actual), checkpoint_tensors(expected)
    assert actual_tensors.keys() == expected_tensors.keys()
    assert any("exp_avg_sq" in name for name in actual_tensors)  # the optimizer state too
    for name, value in actual_tensors.items():
        assert torch.equal(value, expected_tensors[name]), (
            f"{actual}: {name} differs by {(value - expected_tensors[name]).abs().max().item()}")


@pytest.mark.parametrize("world, pp", [(2, 1), (4, 2)], ids=["dp2", "pp2xdp2"])
def test_overlapped_param_gather_trains_and_resumes_the_same_run(tmp_path, world, pp):
    base = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
        "--use-distributed-optimizer", "--overlap-grad-reduce",
        "--ddp-bucket-size", str(BUCKET_SIZE), "--lr-decay-iters", "4",
        "--eval-interval", "3", "--save-interval", "2"]
    plain = base + ["--train-iters", "4", "--save", str(tmp_path / "plain")]
    overlapped = base + ["--train-iters", "4", "--overlap-param-gather",
                         "--save", str(tmp_path / "overlapped")]
    resumed = overlapped[:-1] + [str(tmp_path / "resumed"), "--load",
                                 str(tmp_path / "overlapped"), "--ckpt-step", "2"]
    ranks = run_distributed(WORKER, world, [
        "--training-run", _command(plain), "--training-run", _command(overlapped),
        "--training-run", _command(resumed)], timeout=400)
    for without, with_overlap, after_resume in ranks:
        assert sorted(_losses(without)) == [1, 2, 3, 4]
        assert _losses(with_overlap) == _losses(without)
        assert with_overlap["eval_losses"] == without["eval_losses"]
        assert sorted(with_overlap["eval_losses"]) == ["3", "4"]
        assert after_resume["resumed_from"] == 2
        assert _losses(after_resume) == {k: v for k, v in _losses(without).items() if k > 2}
        assert after_resume["eval_losses"] == without["eval_losses"]
    without, with_overlap, after_resume = ranks[0]
    for saved, reference in zip(with_overlap["checkpoints"], without["checkpoints"], strict=True):
        assert_same_checkpoint(saved, reference)
    assert_same_checkpoint(after_resume["checkpoints"][-1], without["checkpoints"][-1])
