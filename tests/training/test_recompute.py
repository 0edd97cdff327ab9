"""Activation recomputation (--recompute-granularity/--recompute-method/--recompute-num-layers)
changes memory, not results: the same loss and gradients, fewer activation bytes kept for the
backward pass (measured with autograd's saved-tensor hooks, printed with `-s`)."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from model_cases import ragged_batch, tiny_config  # noqa: E402

from megatron_lst.models import LSTModel  # noqa: E402
from megatron_lst.models.loss import masked_token_mean  # noqa: E402
from megatron_lst.parallel import destroy_parallel, initialize_parallel  # noqa: E402

RECOMPUTE = {
    "none": {},
    "full uniform 1": dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1),
    "full block 2": dict(recompute_granularity="full", recompute_method="block",
                         recompute_num_layers=2),
}


@pytest.fixture
def parallel():
    initialize_parallel()
    yield
    destroy_parallel()


def step(recompute: dict) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and bytes of tensors saved for backward of one step of a 4-layer model."""
    torch.manual_seed(0)
    config = tiny_config()
    config = dataclasses.replace(config, global_model=dataclasses.replace(
        config.global_model, num_layers=4))
    model = LSTModel(config, config.transformer_config(use_cpu_initialization=True, **recompute),
                     transformer_impl="local", local_attention_backend="sdpa",
                     kernel_backend="torch")
    batch = ragged_batch("static", batch_size=4, seed=3)
    saved_bytes = 0

    def pack(tensor):
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        per_token = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
        loss = masked_token_mean(per_token, batch["loss_mask"])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads, saved_bytes


def test_recomputation_keeps_results_and_saves_activations(parallel):
    results = {name: step(settings) for name, settings in RECOMPUTE.items()}
    loss, grads, saved = results["none"]
    for name, (other_loss, other_grads, other_saved) in results.items():
        print(f"recompute {name}: loss {other_loss:.6f}, activations kept for backward "
              f"{other_saved / 2**20:.2f} MiB")
        assert other_loss == loss
        for key, grad in grads.items():
            torch.testing.assert_close(other_grads[key], grad, rtol=0, atol=1e-6, msg=key)
        if name != "none":
            assert other_saved < saved
