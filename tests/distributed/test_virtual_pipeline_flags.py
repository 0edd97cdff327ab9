"""The virtual pipeline flags: what they derive, and the layouts megatron's interleaved schedule
cannot run, refused in one line by `validate_args` before any work."""

import pytest

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args

BASE = ["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3",
        "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1",
        "--global-batch-size", "4"]


def validated(*extra: str, world_size: int = 2):
    return validate_args(parse_args([*BASE, *extra]), world_size)


@pytest.mark.parametrize("extra, expected", [
    ([], None),
    (["--num-virtual-stages-per-pipeline-rank", "2"], 2),
    (["--num-virtual-stages-per-pipeline-rank", "4"], 4),
    (["--num-layers-per-virtual-pipeline-stage", "2"], 2),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 4),
    (["--num-virtual-stages-per-pipeline-rank", "1"], None),  # the plain 1F1B schedule
    (["--num-layers-per-virtual-pipeline-stage", "4"], None),
    (["--decoder-first-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
     2),
])
def test_virtual_stages_per_pipeline_rank(extra, expected):
    assert validated(*extra).virtual_pipeline_model_parallel_size == expected


@pytest.mark.parametrize("extra, world_size, message", [
    (["--pipeline-model-parallel-size", "1", "--num-virtual-stages-per-pipeline-rank", "2"], 1,
     r"--num-virtual-stages-per-pipeline-rank interleaves pipeline stages: it needs "
     r"--pipeline-model-parallel-size 2 or more"),
    (["--num-virtual-stages-per-pipeline-rank", "3"], 2,
     r"--num-virtual-stages-per-pipeline-rank 3 must divide every pipeline stage's global "
     r"layers \[4, 4\]; use a divisor of 4"),
    (["--decoder-first-pipeline-num-layers", "3", "--num-virtual-stages-per-pipeline-rank", "2"],
     2, r"must divide every pipeline stage's global layers \[3, 5\]; use a divisor of 1"),
    (["--decoder-first-pipeline-num-layers", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
     2, r"--num-layers-per-virtual-pipeline-stage 2 must cut every pipeline stage's global layers "
        r"\[2, 6\] into the same number of chunks"),
    (["--num-layers-per-virtual-pipeline-stage", "3"], 2, r"\[4, 4\] into the same number"),
    (["--num-virtual-stages-per-pipeline-rank", "0"], 2,
     r"--num-virtual-stages-per-pipeline-rank must be at least 1, got 0"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--num-layers-per-virtual-pipeline-stage",
      "2"], 2, r"both set the virtual stages; give one"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--global-batch-size", "3"], 2,
     r"3 micro-batches per step .* must be a multiple of 2"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--global-batch-size", "1"], 2,
     r"1 micro-batches per step .* must be a multiple of 2"),
])
def test_impossible_virtual_layouts_are_refused(extra, world_size, message):
    with pytest.raises(ArgumentError, match=message):
        validated(*extra, world_size=world_size)


def test_checks_of_each_chunk_use_its_layers():
    """Uniform recomputation groups layers within a model chunk (2 of the 4 on a stage here)."""
    with pytest.raises(ArgumentError, match=r"every pipeline \(or virtual pipeline\) stage \[2, 2\]"):
        validated("--num-virtual-stages-per-pipeline-rank", "2", "--recompute-granularity",
                  "full", "--recompute-method", "uniform", "--recompute-num-layers", "4")
    validated("--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "4")
