"""The reference's shipped model configurations, and the spellings its loader and model accept
that they invite, import as the reference computes them.

`lst/configs/lst.yaml` read from its own YAML text (sizes shrunk, every other line as shipped)
as the model args its run had (`max_seqlen` from `data.seq_len`, as the reference's train.py
sets it), with the float spellings a YAML config takes (`1e-6`, `5e5`: floats to the
reference's OmegaConf loader, strings to YAML 1.1); its commented-out "changed parameters (50m 420m 50m)"
block, refused as written (its `dim_token` no longer the local width) and computed once
`dim_token` follows the local width; and `downsampling_by_pooling` strings that name one pooling
inside them. Each accepted case agrees with `reference_oracle` (fp32) and exports back the
reference tensors; model sizes and cross-attention windows of nothing are refused naming the
reference's field. lst.yaml's dict form, debug.yaml, lst.yaml at 9e86f12 and apps/main's llama
configs are in test_reference_configurations.
"""

import json
import re

import pytest
import torch

from checkpoint.reference_oracle import reference_logits
from checkpoint.test_reference_configurations import (
    REFERENCE_LST_YAML,
    VOCAB,
    assert_same_tensors,
    imported_model,
    random_batch,
    random_reference_state,
)
from megatron_lst.checkpoint.model_state import full_state_dict
from megatron_lst.checkpoint.reference import export_reference, read_reference_model_args
from megatron_lst.models.reference_config import (
    CROSS_ATTENTION_WINDOW_FIELDS,
    MODEL_SIZE_FIELDS,
    ReferenceImportError,
    lst_config_from_reference,
)

# The model and data sections of lst/configs/lst.yaml as shipped, each size shrunk as in
# REFERENCE_LST_YAML (dim 512 -> 32, dim_token and the local widths 256 -> 16, the lengths
# 12288 -> 64, vocab 40), with the global sizes it leaves to the reference's defaults shrunk and
# written out, and data.seq_len 4096 -> 32.
LST_YAML_MODEL = """\
model:
  n_heads: 8
  dim: 32
  vocab_size: 40
  dim_token: 16
  patch_size: 6
  patching_mode: static
  tie_local_encoder_decoder_logits: false
  patch_in_forward: false
  max_encoder_seq_length: 64
  pad_to_max_length: true
  patching_threshold: 3.1439168453216553
  encoder_hash_byte_group_size: []

  cross_attn_encoder: true # assuming cross_attention is true
  cross_attn_decoder: true # assuming cross_attention is true
  cross_attn_window_encoder: 512
  cross_attn_window_decoder: 512

  # original settings
  dim_local_encoder: 16
  dim_local_decoder: 16
  cross_attn_k: 8
  cross_attn_nheads: 4

  cross_attn_all_layers_decoder: true
  cross_attn_all_layers_encoder: true
  cross_attn_use_flex_attention: true
  cross_attn_init_by_pooling: true
  log_patch_lengths: true
  non_linearity: "swiglu"
  use_rope: true
  recompute_fc1_out: false
  recompute_fc3_out: false
  recompute_attn: false
  custom_bwd: false
  layer_ckpt: "none"
  use_local_encoder_transformer: true
  init_use_gaussian: true
  init_use_depth: "current"
  attn_impl: "xformers"
  attn_bias_type: "block_causal"
  alpha_depth: "disabled"
  max_length: 256
  local_attention_window_len: 512
  max_seqlen: 64
  downsampling_by_pooling: "max"
  dim_global: 32
  n_layers_global: 2
  n_layers_local_encoder: 2
  n_layers_local_decoder: 2
  multiple_of: 256
  n_heads_global: 8
  n_heads_local_encoder: 8
  n_heads_local_decoder: 8

data:
  root_dir: data_example
  sources:
    text_data_source_1: 1.0
    mls_on_the_fly: 1.0
  batch_size: 2
  prefetch_size: 64
  seq_len: 32
  load_async: false
  preprocess_dir: None
  tokenizer_args:
    name: lst
    init_kwargs:
      bpe_tokenizer_path: ???
  patcher_args:
    patching_mode: lst_static
    patch_size: 4
"""
# The run's max_seqlen: the reference's train.py sets it to data.seq_len (4096 -> 32 above).
LST_YAML_RUN_ARGS = {**REFERENCE_LST_YAML, "max_seqlen": 32}

# lst.yaml's commented-out "changed parameters (50m 420m 50m)", shrunk by 32 (global 1280 -> 40
# in 10 heads, local 768 -> 24 in 12 heads, 12 cross-attention heads, 2 slots), its layer
# counts 18/7/7 -> 2/3/3. Uncommented as is, dim_token stays the 256 (-> 8) above it.
CHANGED_PARAMETERS = {
    "dim_global": 40, "dim_local_encoder": 24, "dim_local_decoder": 24, "n_layers_global": 2,
    "n_layers_local_decoder": 3, "n_layers_local_encoder": 3, "n_heads_global": 10,
    "n_heads_local_decoder": 12, "n_heads_local_encoder": 12, "cross_attn_k": 2,
    "cross_attn_nheads": 12, "dim_token": 8}

# Accepted configurations named after the shipped config (or spelling) they are.
SHIPPED = {
    "lst_yaml": REFERENCE_LST_YAML,
    "lst_yaml_changed_parameters_dim_token_as_local": {
        **REFERENCE_LST_YAML, **CHANGED_PARAMETERS, "dim_token": 24},
    # the reference pools by the kind named inside the string: max, max, mean, mean, min
    **{f"lst_yaml_pooling_{name}": {**REFERENCE_LST_YAML, "downsampling_by_pooling": name}
       for name in ("max_pool", "maximum", "meanpool", "avg_mean", "min_pooling")},
}


def write_yaml(tmp_path, text: str):
    path = tmp_path / "lst.yaml"
    path.write_text(text)
    return path


def assert_reference_function(model_args: dict, seed: int) -> None:
    """The imported model's logits are the oracle's (fp32), and its export the tensors."""
    reference = random_reference_state(model_args, seed=seed)
    tokens, patch_lengths = random_batch(model_args, seed=seed)
    model = imported_model(model_args, reference)
    with torch.no_grad():
        expected = reference_logits(model_args, reference, tokens, patch_lengths)
        logits = model(tokens, patch_lengths)
    assert logits.shape == expected.shape == (*tokens.shape, VOCAB)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert_same_tensors(export_reference(full_state_dict(model), model.lst_config), reference)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_reference_configurations_compute_the_reference_function(single_rank, name):
    assert_reference_function(SHIPPED[name], seed=len(name))


def test_lst_yaml_read_from_its_yaml_text_is_the_model_args_its_run_had(tmp_path):
    assert read_reference_model_args(write_yaml(tmp_path, LST_YAML_MODEL)) == LST_YAML_RUN_ARGS


@pytest.mark.parametrize(("data", "max_seqlen"), [
    ("data:\n  seq_len: 48\n", 48), ("data:\n  batch_size: 2\n", 2048), ("", 2048)])
def test_a_training_yaml_gives_the_run_the_max_seqlen_of_its_data_seq_len(tmp_path, data,
                                                                          max_seqlen):
    """The reference's train.py sets model.max_seqlen (the global RoPE table, in patches) to
    data.seq_len, its data loader's default 2048 when left out, before it builds the model; a
    JSON params.json holds the value it ran with already and is read as written."""
    model = "model:\n  dim_global: 64\n  max_seqlen: 12288\n"
    path = write_yaml(tmp_path, model + data)
    assert read_reference_model_args(path) == {"dim_global": 64, "max_seqlen": max_seqlen}
    (tmp_path / "params.json").write_text(
        json.dumps({"model": {"dim_global": 64, "max_seqlen": 12288}, "data": {"seq_len": 48}}))
    assert read_reference_model_args(tmp_path / "params.json")["max_seqlen"] == 12288


@pytest.mark.parametrize("seq_len", ["4096", 0, 2.5, True])
def test_a_training_yaml_whose_data_seq_len_is_no_length_is_refused_naming_it(tmp_path, seq_len):
    path = write_yaml(tmp_path, f"model:\n  dim_global: 64\ndata:\n  seq_len: {json.dumps(seq_len)}\n")
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"data.seq_len={seq_len!r} is not a positive integer; the reference's training sets "
            "the model's max_seqlen to it")):
        read_reference_model_args(path)


@pytest.mark.parametrize(("lines", "norm_eps", "rope_theta"), [
    ("  norm_eps: 1e-6\n  rope_theta: 5e5\n", 1e-6, 5e5),
    ("  norm_eps: 1.0e-6\n  rope_theta: 1.0e6\n", 1e-6, 1e6),
    ("  norm_eps: 1E-3\n  rope_theta: 100_000\n", 1e-3, 100_000),
])
def test_lst_yaml_floats_written_with_an_exponent_are_numbers(single_rank, tmp_path, lines,
                                                               norm_eps, rope_theta):
    """The reference loads its YAML configs with OmegaConf, which reads `1e-6` and `1.0e6` as
    floats (YAML 1.1 leaves both strings): the import reads them as the same numbers."""
    model_section_end = "  n_heads_local_decoder: 8\n"
    text = LST_YAML_MODEL.replace(model_section_end, model_section_end + lines)
    model_args = read_reference_model_args(write_yaml(tmp_path, text))
    assert (model_args["norm_eps"], model_args["rope_theta"]) == (norm_eps, rope_theta)
    config = lst_config_from_reference(model_args)
    assert (config.norm_eps, config.rope_theta) == (norm_eps, rope_theta)
    assert_reference_function(model_args, seed=3)


def test_lst_yaml_changed_parameters_as_written_are_refused_naming_dim_token():
    """Uncommented as shipped, the block keeps `dim_token` 256 under 768-wide local models: the
    reference's encoder patch projection makes slots 256 wide that its forward cannot reshape
    to 768, so it trained no model so; refused naming both fields and what to set."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            "reference token width dim_token 8 != dim_local_encoder 24") + ".*set dim_token to "
                                                  "dim_local_encoder"):
        lst_config_from_reference({**REFERENCE_LST_YAML, **CHANGED_PARAMETERS})


@pytest.mark.parametrize(("pooling", "found"), [
    ("minmax", "it finds 2 (min, max)"), ("avg_max", "it finds 2 (mean, max)"),
    ("MAX", "it finds 0 (none)"), ("", "it finds 0 (none)"), (None, "it finds 0 (none)"),
])
def test_pooling_strings_the_reference_cannot_run_are_refused_naming_what_it_finds(pooling,
                                                                                  found):
    """The reference concatenates a pool for every kind it finds in the string (its patch
    projection then fails) and with none takes a downsampling that fails without patch lengths."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference downsampling_by_pooling={pooling!r} is not supported") + ".*"
            + re.escape(found)):
        lst_config_from_reference({**REFERENCE_LST_YAML, "downsampling_by_pooling": pooling})


@pytest.mark.parametrize("value", [0, None])
@pytest.mark.parametrize("key", MODEL_SIZE_FIELDS)
def test_model_sizes_of_no_units_layers_or_heads_are_refused_naming_the_reference_field(key,
                                                                                       value):
    """Refused naming the reference's field and value and what to give (it named the LSTConfig
    field it would become, or was a comparison of None with a number)."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference {key}={value!r} is not supported: each model here needs a positive "
            "number of units, layers and heads; give the value the checkpoint was trained with")):
        lst_config_from_reference({**REFERENCE_LST_YAML, key: value})


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("key", CROSS_ATTENTION_WINDOW_FIELDS)
def test_cross_attention_windows_of_no_patches_are_refused_naming_the_reference_field(key, value):
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference {key}={value!r} is not supported: a window of no patches") + ".*"
            + re.escape("give the window the checkpoint was trained with (null: each patch its "
                        "own)")):
        lst_config_from_reference({**REFERENCE_LST_YAML, key: value})


def test_lst_yaml_with_its_changed_parameters_uncommented_is_refused_naming_the_key(tmp_path):
    """Uncommented where lst.yaml has it, the block gives dim_local_encoder, dim_local_decoder,
    cross_attn_k and cross_attn_nheads a second time: the reference's OmegaConf loader refuses
    the file (PyYAML would keep the last value), so no run was launched from it."""
    block = "".join(f"  {key}: {value}\n" for key, value in CHANGED_PARAMETERS.items()
                    if key != "dim_token")
    original_settings_end = "  cross_attn_nheads: 4\n"
    text = LST_YAML_MODEL.replace(original_settings_end, original_settings_end + block)
    with pytest.raises(ReferenceImportError, match=re.escape(
            "lst.yaml: key 'dim_local_encoder' is given twice in one mapping, which the "
            "reference's config loader (OmegaConf) refuses; keep one")):
        read_reference_model_args(write_yaml(tmp_path, text))
