"""A checkpoint records its model's whole configuration: saved and read back, it is the same."""

import argparse
import dataclasses
import json
import operator
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from training.model_config_cases import lst_configs
from training.training_cases import write_model_index

from megatron_lst.checkpoint.dist import save_dist_checkpoint, training_args_for
from megatron_lst.checkpoint.model_config import read_model_config
from megatron_lst.checkpoint.model_state import (
    CheckpointContentError,
    build_full_model,
    full_state_dict,
    lst_config_from_dict,
    lst_config_to_dict,
)
from megatron_lst.checkpoint.portable import PortableCheckpoint, load_portable, save_portable
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata
from megatron_lst.training.model_provider import lst_config_from_args

SMALL = lst_configs(max_width=16, max_layers=2)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(config=SMALL)
def test_any_config_survives_dist_and_portable_checkpoints(config, single_rank, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = build_full_model(config)
    path = save_dist_checkpoint(root / "dist", model, training_args_for(config), None)
    saved = read_model_config(json.loads(json.dumps(read_checkpoint_metadata(path))), path)
    assert saved.config == config and not saved.baseline

    save_portable(root / "portable", PortableCheckpoint(config=config, state=full_state_dict(model)))
    assert load_portable(root / "portable").config == config


def tiny_checkpoint_with_an_inflated_record(tmp_path):
    """A dist checkpoint of the tiny preset and its model record (not written back) edited to
    name a global model of billions of weights."""
    from megatron_lst.models.config import preset

    vocab = JointVocab(text_size=58)
    config = preset("tiny", vocab.size)
    path = save_dist_checkpoint(tmp_path / "dist", build_full_model(config),
                                training_args_for(config), vocab)
    record = json.loads((path / "lst_checkpoint.json").read_text())
    record["model"]["config"]["global_model"].update(hidden_size=1 << 16, num_layers=64,
                                                      num_heads=512, ffn_hidden_size=1 << 18)
    return path, record


def test_a_record_of_more_weights_than_the_checkpoint_holds_is_refused_before_building(
        single_rank, tmp_path):
    """A crafted or damaged record of a far larger model beside a small checkpoint: every tool
    built the model it names before loading (one of billions of weights fails in the
    allocator)."""
    from megatron_lst.checkpoint.convert import dist_to_portable

    path, record = tiny_checkpoint_with_an_inflated_record(tmp_path)
    (path / "lst_checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointContentError, match=r"the model record describes \d+ weights, but "
                                                     r"the checkpoint's tensors hold \d+"):
        read_model_config(record, path)
    with pytest.raises(CheckpointContentError, match="the model record describes"):
        dist_to_portable(tmp_path / "dist", tmp_path / "portable")
    assert not (tmp_path / "portable").exists()


@pytest.mark.parametrize("damage_index", [
    lambda index: index.unlink(),
    lambda index: index.write_bytes(b"not a pickle"),
])
def test_a_record_beside_an_unreadable_index_is_refused_before_building(single_rank, tmp_path,
                                                                        damage_index):
    """The weight count was skipped when the index could not be read, so every tool built
    whatever model the record named before the loading refused the checkpoint: a checkpoint
    without a readable index loads nowhere, and its record cannot be checked."""
    from megatron_lst.checkpoint.errors import CheckpointIntegrityError

    path, record = tiny_checkpoint_with_an_inflated_record(tmp_path)
    damage_index(path / ".metadata")
    with pytest.raises(CheckpointIntegrityError, match=rf"{path / '.metadata'}"):
        read_model_config(record, path)


def test_a_record_of_a_crafted_layer_count_is_refused_without_listing_its_layers(
        single_rank, tmp_path):
    """The record's weights were summed over the list of its tensors, several per layer: 10^5
    layers took ~100 MB and seconds, 10^9 more memory than the machine has. The global layers are
    stored stacked, so no count of the stored tensors bounds the layers; they are counted."""
    from megatron_lst.models.config import preset

    vocab = JointVocab(text_size=58)
    config = preset("tiny", vocab.size)
    path = save_dist_checkpoint(tmp_path / "dist", build_full_model(config),
                                training_args_for(config), vocab)
    record = json.loads((path / "lst_checkpoint.json").read_text())
    record["model"]["config"]["global_model"]["num_layers"] = 10**5
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointContentError, match=r"the model record describes \d+ "
                                                         r"weights, but the checkpoint's"):
            read_model_config(record, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # bytes: nothing per layer


def test_a_checkpoint_without_the_record_is_read_through_its_flags(tmp_path):
    """Checkpoints written before the record: the model training built from their flags."""
    vocab = JointVocab(text_size=40, num_units=20)
    flags = ["--preset", "tiny-cpu", "--seq-length", "8", "--train-iters", "1", "--lr", "1e-3",
             "--patching-mode", "static", "--max-tokens", "24"]
    args = validate_args(parse_args(flags), 1)
    saved_args = {k: v for k, v in vars(args).items()
                  if not k.startswith(("local_encoder_window", "local_decoder_window"))}
    saved_args["local_attention_window"] = 64  # the one local window flag of those versions
    metadata = {"args": saved_args, "vocab": vocab.to_dict()}
    expected = lst_config_from_args(argparse.Namespace(**vars(args)), vocab.size, vocab.eos_id)
    write_model_index(tmp_path, expected)
    saved = read_model_config(metadata, tmp_path)
    assert saved.config.encoder.window == saved.config.decoder.window == 64
    assert saved.config.max_sequence_length == 24  # what those versions recorded: --max-tokens
    assert saved.config.global_model == expected.global_model
    assert saved.config.cross_attention == expected.cross_attention
    assert saved.config.documents is None  # those versions trained across EOS
    assert saved.patching_mode == "static" and not saved.baseline


def test_a_record_of_the_wrong_form_is_named(tmp_path):
    with pytest.raises(CheckpointContentError, match="model record .* is not"):
        read_model_config({"model": {"kind": "gpt", "config": {}}}, tmp_path)
    with pytest.raises(CheckpointContentError, match=r"unknown field\(s\) \['extra'\]"):
        read_model_config({"model": {"kind": "lst", "config": {"extra": 1}}}, tmp_path)
    # A checkpoint of another megatron module records no model to build.
    assert read_model_config({"args": {"num_layers": 2}, "vocab": None}, tmp_path) is None


def _leaves(data: dict, prefix: tuple = ()) -> list[tuple]:
    """Every `(path, value)` of a nested config dict, nested parts included as their own path."""
    found = []
    for name, value in data.items():
        found.append(((*prefix, name), value))
        if isinstance(value, dict):
            found += _leaves(value, (*prefix, name))
    return found


def _edited(data: dict, path: tuple, value=None, delete: bool = False) -> dict:
    data = json.loads(json.dumps(data))
    parent = data
    for name in path[:-1]:
        parent = parent[name]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


def _config_with_documents():
    """Every field set, none null: grouped-query attention and head sizes other than hidden /
    heads in every model, and document masking."""
    from megatron_lst.models.config import DocumentMaskingConfig, GlobalModelConfig, preset

    config = preset("tiny", 64)
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=8)
                        for local in (config.encoder, config.decoder))
    return dataclasses.replace(config, documents=DocumentMaskingConfig(
                                   eos_id=2, reset_cross_attention=False,
                                   reset_global_attention=False),
                               global_model=GlobalModelConfig(64, 2, 4, 256, 2, 32),
                               encoder=encoder, decoder=decoder)


def test_every_missing_field_is_named_not_defaulted():
    """A record without a field is damaged: no dataclass default takes its place (a default
    window or cross-attention would build another model). Only the fields older records lack
    read as what those models had: `documents` (before document masking) as None, they trained
    across EOS; the head shapes (before local grouped-query attention and explicit head sizes)
    as one key/value head per query head of hidden / heads; the document rule's cross-attention
    and global switches (before they could be turned off) as on."""
    config = _config_with_documents()
    data = lst_config_to_dict(config)
    for path, _ in _leaves(data):
        if path == ("documents",):
            assert lst_config_from_dict(_edited(data, path, delete=True)).documents is None
            continue
        if path[-1] in ("num_query_groups", "kv_channels") and path != ("global_model", "num_query_groups"):
            older = lst_config_from_dict(_edited(data, path, delete=True))
            assert getattr(operator.attrgetter(".".join(path[:-1]))(older), path[-1]) is None
            continue
        if path[-1] in ("reset_cross_attention", "reset_global_attention"):
            older = lst_config_from_dict(_edited(data, path, delete=True))
            assert getattr(older.documents, path[-1]) is True
            continue
        with pytest.raises(CheckpointContentError, match=rf"missing field\(s\) \['{path[-1]}'\]"):
            lst_config_from_dict(_edited(data, path, delete=True))


# A JSON value of another type for each kind of field (the first: a number where a switch is
# wanted, the second: text; integers get a fractional number too).
WRONG_VALUES = {int: (2.0, "2"), float: (True, "1e-5"), bool: (1, "false"), str: (1, None)}


def test_every_field_of_another_type_is_named():
    """`"false"` is truthy, 32.0 builds float widths and "2" compares unequal to EOS 2: a value of
    another type is refused naming the field, never used."""
    config = _config_with_documents()
    data = lst_config_to_dict(config)
    checked = 0
    for path, value in _leaves(data):
        if isinstance(value, dict) or value is None:
            continue
        for wrong in WRONG_VALUES[type(value)]:
            with pytest.raises(CheckpointContentError, match=rf"field '{path[-1]}' is {wrong!r}"):
                lst_config_from_dict(_edited(data, path, wrong))
            checked += 1
    assert checked == 2 * 38  # every scalar field of LSTConfig and its parts
    # integers are numbers: a float field written as an integer reads as that number
    assert lst_config_from_dict(_edited(data, ("rope_theta",), 10000)) == config


@pytest.mark.parametrize(("metadata", "message"), [
    ({"model": ["lst"]}, r"model record \['lst'\] is not"),
    ({"model": {"kind": "lst", "config": {}, "dtype": "bf16"}}, r"model record .*'dtype'.* is not"),
    ({"args": ["--preset"], "vocab": {}}, r"saved flags \('args'\) are a JSON list"),
])
def test_a_record_or_flags_that_are_no_object_are_named(tmp_path, metadata, message):
    with pytest.raises(CheckpointContentError, match=message):
        read_model_config(metadata, tmp_path)


def test_a_record_with_zero_heads_is_named_not_a_division_by_zero():
    data = lst_config_to_dict(_config_with_documents())
    data["encoder"]["num_heads"] = 0
    with pytest.raises(CheckpointContentError, match=r"encoder: local .*num_heads \(0\)"):
        lst_config_from_dict(data)
