"""Every model configuration has flags and YAML keys that give it back exactly, and a checkpoint's
configuration decides the model of a run that loads it."""

import dataclasses
import json
import typing

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings

from megatron_lst.checkpoint.model_state import lst_config_to_dict
from megatron_lst.models.config import DocumentMaskingConfig, LSTConfig, preset
from megatron_lst.training import arguments, model_flags
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpoint_flags import DamagedCheckpointFlagError
from megatron_lst.training.checkpointing import FORMAT_VERSION, METADATA_FILENAME, TRACKER_FILENAME
from megatron_lst.training.model_provider import lst_config_from_args
from training.model_config_cases import EOS_ID, lst_configs
from training.training_cases import write_model_index

# The non-model flags a run needs; none of them changes the model.
RUN = ["--seq-length", "2", "--train-iters", "1", "--lr", "1e-3"]
LST_RUN = [*RUN, "--patching-mode", "static", "--max-tokens", "8"]


def _masked(config: LSTConfig) -> LSTConfig:
    """`config` with the default document rule (--reset-attention-mask on)."""
    return dataclasses.replace(config, documents=DocumentMaskingConfig(EOS_ID))


def _leaf_fields(kind, prefix: str = "") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(kind)
    leaves = {}
    for field in dataclasses.fields(kind):
        hint = hints[field.name]
        optional = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):
            hint = optional[0]  # an optional part (documents)
        if dataclasses.is_dataclass(hint):
            leaves.update(_leaf_fields(hint, f"{prefix}{field.name}."))
        else:
            leaves[prefix + field.name] = hint
    return leaves


def test_every_config_field_but_the_vocabulary_has_one_flag_of_its_type():
    leaves = _leaf_fields(LSTConfig)
    assert leaves.pop("vocab_size") is int  # the joint vocabulary's size, not a flag
    assert leaves.pop("documents.eos_id") is int  # the vocabulary's EOS, not a flag
    assert sorted(f.field for f in model_flags.MODEL_FLAGS) == sorted(leaves)
    for flag in model_flags.MODEL_FLAGS:
        assert flag.kind in typing.get_args(leaves[flag.field]) + (leaves[flag.field],), flag
    assert len({f.dest for f in model_flags.MODEL_FLAGS}) == len(model_flags.MODEL_FLAGS)


def test_help_groups_the_model_flags():
    parser = arguments.build_parser()
    groups = {group.title: {s for action in group._group_actions for s in action.option_strings}
              for group in parser._action_groups}
    assert {f.flag for f in model_flags.GLOBAL_MODEL_FLAGS} <= \
        groups["network size (global transformer)"]
    assert {f.flag for f in model_flags.LOCAL_MODEL_FLAGS} <= \
        groups["LST local models and cross-attention"]
    text = parser.format_help()
    assert "--local-encoder-ffn-hidden-size" in text and "--no-cross-attn-double-residual" in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=lst_configs())
def test_flags_and_yaml_give_back_any_lst_config(config, tmp_path_factory):
    argv = model_flags.config_to_argv(config)
    from_flags = validate_args(parse_args([*LST_RUN, *argv]), 1)
    assert lst_config_from_args(from_flags, config.vocab_size, EOS_ID) == config

    path = tmp_path_factory.mktemp("yaml") / "model.yaml"
    path.write_text(yaml.safe_dump(model_flags.config_to_yaml_mapping(config)))
    from_yaml = validate_args(parse_args([*LST_RUN, "--config", str(path)]), 1)
    assert lst_config_from_args(from_yaml, config.vocab_size, EOS_ID) == config


@settings(max_examples=30, deadline=None)
@given(config=lst_configs())
def test_flags_give_back_the_global_part_for_the_token_baseline(config):
    # LST only: position reset, and turning the cross-attention or global reset off
    assume(config.documents is None or not (config.documents.reset_position_ids or not (
        config.documents.reset_cross_attention and config.documents.reset_global_attention)))
    args = validate_args(parse_args([*RUN, *model_flags.config_to_argv(config, baseline=True)]), 1)
    built = lst_config_from_args(args, config.vocab_size, EOS_ID)
    assert (built.global_model, built.norm_eps, built.rope_theta, built.max_sequence_length,
            built.init_std, built.documents) == (config.global_model, config.norm_eps,
                                                 config.rope_theta, config.max_sequence_length,
                                                 config.init_std, config.documents)


@pytest.mark.parametrize("name", arguments.PRESET_NAMES)
def test_presets_still_set_every_model_flag(name):
    args = validate_args(parse_args(["--preset", name, *LST_RUN]), 1)
    assert lst_config_from_args(args, 1020, EOS_ID) == _masked(preset(name, 1020))


def test_yaml_takes_both_spellings_of_a_switch_pair(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cross-attn-double-residual: false\nno-cross-attn-all-layers-decoder: true\n"
                    "cross_attn_all_layers_encoder: true\n")
    args = parse_args(["--config", str(path)])
    assert (args.cross_attn_double_residual, args.cross_attn_all_layers_decoder,
            args.cross_attn_all_layers_encoder) == (False, False, True)
    path.write_text("cross-attn-pooling: median\n")
    with pytest.raises(ArgumentError, match="'median' is not one of"):
        parse_args(["--config", str(path)])


def test_impossible_local_model_is_named():
    argv = ["--preset", "tiny-cpu", *LST_RUN, "--local-encoder-hidden-size", "30",
            "--local-decoder-hidden-size", "30", "--local-encoder-heads", "6",
            "--local-decoder-heads", "6", "--cross-attn-heads", "6"]
    with pytest.raises(ArgumentError, match="--local-encoder-hidden-size 30 over --local-encoder-heads 6 "
                       r"makes attention heads of 5 channels, which must be even: .*"
                       r"\(--local-encoder-kv-channels\)"):
        validate_args(parse_args(argv), 1)


def test_head_shape_flags_build_grouped_heads_of_their_size():
    argv = ["--preset", "tiny-cpu", *LST_RUN, "--local-encoder-query-groups", "1",
            "--local-decoder-kv-channels", "12", "--kv-channels", "20", "--num-query-groups", "2"]
    config = lst_config_from_args(validate_args(parse_args(argv), 1), 64, EOS_ID)
    assert (config.encoder.num_query_groups, config.encoder.head_dim) == (1, 16)
    assert (config.decoder.num_query_groups, config.decoder.kv_channels) == (None, 12)
    assert (config.global_model.num_query_groups, config.global_model.kv_channels) == (2, 20)
    # a head size makes a width that heads do not divide possible, as in Megatron-LM
    argv = ["--preset", "tiny-cpu", *LST_RUN, "--hidden-size", "60", "--kv-channels", "16"]
    assert lst_config_from_args(validate_args(parse_args(argv), 1), 64, EOS_ID).global_model.head_dim == 16


def test_a_preset_leaves_derived_head_shapes_derived():
    """The presets have one key/value head per query head of hidden / heads: other head counts
    or widths on the command line get theirs, not the preset's two groups of 16 channels."""
    argv = ["--preset", "tiny-cpu", *LST_RUN, "--local-encoder-heads", "4",
            "--local-decoder-hidden-size", "32", "--local-decoder-heads", "8",
            "--num-attention-heads", "8"]
    config = lst_config_from_args(validate_args(parse_args(argv), 1), 64, EOS_ID)
    assert (config.encoder.kv_groups, config.encoder.head_dim) == (4, 8)
    assert (config.decoder.kv_groups, config.decoder.head_dim) == (8, 4)
    assert (config.global_model.num_query_groups, config.global_model.head_dim) == (None, 8)


@pytest.mark.parametrize(("extra", "message"), [
    (["--local-encoder-query-groups", "3"],
     r"--local-encoder-heads 2 is not divisible by --local-encoder-query-groups 3"),
    (["--local-decoder-query-groups", "0"], r"--local-decoder-query-groups must be at least 1"),
    (["--local-encoder-kv-channels", "7"], r"--local-encoder-kv-channels 7 must be even: RoPE"),
    (["--local-decoder-kv-channels", "9"], r"--local-decoder-kv-channels 9 must be even: RoPE"),
    (["--kv-channels", "7"], r"--kv-channels 7 must be even: RoPE"),
    (["--local-decoder-heads", "32"],
     r"--local-decoder-hidden-size 32 over --local-decoder-heads 32 makes attention heads of 1 "
     r"channels, which must be even.*\(--local-decoder-kv-channels\)"),
    (["--hidden-size", "48", "--num-attention-heads", "16"],
     r"--hidden-size 48 over --num-attention-heads 16 makes attention heads of 3 channels, which "
     r"must be even.*\(--kv-channels\)"),
    (["--kv-channels", "0"], r"--kv-channels must be at least 1"),
    (["--hidden-size", "60", "--num-attention-heads", "8"],
     r"--hidden-size 60 is not divisible by --num-attention-heads 8; .*--kv-channels"),
])
def test_impossible_head_shapes_are_named(extra, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(parse_args(["--preset", "tiny-cpu", *LST_RUN, *extra]), 1)


# --- a checkpoint's configuration decides the model ----------------------------------------

def _fake_checkpoint(root, config: LSTConfig, kind: str = "lst", patching_mode: str = "static"):
    """A save directory whose one checkpoint records `config`, with an index of its weights'
    size but no tensors: flags only."""
    path = root / "iter_0000005"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    write_model_index(path, config)
    (path / METADATA_FILENAME).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "iteration": 5, "args": {"patching_mode": patching_mode},
        "vocab": None, "model": {"kind": kind, "config": lst_config_to_dict(config)}}))
    (root / TRACKER_FILENAME).write_text("5")
    return root


def _variant() -> LSTConfig:
    config = preset("tiny-cpu", 100)
    return dataclasses.replace(
        config, encoder=dataclasses.replace(config.encoder, ffn_hidden_size=40, window=9),
        cross_attention=dataclasses.replace(config.cross_attention, pooling="mean",
                                            all_decoder_layers=False),
        rope_theta=5000.0, max_sequence_length=4096)


def test_resume_builds_the_checkpoint_model_without_model_flags(tmp_path):
    config = _variant()
    load = _fake_checkpoint(tmp_path / "ckpt", config)
    args = validate_args(parse_args([*LST_RUN, "--load", str(load)]), 1)
    assert lst_config_from_args(args, 100) == config
    # Flags that repeat the checkpoint's values are accepted.
    repeat = validate_args(parse_args([*LST_RUN, "--load", str(load), "--preset", "tiny-cpu",
                                       *model_flags.config_to_argv(config)]), 1)
    assert lst_config_from_args(repeat, 100) == config
    # "One key/value head per query head" may be spelled as the count; another count contradicts.
    groups = validate_args(parse_args([*LST_RUN, "--load", str(load), "--num-query-groups", "4"]), 1)
    assert lst_config_from_args(groups, 100) == config
    with pytest.raises(ArgumentError, match=r"--num-query-groups 2 \(checkpoint: 4\)"):
        validate_args(parse_args([*LST_RUN, "--load", str(load), "--num-query-groups", "2"]), 1)


def test_a_flag_that_contradicts_the_checkpoint_is_refused_with_both_values(tmp_path):
    load = _fake_checkpoint(tmp_path / "ckpt", _variant())
    with pytest.raises(ArgumentError) as refused:
        validate_args(parse_args([*LST_RUN, "--load", str(load), "--preset", "tiny-cpu"]), 1)
    for conflict in ("--rotary-base 10000.0 (checkpoint: 5000.0)",
                     "--local-encoder-ffn-hidden-size 256 (checkpoint: 40)",
                     "--local-encoder-window 64 (checkpoint: 9)",
                     "--cross-attn-all-layers-decoder True (checkpoint: False)",
                     "--cross-attn-pooling max (checkpoint: mean)"):
        assert conflict in str(refused.value)
    assert "--local-decoder" not in str(refused.value)  # the values it shares are not named
    # Fields that change no weight and no output follow the flags: the preset's
    # --max-position-embeddings 64 replaces the checkpoint's 4096.
    assert "--max-position-embeddings" not in str(refused.value)
    longer = validate_args(parse_args([*LST_RUN, "--load", str(load),
                                       "--max-position-embeddings", "512"]), 1)
    assert lst_config_from_args(longer, 100) == dataclasses.replace(_variant(),
                                                                    max_sequence_length=512)
    # --no-use-checkpoint-args builds the model from the flags alone.
    args = validate_args(parse_args([*LST_RUN, "--load", str(load), "--preset", "tiny-cpu",
                                     "--no-use-checkpoint-args"]), 1)
    assert lst_config_from_args(args, 100, EOS_ID) == _masked(preset("tiny-cpu", 100))


def test_the_model_kind_must_match_the_checkpoint(tmp_path):
    lst = _fake_checkpoint(tmp_path / "lst", _variant())
    with pytest.raises(ArgumentError, match=r"holds an LST model but --patching-mode none .*"
                                            r"\(static\)"):
        validate_args(parse_args([*RUN, "--load", str(lst)]), 1)
    baseline = _fake_checkpoint(tmp_path / "baseline", preset("tiny-cpu", 100), "baseline", "none")
    with pytest.raises(ArgumentError, match="holds a token baseline"):
        validate_args(parse_args([*LST_RUN, "--load", str(baseline)]), 1)
    # The baseline's stand-in local models are not compared with the local flags.
    args = validate_args(parse_args([*RUN, "--load", str(baseline), "--preset", "tiny-cpu"]), 1)
    assert args.hidden_size == 64


def test_the_custom_model_example_builds_the_model_it_spells_out():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "custom_model_lst.yaml"
    config = lst_config_from_args(validate_args(parse_args(["--config", str(path)]), 1), 1000,
                                  EOS_ID)
    assert (config.global_model.num_query_groups, config.rope_theta, config.norm_eps) == \
        (3, 50000.0, 1e-6)
    assert (config.encoder.ffn_hidden_size, config.decoder.ffn_hidden_size) == (128, 160)
    assert (config.encoder.window, config.decoder.window) == (96, 64)
    assert config.cross_attention == dataclasses.replace(
        config.cross_attention, slots_per_patch=2, num_heads=4, encoder_window=16,
        decoder_window=8, all_encoder_layers=True, all_decoder_layers=False, pooling="mean",
        double_residual=False)


@pytest.mark.parametrize("damage, named", [
    (lambda record: record.update(args=["--seq-length"]), r"the saved flags \('args'\) are a JSON list"),
    (lambda record: record.update(model="lst"), r"the model record 'lst' is not"),
    (lambda record: record["model"]["config"]["global_model"].update(num_layers="2"),
     r"the model record does not describe a model \(global_model: "),
])
def test_a_damaged_checkpoint_record_is_refused_naming_it(tmp_path, damage, named):
    """The model flags come from the record: 'args' or 'model' that are no objects were
    AttributeError tracebacks, and a config that builds no model was named without the file.
    A damaged checkpoint, not bad flags: lst-train exits 3 (DamagedCheckpointFlagError)."""
    load = _fake_checkpoint(tmp_path / "ckpt", _variant())
    path = load / "iter_0000005" / METADATA_FILENAME
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    with pytest.raises(DamagedCheckpointFlagError,
                       match=rf"--load {load}: {path.parent}: {named}"):
        validate_args(parse_args([*LST_RUN, "--load", str(load)]), 1)


def test_a_checkpoint_whose_index_cannot_be_read_is_refused_before_its_model_is_built(tmp_path):
    """The record's size is checked against the index: without one, a crafted record of any
    size was built first (here the index is missing; the loading would refuse it too)."""
    load = _fake_checkpoint(tmp_path / "ckpt", _variant())
    index = load / "iter_0000005" / ".metadata"
    index.unlink()
    with pytest.raises(DamagedCheckpointFlagError,
                       match=rf"--load {load}: {index}: no such checkpoint index"):
        validate_args(parse_args([*LST_RUN, "--load", str(load)]), 1)
