"""A tiny megatron.core GPTModel gives the same losses under every parallel layout.

One fixed batch, fp32, no dropout. The worker (workers/gpt_smoke.py) measures the loss
of the fresh model, of the model loaded from a dist checkpoint saved under TP=2, and
after one distributed-optimizer (Adam) step, under TP=1 (with DP=2), TP=2 (with sequence
parallelism), PP=2 and TP=2 x PP=2; on CPU all of it runs through megatron_lst.compat.cpu.
"""

import math

import pytest

from distributed.harness import WORKERS_DIR, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = WORKERS_DIR / "gpt_smoke.py"
TOLERANCE = 1e-5
VOCAB_SIZE = 128  # the worker's; a fresh model's loss is close to ln(vocab)


def last_stage_losses(records: list[dict]) -> dict[str, float]:
    """One loss per measurement from the ranks that report it, checking that they agree."""
    losses: dict[str, float] = {}
    for rank, record in enumerate(records):
        for name, loss in record.items():
            if loss is None:
                continue
            if name in losses:
                assert loss == pytest.approx(losses[name], abs=TOLERANCE), (
                    f"{name}: rank {rank} reports {loss}, another rank {losses[name]}")
            losses.setdefault(name, loss)
    return losses


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("gpt_smoke_checkpoints")


@pytest.fixture(scope="module")
def tp2(checkpoints):
    return last_stage_losses(run_distributed(
        WORKER, 2, ["tp2", "--checkpoints", checkpoints], timeout=240))


@pytest.fixture(scope="module")
def tp1_then_pp2(checkpoints, tp2):
    return last_stage_losses(run_distributed(
        WORKER, 2, ["tp1_then_pp2", "--checkpoints", checkpoints], timeout=240))


@pytest.fixture(scope="module")
def tp2_pp2(checkpoints, tp2):
    return last_stage_losses(run_distributed(
        WORKER, 4, ["tp2_pp2", "--checkpoints", checkpoints], timeout=240))


def test_fresh_model_is_untrained_and_step_lowers_loss(tp1_then_pp2):
    fresh, trained = tp1_then_pp2["tp1.fresh"], tp1_then_pp2["tp1.trained"]
    assert fresh == pytest.approx(math.log(VOCAB_SIZE), abs=0.2)
    assert trained < fresh - 0.1


def test_cpu_initialization_is_identical_under_tp1_and_tp2(tp2, tp1_then_pp2):
    assert tp2["tp2.fresh"] == pytest.approx(tp1_then_pp2["tp1.fresh"], abs=TOLERANCE)


def test_tp2_checkpoint_loads_into_tp1(tp1_then_pp2):
    # The init checkpoint was saved under TP=2.
    assert tp1_then_pp2["tp1.loaded_init"] == pytest.approx(
        tp1_then_pp2["tp1.fresh"], abs=TOLERANCE)


def test_sequence_parallel_matches_tp1(tp2, tp1_then_pp2):
    assert tp2["tp2_sp.loaded_init"] == pytest.approx(tp1_then_pp2["tp1.fresh"], abs=TOLERANCE)


def test_pipeline_parallel_matches_tp1(tp1_then_pp2):
    assert tp1_then_pp2["pp2.loaded_init"] == pytest.approx(
        tp1_then_pp2["tp1.fresh"], abs=TOLERANCE)


def test_tp2_pp2_matches_tp1(tp2_pp2, tp1_then_pp2):
    assert tp2_pp2["tp2_pp2_sp.loaded_init"] == pytest.approx(
        tp1_then_pp2["tp1.fresh"], abs=TOLERANCE)


@pytest.mark.parametrize("source, name", [
    ("tp2", "tp2_sp.trained"),
    ("tp1_then_pp2", "pp2.trained"),
    ("tp2_pp2", "tp2_pp2_sp.trained"),
])
def test_distributed_optimizer_step_matches_tp1(request, source, name, tp1_then_pp2):
    losses = request.getfixturevalue(source)
    assert losses[name] == pytest.approx(tp1_then_pp2["tp1.trained"], abs=TOLERANCE)


def test_trained_tp2_checkpoint_gives_same_loss_under_tp1(tp2, tp1_then_pp2):
    assert tp1_then_pp2["tp1.loaded_tp2_trained"] == pytest.approx(
        tp2["tp2_sp.trained"], abs=TOLERANCE)
