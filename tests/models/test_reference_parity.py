"""LSTModel with the reference checkpoint reproduces the reference logits (fixtures README)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lst.models.lst_model import LSTModel
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference
from megatron_lst.models.reference_tensors import canonical_state_dict, load_reference_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures absent: {FIXTURES}")


@pytest.fixture(scope="module")
def reference_model(single_rank):
    config = lst_config_from_reference(json.loads((FIXTURES / "config_A.json").read_text())["model_args"])
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend="sdpa", kernel_backend="torch")
    load_reference_checkpoint(model, FIXTURES / "state_dict_A.safetensors")
    return model.eval()


@pytest.mark.parametrize("inputs", ["static", "aligned", "ragged"])
def test_logits_match_reference(reference_model, inputs):
    data = json.loads((FIXTURES / f"inputs_{inputs}.json").read_text())
    tokens = torch.tensor(data["tokens"])
    patch_lengths = torch.tensor(data["patch_lengths"], dtype=torch.int32)
    expected = torch.from_numpy(np.load(FIXTURES / f"logits_A_{inputs}.npy"))
    with torch.no_grad():
        logits = reference_model(tokens, patch_lengths)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_loss_matches_reference_reduction(reference_model):
    """Per-token CE from the vocab-parallel head, reduced as the reference does, equals the CE of
    the reference logits under the same mask."""
    data = json.loads((FIXTURES / "inputs_ragged.json").read_text())
    tokens, targets = torch.tensor(data["tokens"]), torch.tensor(data["targets"])
    mask = torch.tensor(data["mask"], dtype=torch.float32)
    patch_lengths = torch.tensor(data["patch_lengths"], dtype=torch.int32)
    expected_logits = torch.from_numpy(np.load(FIXTURES / "logits_A_ragged.npy"))
    expected = (torch.nn.functional.cross_entropy(expected_logits.flatten(0, 1), targets.flatten(),
                                                  reduction="none").view_as(mask) * mask).sum()
    expected = expected / (mask.sum() + 1e-6)
    with torch.no_grad():
        per_token = reference_model(tokens, patch_lengths, labels=targets)  # [B, N]
    loss = (per_token * mask).sum() / (mask.sum() + 1e-6)
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_intermediate_global_output_matches(reference_model):
    """The global transformer's output on the static inputs matches the stored intermediate."""
    from safetensors.torch import load_file

    stored = load_file(str(FIXTURES / "intermediates_A_static.safetensors"))
    data = json.loads((FIXTURES / "inputs_static.json").read_text())
    tokens = torch.tensor(data["tokens"])
    patch_lengths = torch.tensor(data["patch_lengths"], dtype=torch.int32)
    captured = {}
    hook = reference_model.global_transformer.register_forward_hook(
        lambda module, args, output: captured.setdefault("global", output))
    try:
        with torch.no_grad():
            reference_model(tokens, patch_lengths)
    finally:
        hook.remove()
    assert (captured["global"].transpose(0, 1) - stored["global_out"]).abs().max().item() <= 1e-4


def test_unmapped_reference_tensor_is_an_error(reference_model):
    from safetensors.torch import load_file

    reference = load_file(str(FIXTURES / "state_dict_A.safetensors"))
    reference["local_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceImportError, match="left unmapped"):
        canonical_state_dict(reference, reference_model.lst_config)
