"""`full_state_shapes` states, from the configuration alone, the names and shapes of the model
that configuration builds; the conversions check a file against it before building a model."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from safetensors.torch import save_file
from training.model_config_cases import lst_configs

from checkpoint.test_reference_configurations import BASE_ARGS, random_reference_state
from megatron_lst.checkpoint.convert import import_reference_to_portable, portable_to_dist
from megatron_lst.checkpoint.full_shapes import (
    check_full_state_shapes,
    full_state_shapes,
    full_state_size,
)
from megatron_lst.checkpoint.model_state import (
    CheckpointContentError,
    build_full_model,
    full_state_dict,
    lst_config_from_dict,
    lst_config_to_dict,
)
from megatron_lst.checkpoint.portable import CONFIG_FILENAME, PortableCheckpoint, save_portable
from megatron_lst.models.config import preset
from megatron_lst.models.reference_config import ReferenceImportError
from megatron_lst.tokenizer.vocab import JointVocab


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=lst_configs())
def test_the_shapes_are_those_of_the_built_model(single_rank, config):
    built = {name: tuple(t.shape) for name, t in full_state_dict(build_full_model(config)).items()}
    assert full_state_shapes(config) == built
    assert full_state_size(config) == sum(math.prod(shape) for shape in built.values())


def test_another_models_tensors_are_named():
    config = preset("tiny", 64)
    shapes = full_state_shapes(config)
    check_full_state_shapes(shapes, config, "f")
    wide = dict(shapes, **{"output_layer.weight": (64, 7)})
    with pytest.raises(CheckpointContentError, match=r"f: tensor 'output_layer.weight' has shape "
                                                     r"\(64, 7\) but the model expects .* "
                                                     r"\(another vocabulary\?\)"):
        check_full_state_shapes(wide, config, "f")
    with pytest.raises(CheckpointContentError, match="f has no tensor 'local_decoder.final_norm.weight', which the model needs"):
        check_full_state_shapes({n: s for n, s in shapes.items() if "final_norm" not in n}, config, "f")
    with pytest.raises(CheckpointContentError, match=r"does not have: \['extra.weight'\]"):
        check_full_state_shapes(dict(shapes, **{"extra.weight": (1,)}), config, "f")


def test_reference_args_of_a_far_larger_model_are_refused_before_building_it(single_rank, tmp_path):
    """A params.json of another run beside a small checkpoint described a model of about 30
    billion parameters: the import allocated it before comparing, and died in the allocator."""
    save_file(random_reference_state(BASE_ARGS, 1), str(tmp_path / "consolidated.safetensors"))
    huge = {**BASE_ARGS, "dim_global": 1 << 17, "n_heads_global": 1024}
    (tmp_path / "params.json").write_text(json.dumps({"model": huge}))
    with pytest.raises(ReferenceImportError, match=r"has shape \(32, 32\), but the model args give "
                                                   r"\(131072, 131072\)"):
        import_reference_to_portable(tmp_path / "consolidated.safetensors", None,
                                     tmp_path / "portable")
    assert not (tmp_path / "portable").exists()


def test_a_portable_config_of_a_far_larger_model_is_refused_before_building_it(single_rank,
                                                                               tmp_path):
    """A crafted lst_config.json beside small weights: refused naming the tensor."""
    config = preset("tiny", 64)
    save_portable(tmp_path / "portable", PortableCheckpoint(
        config=config, state=full_state_dict(build_full_model(config)),
        vocab=JointVocab(text_size=8, num_units=50)))
    record = json.loads((tmp_path / "portable" / CONFIG_FILENAME).read_text())
    record["lst_config"]["global_model"]["hidden_size"] = 1 << 17
    (tmp_path / "portable" / CONFIG_FILENAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointContentError, match="has no tensor 'global_input_projection.weight'"):
        portable_to_dist(tmp_path / "portable", tmp_path / "dist")


# Every stack's layers are listed one by one (several tensors each): 10^5 took ~100 MB and
# seconds, 10^9 more memory than the machine has. Refused before the listing.
CRAFTED_LAYERS = 10**5


def test_a_portable_config_of_more_layers_than_tensors_is_refused_before_listing_them(tmp_path):
    config = preset("tiny", 64)
    shapes = full_state_shapes(config)
    record = json.loads(json.dumps(lst_config_to_dict(config)))
    record["global_model"]["num_layers"] = CRAFTED_LAYERS
    crafted = lst_config_from_dict(record)
    layers = CRAFTED_LAYERS + config.encoder.num_layers + config.decoder.num_layers
    with pytest.raises(CheckpointContentError, match=(
            rf"^f: the configuration describes {layers} layers, but only {len(shapes)} tensors "
            r"are stored \(each layer has several\)")):
        check_full_state_shapes(shapes, crafted, "f")


def test_reference_args_of_more_layers_than_tensors_are_refused_before_listing_them(tmp_path):
    save_file(random_reference_state(BASE_ARGS, 1), str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "params.json").write_text(json.dumps(
        {"model": {**BASE_ARGS, "n_layers_global": CRAFTED_LAYERS}}))
    with pytest.raises(ReferenceImportError, match=(
            r"\(model args .*params.json\): the model args: the configuration describes \d+ "
            r"layers, but only \d+ tensors are stored")):
        import_reference_to_portable(tmp_path / "consolidated.safetensors", None,
                                     tmp_path / "portable")
    assert not (tmp_path / "portable").exists()


NO_TENSOR = (r"the model args give tensor '[\w.]+' the shape \(\d+, \d+\), which cannot be "
             r"split into the reference's \[.*\] \(.*{reason}.*\); the args are damaged")


@pytest.mark.parametrize("edit, message", [
    # a whole number, read as one
    ({"dim_global": 1e30}, NO_TENSOR.format(reason="Overflow when unpacking long")),
    # was refused only by torch's shape check ("found element of type bool")
    ({"n_heads_global": True}, r"reference n_heads_global=True is not a whole number"),
], ids=["width-beyond-any-tensor", "head-count-true"])
def test_reference_args_no_tensor_can_have_are_refused_naming_the_tensor(tmp_path, edit, message):
    """torch's TypeError out of the shape check was a traceback of lst-convert."""
    save_file(random_reference_state(BASE_ARGS, 1), str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "params.json").write_text(json.dumps({"model": {**BASE_ARGS, **edit}}))
    with pytest.raises(ReferenceImportError, match=message):
        import_reference_to_portable(tmp_path / "consolidated.safetensors", None,
                                     tmp_path / "portable")
    assert not (tmp_path / "portable").exists()
