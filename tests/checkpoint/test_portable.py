"""The portable form (safetensors + lst_config.json): a round trip reproduces the model exactly;
corrupt or mismatched files are refused with the tensor (or file) named."""

import dataclasses
import io
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lst.checkpoint.convert import portable_model
from megatron_lst.checkpoint.model_state import (
    CheckpointContentError,
    build_full_model,
    full_state_dict,
    lst_config_from_dict,
    lst_config_to_dict,
)
from megatron_lst.checkpoint.portable import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    PortableCheckpoint,
    load_portable,
    save_portable,
)
from megatron_lst.checkpoint.verify import (
    VerificationError,
    fixed_batch,
    logits,
    verify_same_function,
)
from megatron_lst.models.config import GlobalModelConfig, preset
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

VOCAB = JointVocab(text_size=58)


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(5)
    # GQA and a global input projection (k * De = 64 != Dg = 96) exercise the optional tensors.
    tiny = preset("tiny", VOCAB.size)
    config = dataclasses.replace(tiny, global_model=GlobalModelConfig(96, 2, 4, 256, 2))
    return build_full_model(config)


@pytest.fixture()
def saved(model, tmp_path):
    save_portable(tmp_path, PortableCheckpoint(
        config=model.lst_config, state=full_state_dict(model), vocab=VOCAB,
        training_args={"patching_mode": "aligned"}, source="test"))
    return tmp_path


def test_round_trip_reproduces_the_model_exactly(model, saved):
    checkpoint = load_portable(saved, VOCAB)
    assert checkpoint.config == model.lst_config
    assert checkpoint.vocab == VOCAB and checkpoint.training_args == {"patching_mode": "aligned"}
    assert "global_input_projection.weight" in checkpoint.state
    reloaded = portable_model(checkpoint, str(saved))
    batch = fixed_batch(model.lst_config)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_verification_catches_a_changed_weight(model, saved):
    checkpoint = load_portable(saved)
    checkpoint.state["global_transformer.block.layers.1.mlp.linear_fc2.weight"] += 1e-2
    changed = portable_model(checkpoint, "changed")
    report = io.StringIO()
    with pytest.raises(VerificationError, match="differ by"):
        verify_same_function(model, changed, "test conversion", stream=report)
    assert "verify test conversion: max |logits before - after| = " in report.getvalue()


def test_config_dict_round_trip_and_unknown_field(model):
    data = lst_config_to_dict(model.lst_config)
    assert lst_config_from_dict(json.loads(json.dumps(data))) == model.lst_config
    data["encoder"]["rope_scaling"] = 2.0
    with pytest.raises(CheckpointContentError, match="encoder.*rope_scaling"):
        lst_config_from_dict(data)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["global_model"].update(hidden_size=63), r"global_model: global hidden_size 63"),
    (lambda d: d.update(encoder=5), r"encoder: a JSON int, not the fields of LocalModelConfig"),
    # AttributeError ('NoneType' object has no attribute 'hidden_size') and ZeroDivisionError
    # tracebacks: only "documents" may be null, and sizes are checked before a head count
    # divides them.
    (lambda d: d.update(decoder=None), r"decoder: a JSON NoneType, not the fields of "
                                       r"LocalModelConfig"),
    (lambda d: d.update(cross_attention=None), r"cross_attention: a JSON NoneType"),
    (lambda d: d["encoder"].update(num_heads=0), r"encoder: local .*num_heads \(0\).* must be "
                                                 r">= 1"),
    (lambda d: d.update(vocab_size=0), r"vocab_size must be >= 1, got 0"),
    (lambda d: d.update(max_sequence_length=-1), r"max_sequence_length must be >= 1, got -1"),
])
def test_config_dict_of_an_impossible_model_is_refused_naming_the_part(model, edit, message):
    data = lst_config_to_dict(model.lst_config)
    edit(data)
    with pytest.raises(CheckpointContentError, match=message):
        lst_config_from_dict(data)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: [1], r"holds a JSON list, not an lst-portable config object"),
    (lambda m: m.update(format_version=True) or m, r"not an lst-portable v1 config \(format "
                                                    r"'lst-portable' vTrue\)"),
    (lambda m: m.update(format_version=1.0) or m, r"\(format 'lst-portable' v1\.0\)"),
    (lambda m: m.pop("lst_config") and m, r"field\(s\) 'lst_config' \(missing\) are not what"),
    (lambda m: m.update(training_args=[1]) or m, r"field\(s\) 'training_args' \(list\)"),
    (lambda m: m.update(vocab={"size": 3}) or m, r"'vocab' is not a joint vocabulary layout"),
    # a misspelt field read as absent: the flags would have been lost without a word
    (lambda m: m.update(training_arg=m.pop("training_args")) or m,
     r"unknown field\(s\) \['training_arg'\]"),
    # kept by portable-to-dist, whose dist checkpoint lst-eval then refused as damaged
    (lambda m: m.update(training_args={"patching_mode": "static", "patch_size": "4"}) or m,
     r"'training_args': the saved flag patch_size is '4', which --patch-size never gives "
     r"\(an integer\); the config is damaged or was edited"),
    (lambda m: m.update(training_args={"params_dtype_name": "int8"}) or m,
     r"'training_args': the saved params_dtype_name is 'int8', not one of"),
])
def test_damaged_config_file_is_refused_naming_the_field(saved, edit, message):
    """The portable form is the one to accept from others: a bad config is an error, not a
    traceback."""
    path = saved / CONFIG_FILENAME
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointContentError, match=message):
        load_portable(saved)


def test_config_file_that_is_not_text_is_refused(saved):
    (saved / CONFIG_FILENAME).write_bytes(b"\xb8\xff")
    with pytest.raises(CheckpointContentError, match=rf"cannot read {saved / CONFIG_FILENAME}"):
        load_portable(saved)


def rewrite_weights(directory, edit):
    state = load_file(str(directory / WEIGHTS_FILENAME))
    edit(state)
    save_file(state, str(directory / WEIGHTS_FILENAME))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("local_decoder.cross_attn_layers.1.linear_kv.weight"),
     r"no tensor 'local_decoder\.cross_attn_layers\.1\.linear_kv\.weight'"),
    (lambda s: s.update({"patch_encoder.patch_projection.weight": torch.zeros(64, 31)}),
     r"'patch_encoder\.patch_projection\.weight' has shape \(64, 31\) but the model expects \(64, 32\)"),
    (lambda s: s.update({"local_decoder.layers.2.input_norm.weight": torch.ones(32)}),
     r"does not have: \['local_decoder\.layers\.2\.input_norm\.weight'\]"),
    # An integer tensor was cast to the weights' float dtype without a word.
    (lambda s: s.update({"patch_encoder.patch_projection.weight": torch.ones(64, 32,
                                                                             dtype=torch.int64)}),
     r"'patch_encoder\.patch_projection\.weight' holds torch\.int64 but the model's is "
     r"torch\.float32"),
], ids=["missing", "wrong-shape", "unexpected", "integer-dtype"])
def test_mismatched_tensors_are_refused_by_name(saved, edit, message):
    rewrite_weights(saved, edit)
    with pytest.raises(CheckpointContentError, match=message):
        portable_model(load_portable(saved), str(saved))


def test_other_vocabulary_is_refused(saved):
    other = JointVocab(text_size=60)
    with pytest.raises(VocabularyError, match=f"{VOCAB.size} ids but this tokenizer gives {other.size}"):
        load_portable(saved, other)
    config = json.loads((saved / CONFIG_FILENAME).read_text())
    config["vocab"] = other.to_dict()
    (saved / CONFIG_FILENAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointContentError, match=r"token_encoder\.embedding\.weight"):
        load_portable(saved)


def test_corrupt_weights_file_is_refused_naming_it(saved):
    path = saved / WEIGHTS_FILENAME
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointContentError, match=f"cannot read {path}"):
        load_portable(saved)


def test_the_weights_file_is_as_readable_as_the_config(model, tmp_path):
    """The portable form is the one shared with others: safetensors wrote the weights 0600 (its
    private temporary file), so the people who could read lst_config.json could not read them."""
    previous = os.umask(0o022)
    try:
        save_portable(tmp_path, PortableCheckpoint(config=model.lst_config,
                                                   state=full_state_dict(model), vocab=VOCAB))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / CONFIG_FILENAME).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / WEIGHTS_FILENAME).stat().st_mode) == 0o644
