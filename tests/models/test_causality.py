"""docs/architecture.md#the-batch-contract: logits at or before t never depend on tokens after t, for every patching
rule, with ragged patches, padded rows and windows (tokens and patches) shorter than the rows."""

import dataclasses

import pytest
import torch
from model_cases import PATCH_RULES, ragged_batch, tiny_config

from megatron_lst.models.baseline import TokenBaselineModel
from megatron_lst.models.lst_model import LSTModel


@pytest.fixture(scope="module")
def models(single_rank):
    config = tiny_config()
    megatron_config = config.transformer_config()
    # The non-default options: cross-attention only after the last encoder layer and before the
    # first decoder layer, mean pooling, a single residual, k*De != Dg (global input projection).
    variant = dataclasses.replace(config, cross_attention=dataclasses.replace(
        config.cross_attention, slots_per_patch=3, all_encoder_layers=False,
        all_decoder_layers=False, pooling="mean", double_residual=False))
    torch.manual_seed(0)
    return {
        "lst": LSTModel(config, megatron_config, transformer_impl="local",
                        local_attention_backend="sdpa", kernel_backend="torch").eval(),
        "lst_variant": LSTModel(variant, megatron_config, transformer_impl="local",
                                kernel_backend="torch").eval(),
        "baseline": TokenBaselineModel(config, megatron_config, transformer_impl="local").eval(),
    }


SEED = 0
CASES = [("lst", rule) for rule in sorted(PATCH_RULES)] + [("lst_variant", "aligned"), ("baseline", "none")]


@pytest.mark.parametrize("model_name,rule", CASES)
def test_future_tokens_do_not_change_past_logits(models, model_name, rule):
    model = models[model_name]
    batch = ragged_batch(rule, batch_size=3, seed=SEED)
    tokens, patch_lengths = batch["tokens"], batch["patch_lengths"]
    num_tokens = tokens.shape[1]
    generator = torch.Generator().manual_seed(SEED)
    cut = torch.randint(1, num_tokens - 1, (tokens.shape[0],), generator=generator)  # [B] t per row
    future = torch.arange(num_tokens) > cut[:, None]  # [B, N]
    perturbed = torch.where(
        future, torch.randint(0, model.lst_config.vocab_size, tokens.shape, generator=generator), tokens
    )
    with torch.no_grad():
        before = model(tokens, patch_lengths)  # [B, N, V]
        after = model(perturbed, patch_lengths)
    past = ~future
    assert (before[past] - after[past]).abs().max() < 1e-6
    # The perturbation reaches the future: the test would see a leak if there were one.
    assert (before[future] - after[future]).abs().max() > 1e-3
