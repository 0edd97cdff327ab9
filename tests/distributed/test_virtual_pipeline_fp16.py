"""fp16 under virtual pipeline stages: the loss scale follows PP=1's, and an update skipped
for gradients that overflowed in one model chunk is skipped by every chunk of every rank.

Real `lst-train` flags through `pretrain` (--fp16, gloo on CPU), 4 global layers, PP=2 x 2
virtual stages (one layer per model chunk: rank 1's first chunk holds global layer 2). The loss
scale starts at 4096, halves at each overflow (--hysteresis 1) and doubles after 2 clean steps
(--loss-scale-window 2), so it moves during the run: 8192 after iteration 2 only if the clean
iteration 1 was counted in the checkpoint. At iteration 3 the gradient of global layer
2 alone is made infinite (fp16_overflow_worker.py), on rank 1's first chunk: megatron's optimizer
takes the maximum of every rank's overflow flag, so no chunk of either rank may change and the
scale halves on both. The interleaved run trains iteration 1 and saves it, then resumes it (the
same launch) to iteration 5. The reference resumes that checkpoint (initialisation draws other
weights under another layout) without pipeline stages, on the same two processes to save a
launch: two data-parallel replicas, which train as one process does (test_resume.py). It must
follow the interleaved run's losses, loss scales and skips; the scaler's state (the clean steps
counted towards the next doubling) travels in the checkpoint.
"""

import shlex

import pytest
from training.training_cases import tiny_flags, write_corpus

from distributed.harness import TESTS_DIR, run_distributed
from distributed.test_virtual_pipeline_training import ITERATIONS, losses, with_value

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "distributed" / "workers" / "fp16_overflow_worker.py"
OVERFLOW_AT = 3
OVERFLOW_LAYER = 2  # 1-based: rank 1's first chunk under PP=2 x VPP=2
# Relative. The weights are fp16 copies of fp32 main weights whose gradients sum in another order
# under another layout; a main weight that lands on the other side of an fp16 rounding boundary
# moves its copy by one fp16 step (5e-4 relative). Measured: 4e-6 at most. An update one rank
# made and the other skipped moves the loss by about 1e-2 (one step's change here).
LOSS_TOLERANCE = 1e-4
LOSS_SCALE_FLAGS = ["--fp16", "--initial-loss-scale", "4096", "--hysteresis", "1",
                    "--loss-scale-window", "2"]


def train(nprocs: int, *runs: list[str]) -> list[list[dict]]:
    """Every rank's reports of `runs`, trained one after the other on `nprocs` processes, with
    the gradients of layer OVERFLOW_LAYER made infinite at iteration OVERFLOW_AT."""
    args = [item for run in runs for item in ("--training-run", shlex.join(run))]
    return run_distributed(WORKER, nprocs, [
        *args, "--overflow-at", str(OVERFLOW_AT), "--overflow-layer", str(OVERFLOW_LAYER)],
        timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference from the interleaved run's checkpoint of iteration 1, and both ranks'
    interleaved runs from it (one launch)."""
    root = tmp_path_factory.mktemp("virtual_pipeline_fp16")
    base = tiny_flags(write_corpus(root / "data")) + LOSS_SCALE_FLAGS + [
        "--num-layers", "4", "--train-iters", str(ITERATIONS), "--lr-decay-iters",
        str(ITERATIONS), "--eval-interval", "1000"]
    interleaved = base + ["--pipeline-model-parallel-size", "2",
                          "--num-virtual-stages-per-pipeline-rank", "2"]
    first = with_value(interleaved + ["--save", str(root / "shared")], "--train-iters", "1")
    resumed = ["--load", str(root / "shared")]
    ranks = train(2, first, interleaved + resumed, base + resumed)
    return ranks[0][2], [rank_runs[1] for rank_runs in ranks]


def test_the_overflowing_update_is_skipped_by_every_chunk_of_every_rank(runs):
    reference, interleaved = runs
    assert reference["skipped"] == {str(i): i == OVERFLOW_AT for i in range(2, ITERATIONS + 1)}
    for rank in interleaved:
        assert rank["skipped"] == reference["skipped"]
        assert rank["chunks_changed"] == {
            str(i): [i != OVERFLOW_AT] * 2 for i in range(2, ITERATIONS + 1)}


def test_the_loss_scale_and_losses_follow_the_run_without_pipeline_stages(runs):
    reference, interleaved = runs
    # Iteration 1 (in the checkpoint) and 2 clean: doubled; 3 overflowed: halved; 4 and 5 clean.
    assert reference["loss_scales"] == {"2": 8192.0, "3": 4096.0, "4": 4096.0, "5": 8192.0}
    for rank in interleaved:
        assert rank["loss_scales"] == reference["loss_scales"]
        assert losses(rank, 2) == pytest.approx(losses(reference, 2), rel=LOSS_TOLERANCE)
