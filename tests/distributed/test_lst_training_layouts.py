"""Several Adam steps of LST under pipeline x data parallel (distributed optimizer) and tensor x
data parallel give the losses and weights of one process training on the same global batches
(fp32, gloo on CPU). Every copy of a parameter (the last stage's encoder replica, the local
modules on every tensor-parallel rank) must end up bit-equal to the others.

A rank whose local-module gradients are perturbed (as non-deterministic GPU kernels do), or that
reads other tokens than its tensor-parallel peers (under sequence parallelism), must not make its
copies drift apart: their gradients are averaged over the group.

The newest model features (grouped key/value heads and head sizes other than hidden / heads in
the global and the local models, rows packing several documents with attention and RoPE
positions reset at each) train the same under TP=2 with sequence parallelism, TP=4, PP=2, each
with data parallelism and the distributed optimizer where four processes allow, under TP=2 x PP=2
with sequence parallelism, and under PP=2 fed one micro-batch per step (fewer than its stages).
"""

import pytest
import torch

from distributed.harness import WORKERS_DIR, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = WORKERS_DIR / "lst_training_layouts.py"
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5  # the replica drift this guards against was 6e-2 after 3 steps


def global_losses(records: list[dict]) -> list[float]:
    """Token-mean loss per step, summed over the data-parallel replicas' last stages."""
    reporting = [r for r in records if r["losses"] and r["tp_rank"] == 0]
    sums = torch.tensor([r["losses"] for r in reporting]).sum(0)  # [steps, 2]
    return (sums[:, 0] / sums[:, 1]).tolist()


def merged_weights(records: list[dict]) -> dict[str, torch.Tensor]:
    """The unsharded weights of all ranks, checking that every copy of a tensor is equal."""
    weights: dict[str, torch.Tensor] = {}
    for rank, record in enumerate(records):
        for name, values in record["weights"].items():
            value = torch.tensor(values)
            if name in weights:
                assert torch.equal(weights[name], value), (
                    f"rank {rank}'s copy of {name} differs from another rank's by "
                    f"{(weights[name] - value).abs().max().item()}")
            else:
                weights[name] = value
    return weights


def assert_same_training(records: list[dict], reference: list[dict]) -> None:
    losses, reference_losses = global_losses(records), global_losses(reference)
    assert losses == pytest.approx(reference_losses, abs=LOSS_TOLERANCE)
    weights, reference_weights = merged_weights(records), merged_weights(reference)
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        difference = (value - reference_weights[name]).abs().max().item()
        assert difference <= WEIGHT_TOLERANCE, f"{name} differs from one process's by {difference}"


@pytest.fixture(scope="module")
def single_process():
    return run_distributed(WORKER, 1, [], timeout=120)


def test_single_process_training_moves_the_weights(single_process):
    [record] = single_process
    losses = global_losses(single_process)
    assert len(losses) == 3 and all(loss > 1.0 for loss in losses)
    assert any(name.startswith("token_encoder.") for name in record["weights"])


def test_pipeline_by_data_parallel_with_distributed_optimizer(single_process):
    records = run_distributed(WORKER, 4, ["--pp", 2, "--distributed-optimizer"], timeout=240)
    stages = {r["pp_rank"] for r in records if "token_encoder.embedding.weight" in r["weights"]}
    assert stages == {0, 1}, "both stages hold the token encoder"
    assert_same_training(records, single_process)


def test_tensor_by_data_parallel(single_process):
    records = run_distributed(WORKER, 4, ["--tp", 2, "--distributed-optimizer"], timeout=240)
    assert_same_training(records, single_process)


def test_perturbed_tensor_parallel_rank_keeps_the_copies_equal():
    # merged_weights compares the local modules of both tensor-parallel ranks bit for bit.
    records = run_distributed(WORKER, 2, ["--tp", 2, "--perturb-tp-rank", 1, "--steps", 2],
                              timeout=240)
    merged_weights(records)


PAPER_1B_LAYERS = 25  # the paper-1b preset's global layers, here at the tiny width


@pytest.fixture(scope="module")
def single_process_paper_1b_depth():
    return run_distributed(WORKER, 1, ["--num-layers", PAPER_1B_LAYERS, "--steps", 2],
                           timeout=180)


@pytest.mark.parametrize("pp,split,expected", [
    (2, ["--first-stage-layers", 13], [13, 12]),
    (4, ["--first-stage-layers", 7, "--last-stage-layers", 4], [7, 7, 7, 4]),
])
def test_uneven_pipeline_stages_train_like_one_process(single_process_paper_1b_depth, pp, split,
                                                       expected):
    records = run_distributed(
        WORKER, pp, ["--pp", pp, "--num-layers", PAPER_1B_LAYERS, "--steps", 2, *split],
        timeout=300)
    assert [r["global_layers"] for r in sorted(records, key=lambda r: r["pp_rank"])] == expected
    assert_same_training(records, single_process_paper_1b_depth)


NEWEST_FEATURES = ["--newest-features"]
QKV = "self_attention.linear_qkv.weight"


@pytest.fixture(scope="module")
def single_process_newest_features():
    return run_distributed(WORKER, 1, NEWEST_FEATURES, timeout=180)


def test_newest_features_model_has_the_head_shapes(single_process_newest_features):
    [record] = single_process_newest_features
    shapes = {name: torch.tensor(values).shape for name, values in record["weights"].items()}
    # global: 2 groups of (2 query, 1 key, 1 value) heads of 24 channels over the 64-wide input
    assert shapes[f"global_transformer.block.layers.0.{QKV}"] == (2 * (2 + 2) * 24, 64)
    # local: 2 query heads and 1 key/value head of 12 channels over the 32-wide input
    assert shapes[f"token_encoder.layers.0.{QKV}"] == ((2 + 1 + 1) * 12, 32)
    assert shapes[f"local_decoder.layers.0.{QKV}"] == ((2 + 1 + 1) * 12, 32)


@pytest.mark.parametrize("layout", [
    ["--tp", 2, "--sequence-parallel", "--distributed-optimizer"],
    ["--pp", 2, "--distributed-optimizer"],
    ["--tp", 2, "--pp", 2, "--sequence-parallel"],
], ids=["tp2-sp-dp2", "pp2-dp2", "tp2-pp2-sp"])
def test_newest_features_train_like_one_process(single_process_newest_features, layout):
    records = run_distributed(WORKER, 4, [*NEWEST_FEATURES, *layout], timeout=300)
    assert_same_training(records, single_process_newest_features)


def test_fewer_micro_batches_than_pipeline_stages(single_process_newest_features):
    # One micro-batch of the whole global batch: megatron's 1F1B schedule then has no steady
    # phase, and the last stage's backward must still reach the first.
    records = run_distributed(WORKER, 2, [*NEWEST_FEATURES, "--pp", 2,
                                          "--rows-per-micro-batch", 4], timeout=240)
    assert [r["micro_batches"] for r in records] == [1, 1]
    assert_same_training(records, single_process_newest_features)


def test_newest_features_split_over_four_tensor_parallel_ranks():
    one_group_per_head = [*NEWEST_FEATURES, "--global-query-groups", 4, "--steps", 2]
    reference = run_distributed(WORKER, 1, one_group_per_head, timeout=180)
    records = run_distributed(WORKER, 4, [*one_group_per_head, "--tp", 4, "--sequence-parallel"],
                              timeout=300)
    assert_same_training(records, reference)


def test_unequal_tensor_parallel_data_keeps_the_sequence_parallel_copies_equal():
    # merged_weights compares the local modules of both tensor-parallel ranks bit for bit.
    records = run_distributed(WORKER, 2, [*NEWEST_FEATURES, "--tp", 2, "--sequence-parallel",
                                          "--steps", 2, "--unequal-tp-data"], timeout=240)
    merged_weights(records)
