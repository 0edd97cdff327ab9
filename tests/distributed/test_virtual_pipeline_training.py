"""Virtual pipeline stages (megatron's interleaved 1F1B schedule) train LST and the token baseline
as one process does, and their checkpoints resume without them.

Real `lst-train` flags through `pretrain` (fp32, gloo on CPU), 4 global layers: PP=2 x 2 virtual
stages puts one layer in each of the 4 model chunks (rank 0: layers 0 and 2, the local encoder on
the first chunk; rank 1: layers 1 and 3, the local decoder and head on the last chunk), with 2
micro-batches per step. LST and the baseline on rows packing documents (every chunk reads the
batches), and LST on unpacked rows (the chunks between the first and the last read none) with
the distributed optimizer and the overlapped gradient reduction and parameter gather (one
`no_sync` and `start_grad_sync` per chunk), and LST with 6 layers split unevenly (2 on the first
stage, 4 on the last: chunks of 1 and 2 layers). Initialisation draws other weights under another layout, so every run
starts from one single-process checkpoint taken after one iteration. The interleaved run must give
the single process's losses and FLOP counts at every later iteration, and its checkpoint of iteration 4, resumed by
one process, the single process's loss of iteration 5 (the sharded state dict names each global
layer by its index in the whole model, whatever chunk held it).
"""

import shlex

import pytest
from training.training_cases import tiny_flags, write_corpus

from distributed.harness import TESTS_DIR, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
ITERATIONS = 5
LOSS_TOLERANCE = 1e-5  # relative; fp32 sums in another order under another layout


def with_value(flags: list[str], flag: str, value: str) -> list[str]:
    """`flags` with `flag`'s value replaced."""
    flags = list(flags)
    flags[flags.index(flag) + 1] = value
    return flags


def train(nprocs: int, *runs: list[str]) -> list[dict]:
    """Rank 0's report of `runs`, trained one after the other on `nprocs` processes."""
    args = [item for run in runs for item in ("--training-run", shlex.join(run))]
    return run_distributed(WORKER, nprocs, args, timeout=400)[0]


OVERLAPPED = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
CASES = {  # patching mode, flags of every run, flags of the interleaved run
    "lst": ("curriculum", [], []),
    "baseline": ("none", [], []),
    "lst_unpacked_overlapped": ("curriculum", ["--no-reset-attention-mask", *OVERLAPPED], []),
    "lst_uneven": ("curriculum", ["--num-layers", "6"], ["--decoder-first-pipeline-num-layers", "2"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    """The single-process reference from the shared checkpoint, the interleaved run from it, and
    one process resuming the interleaved run's checkpoint of iteration 4."""
    mode, flags, interleaved_flags = CASES[request.param]
    root = tmp_path_factory.mktemp(f"virtual_pipeline_{request.param}")
    base = tiny_flags(write_corpus(root / "data"), mode) + [
        "--num-layers", "4", "--train-iters", str(ITERATIONS), "--lr-decay-iters",
        str(ITERATIONS), "--eval-interval", str(ITERATIONS)] + flags
    first = with_value(base + ["--save", str(root / "shared")], "--train-iters", "1")
    resumed = base + ["--load", str(root / "shared")]
    _, reference = train(1, first, resumed)
    [interleaved] = train(2, resumed + [
        "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
        "--save", str(root / "interleaved"), "--save-interval", "4", *interleaved_flags])
    [after_interleaved] = train(1, base + ["--load", str(root / "interleaved"),
                                           "--ckpt-step", "4"])
    return reference, interleaved, after_interleaved


def losses(run: dict, first: int) -> list[float]:
    return [run["losses"][str(i)] for i in range(first, ITERATIONS + 1)]


def assert_trains_like(reference: dict, run: dict) -> None:
    """`run`, resumed from the same iteration-1 checkpoint as `reference`, has its losses, FLOPs
    (each micro-batch counted once) and final validation loss."""
    assert reference["resumed_from"] == run["resumed_from"] == 1
    assert losses(run, 2) == pytest.approx(losses(reference, 2), rel=LOSS_TOLERANCE)
    assert run["flops"] == reference["flops"]
    assert run["eval_losses"][str(ITERATIONS)] == pytest.approx(
        reference["eval_losses"][str(ITERATIONS)], rel=LOSS_TOLERANCE)


def assert_resumes_like(reference: dict, after: dict) -> None:
    """`after`, resumed from another layout's iteration-4 checkpoint, has `reference`'s last
    loss."""
    assert after["resumed_from"] == 4
    assert losses(after, ITERATIONS) == pytest.approx(losses(reference, ITERATIONS),
                                                      rel=LOSS_TOLERANCE)


def test_interleaved_schedule_trains_like_one_process(runs):
    reference, interleaved, _ = runs
    assert_trains_like(reference, interleaved)


def test_interleaved_checkpoint_resumes_in_one_process(runs):
    reference, _, after_interleaved = runs
    assert_resumes_like(reference, after_interleaved)
