"""The same batch gives the same loss and gradients under TP=1 vs TP=2, PP=1 vs PP=2 and TP2xPP2,
with sequence parallelism on and off (fp32, gloo on CPU; docs/architecture.md#parallelism)."""

from pathlib import Path

import pytest
import torch
from distributed.harness import run_distributed

WORKER = Path(__file__).resolve().parent / "lst_parallel_worker.py"
TOLERANCE = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def merged(records: list[dict], variant: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and unsharded gradients of one variant, from all ranks. Every rank holding a tensor
    (tensor-parallel peers, both copies of the encoder replica) must report the same gradient."""
    grads: dict[str, torch.Tensor] = {}
    losses = []
    for rank, record in enumerate(records):
        result = record[variant]
        if "loss" in result:
            losses.append(result["loss"])
        for name, values in result["grads"].items():
            grad = torch.tensor(values)
            if name in grads:
                difference = (grads[name] - grad).abs().max().item()
                assert difference <= TOLERANCE, f"{variant}: rank {rank} disagrees on {name} by {difference}"
            else:
                grads[name] = grad
    assert losses and max(losses) - min(losses) <= TOLERANCE, losses
    return losses[0], grads


@pytest.fixture(scope="module")
def reference():
    return merged(run_distributed(WORKER, 1, ["--tp", "1", "--pp", "1"], timeout=240), "no_sp")


def assert_every_variant_matches(records, reference_loss, reference_grads):
    """Each variant the workers ran (e.g. with and without sequence parallelism) has the single
    process's loss and gradients, to TOLERANCE, and the gradients are not all near zero."""
    for variant in records[0]:
        loss, grads = merged(records, variant)
        assert abs(loss - reference_loss) <= TOLERANCE, f"{variant}: loss {loss} vs {reference_loss}"
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            difference = (grad - reference_grads[name]).abs().max().item()
            assert difference <= TOLERANCE, f"{variant}: gradient of {name} differs by {difference}"
        assert any(grad.abs().max() > 1e-3 for grad in grads.values())


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layout_matches_single_process(reference, tp, pp):
    reference_loss, reference_grads = reference
    sequence_parallel = "both" if tp > 1 else "off"
    records = run_distributed(
        WORKER, tp * pp, ["--tp", tp, "--pp", pp, "--sequence-parallel", sequence_parallel],
        timeout=400,
    )
    assert_every_variant_matches(records, reference_loss, reference_grads)


def test_head_shapes_under_tensor_parallelism():
    """Grouped key/value heads and head sizes other than hidden / heads (global and local): TP=2
    with and without sequence parallelism gives the single process's loss and gradients (the
    global QKV rows split by whole query groups of 24-channel heads)."""
    reference_loss, reference_grads = merged(
        run_distributed(WORKER, 1, ["--tp", "1", "--pp", "1", "--head-shapes"], timeout=240), "no_sp")
    qkv = reference_grads["global_transformer.block.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (2 * (2 + 2) * 24, 64)  # 2 groups of (2 query, 1 key, 1 value) heads
    records = run_distributed(WORKER, 2, ["--tp", 2, "--pp", 1, "--sequence-parallel", "both",
                                          "--head-shapes"], timeout=400)
    assert_every_variant_matches(records, reference_loss, reference_grads)


def test_packed_documents_under_tensor_sequence_and_pipeline_parallelism():
    """Rows packing several documents, attention and RoPE positions reset at each: TP2 x PP2,
    with and without sequence parallelism, gives the single process's loss and gradients (every
    stage cuts its attention at the documents of the same tokens; the global key starts and
    positions cover the whole patch sequence under sequence parallelism)."""
    reference_loss, reference_grads = merged(
        run_distributed(WORKER, 1, ["--tp", "1", "--pp", "1", "--documents"], timeout=240), "no_sp")
    records = run_distributed(WORKER, 4, ["--tp", 2, "--pp", 2, "--sequence-parallel", "both",
                                          "--documents"], timeout=400)
    assert_every_variant_matches(records, reference_loss, reference_grads)
