"""A tiny LST model (and the token baseline) memorises one small batch."""

import pytest
import torch
from model_cases import ragged_batch, tiny_config

from megatron_lst.models.baseline import TokenBaselineModel
from megatron_lst.models.loss import masked_token_mean
from megatron_lst.models.lst_model import LSTModel

STEPS = 200


def train(model, batch, steps=STEPS, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        per_token = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])  # [B, N]
        loss = masked_token_mean(per_token, batch["loss_mask"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on busy shared cores the threads
    mostly wait on each other (a step is 10x slower with two threads here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind,rule", [("lst", "static"), ("baseline", "none")])
def test_tiny_model_overfits_one_batch(single_rank, one_thread, kind, rule):
    torch.manual_seed(0)
    config = tiny_config()
    megatron_config = config.transformer_config()
    model = (LSTModel(config, megatron_config, transformer_impl="local", kernel_backend="torch")
             if kind == "lst" else TokenBaselineModel(config, megatron_config, transformer_impl="local"))
    batch = ragged_batch(rule, batch_size=2, seed=3)
    losses = train(model.train(), batch)
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps"
