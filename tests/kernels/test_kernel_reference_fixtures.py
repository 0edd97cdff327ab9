"""Patch ids equal the LST reference's own intermediates (skips without the shared fixtures)."""

import json
from pathlib import Path

import pytest
import torch
from lst_kernels import patch_ids_from_lengths

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"


@pytest.fixture(scope="module")
def static_case():
    if not (FIXTURES / "intermediates_A_static.safetensors").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    safetensors = pytest.importorskip("safetensors.torch")
    inputs = json.loads((FIXTURES / "inputs_static.json").read_text())
    intermediates = safetensors.load_file(str(FIXTURES / "intermediates_A_static.safetensors"))
    return inputs, intermediates


def test_encoder_and_decoder_patch_ids_match_reference(static_case):
    inputs, intermediates = static_case
    lengths = torch.tensor(inputs["patch_lengths"])  # [B, P], rows sum to N + 1
    num_tokens = len(inputs["tokens"][0])
    torch.testing.assert_close(
        patch_ids_from_lengths(lengths, num_tokens), intermediates["patch_ids"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        patch_ids_from_lengths(lengths[:, 1:], num_tokens),
        intermediates["decoder_patch_ids"],
        rtol=0,
        atol=0,
    )
