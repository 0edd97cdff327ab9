"""`lst-convert` of a checkpoint whose weights hold a NaN or inf (a run that diverged): refused,
exit status 1, naming the checkpoint and the tensor, with nothing written at the output.

Without the check, portable-to-dist failed with the trainer's advice to "start again", the export
named its own scratch copy and asked to "import an earlier step's checkpoint", and dist-to-portable
blamed the conversion for the NaN logits of the weights it was given."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lst.checkpoint.cli import main
from megatron_lst.checkpoint.dist import save_dist_checkpoint, training_args_for
from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import WEIGHTS_FILENAME, PortableCheckpoint, save_portable
from megatron_lst.models.config import preset
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.vocab import JointVocab

VOCAB = JointVocab(text_size=58)
DIVERGED = "the run that wrote it had diverged: convert a checkpoint saved before that"


@pytest.fixture()
def diverged_portable(tmp_path):
    """A portable checkpoint with one NaN and one inf."""
    directory = tmp_path / "diverged"
    initialize_parallel()
    try:
        model = build_full_model(preset("tiny", VOCAB.size))
        save_portable(directory, PortableCheckpoint(
            config=model.lst_config, state=full_state_dict(model), vocab=VOCAB))
    finally:
        destroy_parallel()
    state = load_file(str(directory / WEIGHTS_FILENAME))
    state["output_layer.weight"][3, 1] = float("nan")
    state["output_layer.weight"][4, 0] = float("-inf")
    save_file(state, str(directory / WEIGHTS_FILENAME))
    return directory


@pytest.mark.parametrize("command, output_flag", [("portable-to-dist", "--save"),
                                                  ("export-reference", "--output")])
def test_a_portable_checkpoint_with_nan_weights_is_refused_naming_it(
        diverged_portable, tmp_path, capsys, command, output_flag):
    output = tmp_path / "out"
    assert main([command, "--portable", str(diverged_portable), output_flag, str(output)]) == 1
    err = capsys.readouterr().err
    assert (f"{diverged_portable} ({WEIGHTS_FILENAME}): tensor 'output_layer.weight' holds 2 NaN "
            f"or inf value(s) of {VOCAB.size * 32}; {DIVERGED}") in err, err
    assert not output.exists()


def test_a_dist_checkpoint_with_nan_weights_is_refused_not_blamed_on_the_conversion(
        tmp_path, capsys, monkeypatch):
    """Training never saves such weights; a checkpoint altered afterwards (or saved by another
    tool) can hold them."""
    import megatron_lst.training.checkpoint_save as checkpoint_save

    monkeypatch.setattr(checkpoint_save, "_check_weights_finite", lambda *args: None)
    initialize_parallel()
    try:
        model = build_full_model(preset("tiny", VOCAB.size))
        with torch.no_grad():
            model.output_layer.weight[0, 0] = float("nan")
        path = save_dist_checkpoint(tmp_path / "dist", model,
                                    training_args_for(model.lst_config), VOCAB)
    finally:
        destroy_parallel()

    output = tmp_path / "portable"
    assert main(["dist-to-portable", "--load", str(tmp_path / "dist"),
                 "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert (f"dist checkpoint {path}: tensor 'output_layer.weight' holds 1 NaN or inf value(s)"
            in err), err
    assert "the conversion is wrong" not in err
    assert not output.exists()


@pytest.mark.parametrize("command, output_flag", [("portable-to-dist", "--save"),
                                                  ("export-reference", "--output")])
def test_a_portable_checkpoint_of_8_bit_floats_is_refused_naming_it(tmp_path, capsys, command,
                                                                     output_flag):
    """torch has no isfinite for the 8-bit floats: the NaN check above failed with a traceback."""
    directory = tmp_path / "fp8"
    initialize_parallel()
    try:
        model = build_full_model(preset("tiny", VOCAB.size))
        state = {name: tensor.to(torch.float8_e4m3fn)
                 for name, tensor in full_state_dict(model).items()}
        save_portable(directory, PortableCheckpoint(config=model.lst_config, state=state,
                                                    vocab=VOCAB))
    finally:
        destroy_parallel()
    output = tmp_path / "out"
    assert main([command, "--portable", str(directory), output_flag, str(output)]) == 1
    err = capsys.readouterr().err
    assert (f"{directory} ({WEIGHTS_FILENAME}): tensor 'global_transformer.block.layers.0."
            f"input_layernorm.weight' holds torch.float8_e4m3fn, which no conversion here reads"
            in err), err
    assert not output.exists()
