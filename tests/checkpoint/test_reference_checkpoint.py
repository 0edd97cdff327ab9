"""Import of the reference implementation's checkpoint reproduces its logits; export gives back
exactly the state dict it came from (fixtures/reference_lst, skipped when absent)."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from megatron_lst.checkpoint.model_state import (
    CheckpointContentError,
    build_full_model,
    full_state_dict,
    load_full_state_dict,
)
from megatron_lst.checkpoint.reference import (
    export_reference,
    import_reference,
    read_reference_model_args,
    read_reference_patcher_args,
    reference_model_args,
)
from megatron_lst.checkpoint.reference_files import read_reference_state_dict
from megatron_lst.models.config import DocumentMaskingConfig, GlobalModelConfig, preset
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference


@pytest.fixture(scope="module")
def reference(reference_fixtures):
    return (read_reference_state_dict(reference_fixtures / "state_dict_A.safetensors"),
            read_reference_model_args(reference_fixtures / "config_A.json"))


@pytest.fixture(scope="module")
def imported_model(single_rank, reference):
    config, state = import_reference(*reference)
    model = build_full_model(config)
    load_full_state_dict(model, state, "reference fixture")
    return model.eval()


@pytest.mark.parametrize("inputs", ["static", "aligned", "ragged"])
def test_imported_model_reproduces_reference_logits(imported_model, reference_fixtures, inputs):
    data = json.loads((reference_fixtures / f"inputs_{inputs}.json").read_text())
    expected = torch.from_numpy(np.load(reference_fixtures / f"logits_A_{inputs}.npy"))
    with torch.no_grad():
        logits = imported_model(torch.tensor(data["tokens"]),
                                torch.tensor(data["patch_lengths"], dtype=torch.int32))
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_export_of_the_loaded_model_equals_the_original_state_dict(imported_model, reference):
    original, model_args = reference
    exported = export_reference(full_state_dict(imported_model), imported_model.lst_config)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name], tensor), name


def test_exported_model_args_equal_the_original(imported_model, reference):
    _, model_args = reference
    assert reference_model_args(imported_model.lst_config, base_args=model_args) == model_args
    # Without the original, the args still describe the same model.
    fresh = reference_model_args(imported_model.lst_config)
    assert import_reference(reference[0], fresh)[0] == imported_model.lst_config


def test_grouped_query_global_layers_round_trip(single_rank):
    """Export is the inverse of import with GQA (the fixture has none): queries of a KV group
    stay with their key and value head."""
    tiny = preset("tiny", 64)
    config = dataclasses.replace(tiny, global_model=GlobalModelConfig(64, 2, 4, 256, 2))
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(tensor.shape, generator=generator)
             for name, tensor in full_state_dict(build_full_model(config)).items()}
    reference = export_reference(state, config)
    head_dim = 64 // 4
    assert reference["global_transformer.layers.0.attention.wk.weight"].shape == (2 * head_dim, 64)
    qkv = state["global_transformer.block.layers.0.self_attention.linear_qkv.weight"]
    # Group 1 = rows of query heads 2, 3, then key head 1, then value head 1.
    group = qkv.view(2, -1, 64)[1]
    torch.testing.assert_close(group[: 2 * head_dim],
                               reference["global_transformer.layers.0.attention.wq.weight"][2 * head_dim:])
    torch.testing.assert_close(group[2 * head_dim: 3 * head_dim],
                               reference["global_transformer.layers.0.attention.wk.weight"][head_dim:])
    back = import_reference(reference, reference_model_args(config))
    assert back[0] == config
    assert back[1].keys() == state.keys()
    assert all(torch.equal(back[1][name], state[name]) for name in state)


def test_pth_consolidated_checkpoint_reads_like_safetensors(reference, tmp_path):
    original, _ = reference
    path = tmp_path / "consolidated.pth"
    torch.save({"model": original, "optim": {"step": 3}}, path)
    loaded = read_reference_state_dict(path)
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[name], original[name]) for name in original)


def test_missing_reference_tensor_is_named(reference):
    state, model_args = reference
    state = dict(state)
    del state["local_decoder.layers.1.feed_forward.w3.weight"]
    with pytest.raises(ReferenceImportError, match=r"local_decoder\.layers\.1\.feed_forward\.w3\.weight"):
        import_reference(state, model_args)


def test_reference_tensors_that_do_not_combine_are_named_with_their_shapes(reference):
    state, model_args = reference
    state = {**state, "global_transformer.layers.0.attention.wq.weight": torch.zeros(64, 65)}
    with pytest.raises(ReferenceImportError, match=r"'global_transformer\.layers\.0\.attention\."
                                                   r"wq\.weight': \(64, 65\).* do not combine"):
        import_reference(state, model_args)


@pytest.mark.parametrize(("name", "content", "reader", "message"), [
    ("consolidated.pth", b'{"model": {}}', read_reference_state_dict,
     r"cannot read reference checkpoint .*truncated, damaged or not written by torch\.save"),
    ("params.json", b"\xb8\x00", read_reference_model_args, r"cannot read reference model args"),
    ("params.json", b"[1, 2]", read_reference_model_args, r"holds a list, not the reference"),
    ("lst.yaml", b"model: {dim_global: [64", read_reference_model_args,
     r"cannot read reference model args .*lst\.yaml"),
    ("lst.yaml", b"- 1\n- 2\n", read_reference_model_args, r"holds a list, not the reference"),
])
def test_unreadable_reference_files_are_refused_naming_them(tmp_path, name, content, reader,
                                                           message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReferenceImportError, match=message):
        reader(path)


@pytest.mark.parametrize("patcher_args", [
    {"patching_mode": "lst_align", "max_patch_length": 8},
    {"patching_mode": "lst_curriculum", "patch_size": 4, "max_patch_length": 8},
    {"patching_mode": "lst_static", "patch_size": 4, "max_patch_length": 3},
    {"patching_mode": "lst_static", "patch_size": 4.0, "max_patch_length": 3.5},
])
def test_a_data_patcher_that_cuts_long_patches_is_refused_by_name(tmp_path, patcher_args):
    """The reference's patcher cuts patches longer than data.patcher_args.max_patch_length, which
    no patching here does: the import took the LST patcher alone, and the model was evaluated on
    other patches than it was trained on."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"model": {"dim_global": 64}, "data": {"patcher_args": patcher_args}}))
    with pytest.raises(ReferenceImportError, match=rf"params.json: data.patcher_args "
                                                   rf"max_patch_length={patcher_args['max_patch_length']} "
                                                   rf"with patching_mode '{patcher_args['patching_mode']}'.*"
                                                   r"the reference's patcher cuts every longer patch"):
        read_reference_patcher_args(path)


@pytest.mark.parametrize("patcher_args, given", [
    ({"patching_mode": "lst_static", "patch_size": 4.5}, "patch_size 4.5:"),
    ({"patching_mode": "lst_static"}, "patch_size 4.5 (the reference default, left out):"),
    ({"patching_mode": "lst_curriculum", "patch_size": 0}, "patch_size 0:"),
    ({"patching_mode": "lst_static", "patch_size": "4"}, "patch_size '4':"),
])
def test_a_data_patcher_of_no_whole_patch_size_is_refused_by_name(tmp_path, patcher_args, given):
    """The reference's lst_static asserts a whole patch size (its default is 4.5); the import
    patched such a run by the model args' patching instead, with no word."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"model": {"dim_global": 64}, "data": {"patcher_args": patcher_args}}))
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"params.json: data.patcher_args patching_mode '{patcher_args['patching_mode']}' with "
            f"{given} the reference patches speech in whole patch sizes only")):
        read_reference_patcher_args(path)


@pytest.mark.parametrize("mode", ["lst_statc", "LST_STATIC", "aligned", ["lst_static"], None])
def test_a_data_patching_mode_the_reference_does_not_have_is_refused_by_name(tmp_path, mode):
    """The reference's loader refuses a patching mode outside its PatchingModeEnum; the import
    took it for no LST patcher and patched by the model args' mode instead, with no word."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"model": {"dim_global": 64},
                                "data": {"patcher_args": {"patching_mode": mode, "patch_size": 4}}}))
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"params.json: data.patcher_args patching_mode {mode!r} is not one of the "
            "reference's 'entropy', 'bpe',")):
        read_reference_patcher_args(path)


@pytest.mark.parametrize("patcher_args", [
    {"patching_mode": "lst_static", "patch_size": 4, "max_patch_length": 4},  # cuts no patch
    {"patching_mode": "lst_align", "max_patch_length": None},
    {"patching_mode": "lst_align"},  # its patch size is not read
    {"patching_mode": "lst_curriculum", "patch_size": 3.0},
    # no LST patcher: read back, for the import to refuse naming it (`reference_patching`)
    {"patching_mode": "entropy", "max_patch_length": 2},
    {"patch_size": 4},  # the reference's entropy patcher
])
def test_a_data_patcher_whose_patches_are_not_cut_reads_back(tmp_path, patcher_args):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"model": {"dim_global": 64}, "data": {"patcher_args": patcher_args}}))
    assert read_reference_patcher_args(path) == patcher_args


def test_the_reference_training_yaml_reads_as_its_params_json(tmp_path):
    """A reference run launched with a YAML config (model args under `model`, the patcher under
    `data.patcher_args`) gives the same arguments as the params.json BLT writes from it (where
    its train.py has set max_seqlen to data.seq_len)."""
    params = {"name": "lst_static", "optim": {"lr": 4e-4},
              "model": {"dim_global": 64, "n_heads_global": 4, "dim_local_encoder": 32,
                        "dim_local_decoder": 32, "cross_attn_k": 2, "patching_mode": "static",
                        "encoder_hash_byte_group_size": [], "attn_impl": "xformers",
                        "max_seqlen": 512},
              "data": {"seq_len": 512, "patcher_args": {"patching_mode": "lst_static",
                                                        "patch_size": 4}}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "lst.yml").write_text(
        "name: lst_static\noptim:\n  lr: 4.0e-04\nmodel:\n  dim_global: 64\n  n_heads_global: 4\n"
        "  dim_local_encoder: 32\n  dim_local_decoder: 32\n  cross_attn_k: 2\n"
        "  patching_mode: static\n  encoder_hash_byte_group_size: []\n  attn_impl: \"xformers\"\n"
        "data:\n  seq_len: 512\n  patcher_args:\n    patching_mode: lst_static\n"
        "    patch_size: 4\n")
    for reader in (read_reference_model_args, read_reference_patcher_args):
        assert reader(tmp_path / "lst.yml") == reader(tmp_path / "params.json")
    assert read_reference_patcher_args(tmp_path / "lst.yml") == {"patching_mode": "lst_static",
                                                                  "patch_size": 4}


def test_truncated_consolidated_checkpoint_is_refused_naming_it(reference, tmp_path):
    path = tmp_path / "consolidated.pth"
    torch.save({"model": reference[0]}, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ReferenceImportError, match=rf"cannot read reference checkpoint {path}"):
        read_reference_state_dict(path)


def test_unmapped_model_tensor_is_named_on_export(imported_model):
    state = full_state_dict(imported_model)
    state["local_decoder.extra_gate.weight"] = torch.zeros(2)
    with pytest.raises(ReferenceImportError, match=r"local_decoder\.extra_gate\.weight"):
        export_reference(state, imported_model.lst_config)


def test_wrong_shape_is_named_when_loading(imported_model, reference):
    config, state = import_reference(*reference)
    name = "global_transformer.block.layers.1.mlp.linear_fc2.weight"
    state[name] = state[name][:, :-1]
    with pytest.raises(CheckpointContentError, match=re.escape(name)):
        load_full_state_dict(imported_model, state, "test checkpoint")


def test_other_vocabulary_is_refused_naming_the_embedding(single_rank, reference):
    state, model_args = reference
    config, full = import_reference(state, model_args)
    model = build_full_model(dataclasses.replace(config, vocab_size=1024))
    with pytest.raises(CheckpointContentError, match=r"token_encoder\.embedding\.weight.*vocabulary"):
        load_full_state_dict(model, full, "reference fixture")


def test_ffn_widths_no_multiple_of_produces_are_refused(single_rank):
    tiny = preset("tiny", 64)
    odd = dataclasses.replace(tiny, global_model=GlobalModelConfig(64, 2, 4, 250))
    with pytest.raises(ReferenceImportError, match="multiple_of"):
        reference_model_args(odd)
    assert reference_model_args(tiny)["multiple_of"] == 256


def test_a_model_field_without_reference_counterpart_is_named_on_export():
    """A model trained with --no-cross-attn-double-residual has no reference arguments: the
    refusal printed both whole configurations (hundreds of characters) and named no field."""
    tiny = preset("tiny", 64)
    single = dataclasses.replace(tiny, cross_attention=dataclasses.replace(
        tiny.cross_attention, double_residual=False))
    with pytest.raises(ReferenceImportError) as refused:
        reference_model_args(single)
    assert str(refused.value) == (
        "this model cannot be written as reference arguments, which have no counterpart of its "
        "cross_attention.double_residual False (the arguments give True): keep the checkpoint in "
        "this package's formats")


@pytest.mark.parametrize("base", [{"max_encoder_seq_length": "512"},
                                  {"max_encoder_seq_length": [512]}])
def test_longest_row_of_the_wrong_type_kept_for_export_is_named(base):
    """A portable checkpoint's reference args come from others: the kept longest row was
    compared with the window as it was (TypeError: '>=' not supported)."""
    with pytest.raises(ReferenceImportError, match=r"give max_encoder_seq_length .*; it must be "
                                                   r"a whole number of tokens"):
        reference_model_args(preset("tiny", 64), base)


@pytest.mark.parametrize("base", [{"multiple_of": "256"}, {"ffn_dim_multiplier": "1.0"}])
def test_reference_args_of_the_wrong_type_kept_for_export_are_named(base):
    with pytest.raises(ReferenceImportError, match=r"give multiple_of .* and ffn_dim_multiplier "
                                                   r".*; both must be numbers"):
        reference_model_args(preset("tiny", 64), base)


@pytest.mark.parametrize("option", ["encoder_enable_byte_ngrams", "cross_attn_init_by_pooling"])
def test_unsupported_reference_options_are_refused_without_fixtures(option):
    model_args = reference_model_args(preset("tiny", 64))
    assert lst_config_from_reference(model_args).vocab_size == 64  # as exported, accepted
    flipped = not model_args[option]
    with pytest.raises(ReferenceImportError, match=f"{option}={flipped} is not supported"):
        lst_config_from_reference({**model_args, option: flipped})


def test_reference_fields_its_model_never_reads_import_whatever_they_say():
    # The reference builds RMSNorm, SwiGLU and the decoder's own output layer whatever these say
    # (its ByteLatentTransformer passes none of them to its local or global models).
    model_args = reference_model_args(preset("tiny", 64))
    other_values = {"non_linearity": "gelu", "norm_type": "layernorm", "pre_norm": False,
                    "weight_tying": True, "tie_local_encoder_decoder_logits": True}
    assert lst_config_from_reference({**model_args, **other_values}) == \
        lst_config_from_reference(model_args)
    exported = reference_model_args(preset("tiny", 64))
    assert {key: exported[key] for key in other_values} == {
        "non_linearity": "swiglu", "norm_type": "rmsnorm", "pre_norm": True,
        "weight_tying": False, "tie_local_encoder_decoder_logits": False}


@pytest.mark.parametrize(("update", "window", "documents"), [
    # "sdpa" and "flex_attention" attend causally over the whole row, whatever the window says:
    # the longest row (max_encoder_seq_length) is the window that computes the same
    ({"attn_impl": "sdpa", "local_attention_window_len": 8, "max_encoder_seq_length": 300}, 300, None),
    ({"attn_impl": "flex_attention", "attn_bias_type": "block_causal"}, 512, None),
    # xformers: the local attention stops at eos_id, the global one too with "block_causal";
    # the cross-attention never (its masks are the patch windows alone)
    ({"attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 8}, 8,
     DocumentMaskingConfig(2, reset_cross_attention=False)),
    ({"attn_impl": "xformers", "attn_bias_type": "causal", "local_attention_window_len": 8,
      "eos_id": 7}, 8,
     DocumentMaskingConfig(7, reset_cross_attention=False, reset_global_attention=False)),
])
def test_attention_rule_follows_the_reference_attn_impl(update, window, documents):
    model_args = {**reference_model_args(preset("tiny", 64)), **update}
    config = lst_config_from_reference(model_args)
    assert config.encoder.window == config.decoder.window == window
    assert config.documents == documents


@pytest.mark.parametrize(("update", "message"), [
    ({"attn_impl": "fmha"}, "attn_impl 'fmha' is not one of"),
    ({"attn_impl": "xformers", "local_attention_window_len": None}, "needs local_attention_window_len"),
    ({"attn_impl": "xformers", "attn_bias_type": "local_block_causal"}, "attn_bias_type 'local_block_causal'"),
    # its local attention always stops at eos_id under xformers (it asserts one is given)
    ({"attn_impl": "xformers", "attn_bias_type": "causal", "local_attention_window_len": 8,
      "eos_id": None}, "attn_impl 'xformers' stops its local attention at eos_id"),
    ({"attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 8,
      "eos_id": None}, "attn_impl 'xformers' stops its local attention at eos_id"),
    ({"attn_impl": "sdpa", "max_encoder_seq_length": None}, "max_encoder_seq_length"),
    ({"cross_attn_k": None}, "cross_attn_k=None"),
    ({"cross_attn_nheads": None}, "cross_attn_nheads=None"),
    ({"multiple_of": None}, "multiple_of=None"),
    ({"vocab_size": -1}, "vocab_size=-1"),
    ({"pm_size": 8}, "pm_size=8 is not supported"),
    # the head sizes the reference itself cannot build (test_reference_head_shapes: the others)
    ({"head_dim": 9}, r"head size 9 of the global model .* is odd"),
    ({"n_kv_heads": 3}, r"n_heads_local_encoder 2 is not divisible by n_kv_heads 3"),
    ({"max_seqlen": 0}, "max_seqlen=0"),
    ({"n_heads_local_encoder": 5}, "dim_local_encoder 32 is not divisible by n_heads_local_encoder 5"),
    ({"dim_global": None}, r"reference dim_global=None is not supported: each model here needs"),
    ({"n_kv_heads_global": 3}, r"n_heads_global 4 is not divisible by n_kv_heads_global 3"),
    ({"cross_attn_window_encoder": 0}, r"cross_attn_window_encoder=0 is not supported: a window of no"),
    # was "unsupported operand", naming no field
    ({"dim_global": "64"}, r"dim_global='64' is not a whole number"),
    # head_dim spelled out beside a size that is no number (was a TypeError traceback)
    ({"head_dim": 16, "n_heads_global": None}, r"reference n_heads_global=None is not supported"),
    ({"head_dim": 16, "dim_local_decoder": None}, r"reference dim_local_decoder=None is not supported"),
    # the reference's forward prepends patch_size - 1 BOE tokens for patching_mode ''
    ({"patching_mode": "", "patch_size": 4}, r"patching_mode '' is not supported: .* 4 - 1 BOE"),
    # no decoder patch projection for equal widths: P*k slots masked over P global states
    ({"dim_global": 32}, r"dim_global 32 == dim_local_decoder 32 with cross_attn_k 2: .*cannot run"),
    # the token width then comes from dim_global // patch_size
    ({"use_local_encoder_transformer": False, "dim_token": None, "patch_size": 4},
     r"token width dim_global 64 // patch_size 4 .* != dim_local_encoder 32"),
    ({"use_local_encoder_transformer": False, "dim_token": None, "patch_size": None},
     r"dim_global 64 // patch_size None, which is no width"),
    ({"dim_token": 16}, r"token width dim_token 16 != dim_local_encoder 32"),
    # a multiplier of 0 gives FFNs of width 0 (it was read as no multiplier, 1.0)
    ({"ffn_dim_multiplier": 0.0}, r"do not describe a model .*ffn_hidden_size \(0\)"),
    # values of another type that were tracebacks (ValueError, TypeError, ZeroDivisionError)
    ({"ffn_dim_multiplier": float("nan")}, r"ffn_dim_multiplier=nan is not a number"),
    ({"ffn_dim_multiplier": "max"}, r"ffn_dim_multiplier='max' is not a number"),
    ({"dim_global": float("nan")}, r"dim_global=nan is not a whole number"),
    ({"cross_attn_window_decoder": 2.5}, r"cross_attn_window_decoder=2.5 is not a whole number"),
    ({"head_dim": {}}, r"head_dim=\{\} is not a whole number"),
    ({"n_kv_heads": "2"}, r"n_kv_heads='2' is not a whole number"),
    ({"n_heads_local_encoder": 0}, r"reference n_heads_local_encoder=0 is not supported"),
    ({"n_heads_local_decoder": False}, r"n_heads_local_decoder=False is not a whole number"),
    # fields the import ignored, building a model the args do not describe
    ({"norm_esp": 1e-3}, r"field\(s\) \['norm_esp'\] that the reference's model args do not "
                         r"have .*correct or remove it"),
    ({"cross_attn_use_flex_attention": False},
     r"option cross_attn_use_flex_attention=False is not supported \(need True\)"),
    ({"attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 8,
      "max_encoder_seq_length": None},
     r"max_encoder_seq_length=None: the reference sizes its local models' RoPE table by it"),
])
def test_reference_args_the_reference_cannot_run_are_refused_naming_the_field(update, message):
    model_args = {**reference_model_args(preset("tiny", 64)), **update}
    with pytest.raises(ReferenceImportError, match=message):
        lst_config_from_reference(model_args)


@pytest.mark.parametrize("key", ["patching_mode", "patch_size"])
@pytest.mark.parametrize("absent", [False, True])
def test_args_without_a_patching_mode_or_patch_size_are_refused_naming_the_field(key, absent):
    """The reference's local models' args require a `patching_mode` string and a `patch_size`
    number (its model args default both to null, which fails their validation): args without
    one describe no model the reference trained, and were imported as if they did."""
    model_args = {**reference_model_args(preset("tiny", 64)), key: None}
    if absent:
        del model_args[key]
    with pytest.raises(ReferenceImportError, match=rf"^reference {key} is null or absent: the "
                                                   r"reference builds no model without"):
        lst_config_from_reference(model_args)


@pytest.mark.parametrize("key", ["head_dim", "n_kv_heads", "n_kv_heads_global"])
@pytest.mark.parametrize("value", [True, False, 2.5, "4", [4]])
def test_head_sizes_that_are_no_whole_number_are_refused_before_the_head_checks(key, value):
    """The reading of whole numbers refuses these (a bool among them: `True` compared as one
    head), so the head-shape checks see an integer or None only."""
    model_args = {**reference_model_args(preset("tiny", 64)), key: value}
    with pytest.raises(ReferenceImportError, match=rf"^reference {key}={re.escape(repr(value))} "
                                                   rf"is not a whole number"):
        lst_config_from_reference(model_args)
    with pytest.raises(ReferenceImportError, match=rf"^reference {key}=-2 is not a number of "
                                                   rf"units or heads"):
        lst_config_from_reference({**model_args, key: -2})

@pytest.mark.parametrize(("update", "message"), [
    ({"norm_esp": 1e-6}, r"field\(s\) \['norm_esp'\]"),
    ({"cross_attn_use_flex_attention": False}, r"cross_attn_use_flex_attention=False"),
    ({"attn_impl": "xformers", "max_encoder_seq_length": None}, r"max_encoder_seq_length=None"),
])
def test_variants_of_the_reference_fixture_config_are_refused_naming_the_field(
        reference_fixtures, update, message):
    """The fixture's own args import; each of these variants was imported, its field ignored:
    a misspelt norm_eps (the model built with the default 1e-5), dense cross-attention masks
    (the reference runs no forward with them), xformers without a local RoPE table size."""
    model_args = read_reference_model_args(reference_fixtures / "config_A.json")
    lst_config_from_reference(model_args)
    with pytest.raises(ReferenceImportError, match=message):
        lst_config_from_reference({**model_args, **update})

def test_head_sizes_spelled_out_as_the_reference_derives_them_are_accepted():
    model_args = reference_model_args(preset("tiny", 64))
    same_heads = {"head_dim": model_args["dim_global"] // model_args["n_heads_global"],
                  "n_kv_heads": model_args["n_heads_local_encoder"]}
    assert same_heads["head_dim"] * model_args["n_heads_local_decoder"] == model_args["dim_local_decoder"]
    assert lst_config_from_reference({**model_args, **same_heads}) == lst_config_from_reference(model_args)


def test_the_global_rope_table_is_the_model_context_both_ways():
    """The reference runs at most `max_seqlen` patches (its global RoPE table; 1024 when left out):
    imported as max_sequence_length, exported from it."""
    model_args = reference_model_args(preset("tiny", 64))
    assert lst_config_from_reference({**model_args, "max_seqlen": 300}).max_sequence_length == 300
    del model_args["max_seqlen"]
    imported = lst_config_from_reference(model_args)
    assert imported.max_sequence_length == 1024
    assert reference_model_args(dataclasses.replace(imported, max_sequence_length=2048),
                                base_args={**model_args, "max_seqlen": 1024})["max_seqlen"] == 2048


@pytest.mark.parametrize("sizes", [[4], "3,4"])
def test_reference_hash_embeddings_are_refused_naming_the_field(sizes):
    """The reference's debug.yaml sets encoder_hash_byte_group_size: [4]."""
    model_args = {**reference_model_args(preset("tiny", 64)), "encoder_hash_byte_group_size": sizes}
    with pytest.raises(ReferenceImportError,
                       match=rf"encoder_hash_byte_group_size={re.escape(repr(sizes))} is not supported"):
        lst_config_from_reference(model_args)


@pytest.mark.parametrize(("heads", "channels"), [(3, 10), (64, 0)])
def test_reference_cross_attention_heads_not_dividing_the_width_are_refused_naming_them(heads,
                                                                                        channels):
    """The reference's cross-attention heads are `dim // nheads` wide: with 3 heads on a local
    width of 32 they cover 30 channels; LSTModel's split the width evenly."""
    model_args = {**reference_model_args(preset("tiny", 64)), "cross_attn_nheads": heads}
    assert model_args["dim_local_encoder"] == 32
    with pytest.raises(ReferenceImportError,
                       match=rf"cross_attn_nheads {heads} does not divide dim_local_encoder 32: "
                             rf".* heads of 32 // {heads} = {channels} channels"):
        lst_config_from_reference(model_args)


@pytest.mark.parametrize("functions, problem", [
    (None, "is not a number of hash functions"), ("3", "is not a whole number"),
    (True, "is not a whole number")])
def test_reference_hash_function_counts_that_are_no_count_are_refused_naming_the_field(
        functions, problem):
    model_args = {**reference_model_args(preset("tiny", 64)), "encoder_hash_byte_group_size": [],
                  "encoder_hash_byte_group_nb_functions": functions}
    with pytest.raises(ReferenceImportError,
                       match=rf"encoder_hash_byte_group_nb_functions={re.escape(repr(functions))} "
                             rf"{problem}"):
        lst_config_from_reference(model_args)


def test_reference_documents_at_another_eos_id_are_refused_naming_it():
    """The reference's local attention stops at `eos_id`, but its global model marks the patches
    holding its fixed EOS id 2 and ends documents at those equal to `eos_id`: with eos_id 5 its
    global attention runs over the whole row, a rule `LSTConfig.documents` cannot express."""
    model_args = {**reference_model_args(preset("tiny", 64)), "attn_impl": "xformers",
                  "attn_bias_type": "block_causal", "local_attention_window_len": 8}
    assert lst_config_from_reference({**model_args, "eos_id": 2}).documents.eos_id == 2
    with pytest.raises(ReferenceImportError, match="eos_id=5 with attn_bias_type 'block_causal'"):
        lst_config_from_reference({**model_args, "eos_id": 5})


def test_reference_mean_pooling_is_spelt_avg_or_mean():
    """The reference pools by mean for "avg" and for "mean" alike."""
    model_args = reference_model_args(preset("tiny", 64))
    configs = [lst_config_from_reference({**model_args, "downsampling_by_pooling": name})
               for name in ("avg", "mean")]
    assert configs[0] == configs[1]
    assert configs[0].cross_attention.pooling == "mean"


def test_reference_min_pooling_imports_and_exports_as_min():
    """The reference pools by min for "min" (its `patch_reduce` with "amin"); the logits are
    compared with the oracle in test_reference_configurations."""
    config = lst_config_from_reference({**reference_model_args(preset("tiny", 64)),
                                        "downsampling_by_pooling": "min"})
    assert config.cross_attention.pooling == "min"
    assert reference_model_args(config)["downsampling_by_pooling"] == "min"


@pytest.mark.parametrize("pooling", [None, "avgmax", "minmax", "MAX", "average", ["max"]])
def test_reference_pooling_without_counterpart_is_refused_naming_the_field(pooling):
    model_args = {**reference_model_args(preset("tiny", 64)), "downsampling_by_pooling": pooling}
    with pytest.raises(ReferenceImportError,
                       match=rf"downsampling_by_pooling={re.escape(repr(pooling))} is not supported"):
        lst_config_from_reference(model_args)


def test_missing_reference_args_take_the_reference_defaults():
    model_args = reference_model_args(preset("tiny", 64))
    assert model_args["multiple_of"] == 256  # the reference's default: leaving it out is the same
    del model_args["multiple_of"]
    assert lst_config_from_reference(model_args) == lst_config_from_reference(
        reference_model_args(preset("tiny", 64)))
    del model_args["cross_attn_encoder"]  # the reference's default is False
    with pytest.raises(ReferenceImportError, match="cross_attn_encoder=False is not supported"):
        lst_config_from_reference(model_args)


def test_no_cross_attention_window_means_the_own_patch_only(reference):
    _, model_args = reference
    config = lst_config_from_reference({**model_args, "cross_attn_window_encoder": None,
                                        "cross_attn_window_decoder": None})
    assert (config.cross_attention.encoder_window, config.cross_attention.decoder_window) == (1, 1)


def test_sdpa_reference_ignores_its_local_window(single_rank, reference, reference_fixtures):
    """The fixture logits come from the reference's "sdpa" path, which attends over the whole row:
    with a local window of 8 tokens in its args (rows are 89-124 tokens) they stay the same, and
    the import must reproduce them. The same window under "xformers" changes them."""
    state, model_args = reference
    data = json.loads((reference_fixtures / "inputs_ragged.json").read_text())
    expected = torch.from_numpy(np.load(reference_fixtures / "logits_A_ragged.npy"))
    tokens = torch.tensor(data["tokens"])
    patch_lengths = torch.tensor(data["patch_lengths"], dtype=torch.int32)

    def logits(update):
        config, full = import_reference(state, {**model_args, **update})
        model = build_full_model(config)
        load_full_state_dict(model, full, "reference fixture")
        with torch.no_grad():
            return model.eval()(tokens, patch_lengths)

    assert (logits({"local_attention_window_len": 8}) - expected).abs().max().item() <= 1e-4
    windowed = logits({"local_attention_window_len": 8, "attn_impl": "xformers", "attn_bias_type": "causal"})
    assert (windowed - expected).abs().max().item() > 1e-2


def test_export_writes_the_attention_rule_the_reference_runs():
    """The exported args reimport to the same model, and name the longest row the reference can
    run (its local RoPE table) and the global RoPE table."""
    tiny = preset("tiny", 64)  # local window 512, no document rule
    short_rows = reference_model_args(tiny)  # rows no longer than the window: causal "sdpa"
    assert (short_rows["attn_impl"], short_rows["max_encoder_seq_length"]) == ("sdpa", 512)
    assert short_rows["max_seqlen"] == tiny.max_sequence_length
    long_rows = reference_model_args(tiny, max_tokens=2048)  # the window cuts rows: "xformers"
    assert (long_rows["attn_impl"], long_rows["attn_bias_type"]) == ("xformers", "causal")
    assert (long_rows["local_attention_window_len"], long_rows["max_encoder_seq_length"]) == (512, 2048)
    flex = reference_model_args(tiny, base_args={"attn_impl": "flex_attention"})
    assert flex["attn_impl"] == "flex_attention"  # as causal as "sdpa": the base's choice stays
    for args in (short_rows, flex):
        assert lst_config_from_reference(args) == tiny
    # the reference has no causal window over packed rows: its "xformers" local attention stops
    # at EOS too (the same function on rows of one document), and reimports so
    assert lst_config_from_reference(long_rows) == dataclasses.replace(
        tiny, documents=DocumentMaskingConfig(2, reset_cross_attention=False,
                                              reset_global_attention=False))


def test_document_rules_export_as_the_reference_attention_that_runs_them():
    """Document masking with the cross-attention unreset is the reference's "xformers"
    "block_causal", and with the global attention unreset too its "causal": both export and
    reimport exactly. Our default rule (cross-attention reset too) exports as "block_causal",
    whose cross-attention sees across documents within its windows."""
    tiny = preset("tiny", 64)
    for bias, documents in (
            ("block_causal", DocumentMaskingConfig(2, reset_cross_attention=False)),
            ("causal", DocumentMaskingConfig(2, reset_cross_attention=False,
                                             reset_global_attention=False)),
            ("block_causal", DocumentMaskingConfig(2))):
        config = dataclasses.replace(tiny, documents=documents)
        args = reference_model_args(config)
        assert (args["attn_impl"], args["attn_bias_type"], args["eos_id"]) == ("xformers", bias, 2)
        reimported = lst_config_from_reference(args)
        assert reimported == dataclasses.replace(
            config, documents=dataclasses.replace(documents, reset_cross_attention=False))


def test_token_width_from_global_width_and_patch_size_imports():
    """Without `use_local_encoder_transformer` the reference's token width is
    `dim_global // patch_size`; where that is the local width the model is the same."""
    model_args = reference_model_args(preset("tiny", 64))
    same = {**model_args, "use_local_encoder_transformer": False, "dim_token": None, "patch_size": 2.0}
    assert lst_config_from_reference(same) == lst_config_from_reference(model_args)


def test_equal_global_and_decoder_widths_import_and_export_the_identity(single_rank):
    """The reference stores no decoder patch projection when dim_global == dim_local_decoder (one
    slot): the import puts the identity there, the export leaves it out, and refuses a model
    whose projection is no longer the identity (it has no reference checkpoint)."""
    tiny = preset("tiny", 64)
    model_args = {**reference_model_args(tiny), "dim_global": 32, "n_heads_global": 2,
                  "cross_attn_k": 1}
    config = lst_config_from_reference(model_args)
    state = full_state_dict(build_full_model(config))
    state["local_decoder.patch_projection.weight"] = torch.eye(32)
    reference = export_reference(state, config)
    assert "local_decoder.patch_embedding_projection.weight" not in reference
    assert "global_transformer.token_embedding_projection.weight" not in reference
    _, state = import_reference(reference, model_args)
    assert torch.equal(state["local_decoder.patch_projection.weight"], torch.eye(32))
    assert export_reference(state, config).keys() == reference.keys()
    state["local_decoder.patch_projection.weight"][0, 1] = 0.5
    with pytest.raises(ReferenceImportError, match=r"patch_projection.weight' is not the identity"):
        export_reference(state, config)
    # our own model with equal widths and two slots: the reference cannot run it
    two_slots = dataclasses.replace(config, cross_attention=dataclasses.replace(
        config.cross_attention, slots_per_patch=2))
    with pytest.raises(ReferenceImportError, match="2 slots per patch has no reference checkpoint"):
        export_reference(full_state_dict(build_full_model(two_slots)), two_slots)


@pytest.mark.parametrize(("rule", "global_ffn"), [
    ({"multiple_of": 8, "ffn_dim_multiplier": 1.3}, 224),  # 8 * ceil(int(1.3 * 170) / 8)
    # 96 is no power of two, and no power of two with any multiplier gives 192 and 96
    ({"multiple_of": 96, "dim_token": 16, "dim_local_encoder": 16, "dim_local_decoder": 16}, 192),
    ({"multiple_of": 48, "ffn_dim_multiplier": 0.7}, 144),
])
def test_ffn_widths_of_any_rule_export_without_the_original_args(rule, global_ffn):
    """A model imported with another FFN rule exports from its config alone (as after a
    training checkpoint, which keeps no reference args): the args written give the same widths
    (the export knew multiplier 1.0 and powers of two only, and refused these)."""
    model_args = {**reference_model_args(preset("tiny", 64)), **rule}
    config = lst_config_from_reference(model_args)
    assert config.global_model.ffn_hidden_size == global_ffn
    written = reference_model_args(config)
    assert lst_config_from_reference(written) == config
    # with the original args kept, their spelling stays
    kept = reference_model_args(config, base_args=model_args)
    assert {key: kept[key] for key in ("multiple_of", "ffn_dim_multiplier")} == {
        "multiple_of": rule["multiple_of"], "ffn_dim_multiplier": rule.get("ffn_dim_multiplier", 1.0)}


def test_whole_numbers_written_as_floats_read_as_integers():
    """The reference reads an integer field given as 64.0 as 64 (pydantic): so does the import."""
    model_args = reference_model_args(preset("tiny", 64))
    floats = {key: float(model_args[key]) for key in
              ("dim_global", "n_heads_global", "dim_local_encoder", "cross_attn_k", "max_seqlen",
               "cross_attn_window_encoder", "multiple_of")}
    config = lst_config_from_reference({**model_args, **floats})
    assert config == lst_config_from_reference(model_args)
    assert isinstance(config.global_model.hidden_size, int)
