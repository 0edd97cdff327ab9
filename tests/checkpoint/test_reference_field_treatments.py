"""Every field of the reference's model args has one treatment in the import: read into the
model (`REFERENCE_DEFAULTS`, where `REQUIRED_REFERENCE_OPTIONS` allow one value only), ignored by
the reference's own model (`REFERENCE_FIELDS_ITS_MODEL_IGNORES`), not carried over because it
changes training or initialisation only (`REFERENCE_FIELDS_NOT_CARRIED_OVER`), or without effect
on any model the import accepts (`REFERENCE_FIELDS_WITHOUT_EFFECT`). A field of the last kind
imports with any value as the same model; `share_encoder_decoder_emb`, the subtlest, is checked
on the reference's own checkpoint and logits too (skipped without the fixtures)."""

import json

import numpy as np
import pytest
import torch

from megatron_lst.checkpoint.model_state import build_full_model, load_full_state_dict
from megatron_lst.checkpoint.reference import (
    import_reference,
    read_reference_model_args,
    reference_model_args,
)
from megatron_lst.checkpoint.reference_files import read_reference_state_dict
from megatron_lst.models.config import preset
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference
from megatron_lst.models.reference_fields import (
    REFERENCE_DEFAULTS,
    REFERENCE_FIELDS_ITS_MODEL_IGNORES,
    REFERENCE_FIELDS_NOT_CARRIED_OVER,
    REFERENCE_FIELDS_WITHOUT_EFFECT,
    REFERENCE_MODEL_FIELDS,
    REQUIRED_REFERENCE_OPTIONS,
)

TREATMENTS = {
    "read": set(REFERENCE_DEFAULTS),
    "ignored by the reference's model": set(REFERENCE_FIELDS_ITS_MODEL_IGNORES),
    "not carried over": set(REFERENCE_FIELDS_NOT_CARRIED_OVER),
    "without effect": set(REFERENCE_FIELDS_WITHOUT_EFFECT),
}

# A value other than the reference's default for each field without effect.
OTHER_VALUES = {
    "dim": 96, "n_layers": 3, "n_heads": 2, "dim_token_emb": 7, "dim_patch_emb": 9,
    "share_encoder_decoder_emb": False, "rope_use_fp32_in_outer_product": True, "max_length": 3,
    "encoder_hash_byte_group_vocab": 7, "ngram_vocab_sizes": 5,
    "encoder_ngram_table_dir": "/ngrams", "encoder_ngram_to_size_str": "2:50,3:60",
    "architecture": "other", "output_size": 10, "norm_affine": False,
    "global_local_decoder_residual_layer": "linear", "tie_local_encoder_decoder": True,
    "conv_kernel_size": 3, "encoder_lm_loss": True, "encoder_preds_low_entropy_toks": 0.5,
    "encoder_preds_random_toks": 0.5, "encoder_enable_byte_group_hash": True,
    "attn_to_keep": "none", "patch_in_forward": True, "patching_threshold": 3.1,
    "patching_threshold_add": 0.1, "patcher_curr_align_steps": 100,
    "patcher_curr_mixed_steps": 200, "monotonicity": True, "patching_batch_size": 8,
    "patching_device": "cpu", "max_patch_length": 6, "patching_thresholds_str": "1,2",
    "entropy_model_checkpoint_dir": "/entropy", "entropy_model_is_ngram_model": True,
    "pad_to_max_length": True, "tokenize_with_bpe_delimiter": True, "seed": 7,
    "recompute_fc1_out": True, "recompute_fc3_out": True, "recompute_attn": False,
    "custom_bwd": True, "layer_ckpt": "none", "sequence_parallel": True, "loss_parallel": True,
    "fuse_sequence_parallel": True, "use_fsdp": False, "log_patch_lengths": True,
    "full_logging_n_layers": 1,
}


def test_every_reference_field_has_exactly_one_treatment():
    treated = [field for fields in TREATMENTS.values() for field in fields]
    assert sorted(REFERENCE_MODEL_FIELDS - set(treated)) == []
    assert sorted(set(treated) - REFERENCE_MODEL_FIELDS) == []
    assert len(treated) == len(set(treated)), "a field with two treatments"
    assert set(REQUIRED_REFERENCE_OPTIONS) <= TREATMENTS["read"]
    assert all(reason for reason in REFERENCE_FIELDS_WITHOUT_EFFECT.values())


@pytest.mark.parametrize("field", sorted(REFERENCE_FIELDS_WITHOUT_EFFECT))
def test_a_field_without_effect_imports_whatever_it_says(field):
    assert set(OTHER_VALUES) == set(REFERENCE_FIELDS_WITHOUT_EFFECT)
    model_args = reference_model_args(preset("tiny", 64))
    assert lst_config_from_reference({**model_args, field: OTHER_VALUES[field]}) == \
        lst_config_from_reference(model_args)


def test_the_export_keeps_the_fields_without_effect_it_was_given_else_leaves_them_out():
    """An export writes each field without effect as the imported args gave it (any value is
    the same model, so any is true), and without such args leaves it out: the reference's
    default, which is the same model too."""
    base = {**reference_model_args(preset("tiny", 64)), **OTHER_VALUES}
    config = lst_config_from_reference(base)
    written = reference_model_args(config, base)
    assert {field: written[field] for field in OTHER_VALUES} == OTHER_VALUES
    assert lst_config_from_reference(written) == config
    assert set(reference_model_args(config)).isdisjoint(REFERENCE_FIELDS_WITHOUT_EFFECT)


@pytest.mark.parametrize("share", [True, False])
def test_local_widths_the_reference_cannot_run_are_refused_naming_them(share):
    """A decoder narrower than the encoder: the reference builds such a model (its decoder patch
    projection of the encoder's or the decoder's token width, by `share_encoder_decoder_emb`)
    but runs no forward, so the import refuses it naming the widths, whichever that value."""
    model_args = reference_model_args(preset("tiny", 64))
    encoder_width = model_args["dim_local_encoder"]
    narrower = {"dim_local_decoder": encoder_width // 2, "dim_token": None,
                "share_encoder_decoder_emb": share}
    with pytest.raises(ReferenceImportError, match=(
            rf"^reference dim_local_decoder {encoder_width // 2} != dim_local_encoder "
            rf"{encoder_width}: the reference's local decoder reads the encoder's "
            rf"{encoder_width}-wide token states .* runs no forward")):
        lst_config_from_reference({**model_args, **narrower})


@pytest.mark.parametrize("share", [True, False])
def test_the_fixture_imports_with_either_share_encoder_decoder_emb_as_its_logits(
        single_rank, reference_fixtures, share):
    """The reference's checkpoint (saved with `share_encoder_decoder_emb` true) read with either
    value: the decoder's token width is `dim_token` 32 == dim_local_decoder both ways, so the
    same tensors, the same model and the reference's logits."""
    state = read_reference_state_dict(reference_fixtures / "state_dict_A.safetensors")
    model_args = read_reference_model_args(reference_fixtures / "config_A.json")
    assert model_args["share_encoder_decoder_emb"] is True
    config, ours = import_reference(state, {**model_args, "share_encoder_decoder_emb": share})
    assert config == lst_config_from_reference(model_args)
    model = build_full_model(config)
    load_full_state_dict(model, ours, "reference fixture")
    data = json.loads((reference_fixtures / "inputs_static.json").read_text())
    expected = torch.from_numpy(np.load(reference_fixtures / "logits_A_static.npy"))
    with torch.no_grad():
        logits = model.eval()(torch.tensor(data["tokens"]),
                              torch.tensor(data["patch_lengths"], dtype=torch.int32))
    assert (logits - expected).abs().max().item() <= 1e-4
