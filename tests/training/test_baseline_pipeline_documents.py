"""The token baseline on rows packing several documents (`--reset-attention-mask`, the default)
trains the same under pipeline parallelism as in one process.

The baseline's attention is causal within each document: every pipeline stage computes the
document starts from the row's tokens, so every stage must receive them, and each stage's layers
must see the same cut. Real `lst-train` flags through `pretrain` (fp32, gloo). Initialisation
draws other weights under another parallel layout, so every run starts from one single-process
checkpoint (taken after one iteration, loaded resharded): PP=2, PP=2 x DP=2, PP=2 x TP=2 with
sequence parallelism and PP=4 (middle stages) must then give the single process's training and
validation losses at every later iteration. A single-process run without the reset shows that
the rows do pack documents (its losses differ), so the comparison is not one of unpacked rows.
"""

import shlex

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from training.training_cases import tiny_flags, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
ITERATIONS = 4
LOSS_TOLERANCE = 1e-5  # relative; fp32 sums in another order under another layout


def baseline_flags(data_path: list[str]) -> list[str]:
    """Rows of 48 tokens (documents are 8-60 tokens long, so most rows hold two or more), 4 rows
    per global batch in micro-batches of 1, 4 global layers."""
    flags = tiny_flags(data_path, "none")
    for flag, value in (("--seq-length", "48"), ("--max-position-embeddings", "48"),
                        ("--micro-batch-size", "1")):
        flags[flags.index(flag) + 1] = value
    return flags + ["--num-layers", "4", "--train-iters", str(ITERATIONS),
                    "--lr-decay-iters", str(ITERATIONS), "--eval-interval", "2",
                    "--lr", "1e-2"]


def losses(run: dict) -> list[float]:
    """The losses of the iterations after the shared checkpoint's."""
    assert run["resumed_from"] == 1
    return [run["losses"][str(i)] for i in range(2, ITERATIONS + 1)]


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """The flags of the runs that resume from the shared one-iteration checkpoint."""
    root = tmp_path_factory.mktemp("baseline_documents")
    base = baseline_flags(write_corpus(root / "data"))
    first = base + ["--save", str(root / "ckpt")]
    first[first.index("--train-iters") + 1] = "1"
    run_distributed(WORKER, 1, ["--training-run", shlex.join(first)], timeout=240)
    return base + ["--load", str(root / "ckpt")]


@pytest.fixture(scope="module")
def single_process(flags):
    """One process: the default (document attention), then the same run without the reset."""
    [[packed, unpacked]] = run_distributed(WORKER, 1, [
        "--training-run", shlex.join(flags),
        "--training-run", shlex.join(
            flags + ["--no-reset-attention-mask", "--no-use-checkpoint-args"])], timeout=240)
    return packed, unpacked


def test_rows_pack_several_documents(single_process):
    packed, unpacked = single_process
    assert losses(packed) != pytest.approx(losses(unpacked), rel=1e-4)
    assert sorted(packed["eval_losses"]) == ["2", "4"]


@pytest.mark.parametrize("processes,layout", [
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"]),  # 2 rows per step
    (4, ["--pipeline-model-parallel-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
         "--sequence-parallel"]),
    (4, ["--pipeline-model-parallel-size", "4"]),  # middle stages need the tokens too
], ids=["pp2", "pp2-mb2", "pp2-dp2", "pp2-tp2-sp", "pp4"])
def test_pipeline_parallel_baseline_trains_like_one_process(flags, single_process, processes,
                                                            layout):
    ranks = run_distributed(WORKER, processes, ["--training-run", shlex.join(flags + layout)],
                            timeout=300)
    for [run] in ranks:  # every rank reports the global batch's loss
        assert losses(run) == pytest.approx(losses(single_process[0]), rel=LOSS_TOLERANCE)
        assert run["eval_losses"] == pytest.approx(single_process[0]["eval_losses"],
                                                   rel=LOSS_TOLERANCE)
