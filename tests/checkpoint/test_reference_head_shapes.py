"""Reference checkpoints whose heads are not `dim / n_heads` each with its own key/value head:
the reference's `head_dim` (one head size for the global and both local models) and `n_kv_heads`
(the local models' key/value heads; `n_kv_heads_global` the global model's).

For each configuration the imported `LSTModel` computes the oracle's logits (rows of one
sequence, and packed rows of EOS-ended documents under "xformers"), its gradients are the
oracle's (so a training step updates the new key/value and head-size parameters as the
reference would), the export gives back the reference tensors and arguments, and a round trip
through the portable and training checkpoint formats changes nothing.
"""

import dataclasses

import pytest
import torch

from checkpoint.reference_oracle import reference_logits, reference_tensor_shapes
from checkpoint.test_reference_configurations import (
    BASE_ARGS,
    assert_same_tensors,
    export_after_training_checkpoint,
    imported_model,
    random_batch,
    random_reference_state,
)
from megatron_lst.checkpoint.model_state import full_state_dict
from megatron_lst.checkpoint.reference import (
    export_reference,
    import_reference,
    reference_model_args,
)
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference

# BASE_ARGS: global 32 wide with 4 heads (head size 8), local models 16 wide with 2 heads (8).
HEAD_SHAPES = {
    # (a) grouped-query local attention: one key/value head, and half as many as heads
    "local_one_kv_head": {"n_kv_heads": 1},
    "local_half_kv_heads": {"n_heads_local_encoder": 4, "n_heads_local_decoder": 4, "n_kv_heads": 2},
    # (b) a head size other than dim / heads, larger and smaller, in all three models
    "larger_heads": {"head_dim": 12},
    "smaller_heads": {"head_dim": 4},
    # (c) both in the local models
    "local_kv_heads_and_head_size": {"n_heads_local_encoder": 4, "n_heads_local_decoder": 4,
                                     "n_kv_heads": 1, "head_dim": 6},
    # (d) global grouped-query attention with another head size
    "global_kv_heads_and_head_size": {"n_kv_heads_global": 2, "head_dim": 12},
    # everything at once, on packed rows with local sliding windows shorter than a document
    "all_on_packed_documents": {
        "n_heads_local_encoder": 4, "n_heads_local_decoder": 4, "n_kv_heads": 2,
        "n_kv_heads_global": 1, "head_dim": 10, "attn_impl": "xformers",
        "attn_bias_type": "block_causal", "local_attention_window_len": 4,
        "cross_attn_window_encoder": None, "cross_attn_window_decoder": None},
}


def head_shape_args(name: str) -> dict:
    return {**BASE_ARGS, **HEAD_SHAPES[name]}


def test_the_configurations_have_the_head_shapes_they_name():
    """The oracle's shapes (the reference's rule) are what each case claims: wq `[H*d, D]`, wk and
    wv `[G*d, D]`, wo `[D, H*d]`."""
    shapes = reference_tensor_shapes(head_shape_args("all_on_packed_documents"))
    assert shapes["local_encoder.layers.0.attention.wq.weight"] == (4 * 10, 16)
    assert shapes["local_encoder.layers.0.attention.wk.weight"] == (2 * 10, 16)
    assert shapes["local_decoder.layers.1.attention.wo.weight"] == (16, 4 * 10)
    assert shapes["global_transformer.layers.0.attention.wv.weight"] == (1 * 10, 32)
    assert shapes["global_transformer.layers.0.attention.wq.weight"] == (4 * 10, 32)
    config = lst_config_from_reference(head_shape_args("all_on_packed_documents"))
    assert (config.encoder.num_query_groups, config.encoder.kv_channels) == (2, 10)
    assert (config.global_model.num_query_groups, config.global_model.kv_channels) == (1, 10)


@pytest.mark.parametrize("name", sorted(HEAD_SHAPES))
def test_imported_model_matches_the_oracle_forward_and_gradients(single_rank, name):
    model_args = head_shape_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    tokens, patch_lengths = random_batch(model_args)
    model = imported_model(model_args, reference)
    if model_args["attn_impl"] == "xformers":
        assert model.lst_config.documents is not None and bool((tokens == 2).any())
    leaves = {key: tensor.clone().requires_grad_() for key, tensor in reference.items()}
    expected = reference_logits(model_args, leaves, tokens, patch_lengths)
    logits = model(tokens, patch_lengths)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4

    # a training step's gradients: the oracle's, tensor by tensor, once split back into the
    # reference's layout (wk/wv of grouped heads included)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (expected * weights).sum().backward()
    (logits * weights).sum().backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    ours = export_reference({key: grads[key] for key in full_state_dict(model)}, model.lst_config)
    for key, leaf in leaves.items():
        scale = leaf.grad.abs().max().item()
        assert scale > 0, key
        assert (ours[key] - leaf.grad).abs().max().item() <= 1e-4 * max(scale, 1.0), key


@pytest.mark.parametrize("name", sorted(HEAD_SHAPES))
def test_export_gives_back_the_reference_tensors_and_args(single_rank, name):
    model_args = head_shape_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    model = imported_model(model_args, reference)
    assert_same_tensors(export_reference(full_state_dict(model), model.lst_config), reference)
    for base in (model_args, None):  # with the import's args kept, and from the config alone
        written = reference_model_args(model.lst_config, base_args=base, max_tokens=64)
        for key in ("head_dim", "n_kv_heads", "n_kv_heads_global"):
            assert (written[key] or None) == (model_args.get(key) or None), key
        assert lst_config_from_reference(written) == model.lst_config


@pytest.mark.parametrize("name", ["local_kv_heads_and_head_size", "all_on_packed_documents",
                                  "global_kv_heads_and_head_size"])
def test_portable_and_training_checkpoints_keep_the_head_shapes(single_rank, tmp_path, name):
    """Reference -> portable -> training (dist) -> portable -> reference: the same tensors, bit for
    bit, and arguments that import to the same configuration."""
    model_args = head_shape_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    config, _ = import_reference(reference, model_args)
    exported, written = export_after_training_checkpoint(reference, model_args, config, tmp_path)
    assert_same_tensors(exported, reference)
    assert written["head_dim"] == model_args.get("head_dim")
    assert (written["n_kv_heads"] or None) == model_args.get("n_kv_heads")
    assert lst_config_from_reference(written) == config


def _replace_local(config, side: str, **fields):
    return dataclasses.replace(config, **{side: dataclasses.replace(getattr(config, side), **fields)})


@pytest.mark.parametrize(("side", "fields", "message"), [
    ("decoder", {"kv_channels": 12}, r"one head_dim for the global and local encoder and local "
                                     r"decoder models; .*global 10, local encoder 10, local decoder 12"),
    ("encoder", {"num_query_groups": 4}, r"one n_kv_heads for the local encoder and local decoder "
                                         r"models; .*local encoder 4, local decoder 2"),
])
def test_models_the_reference_args_cannot_express_are_refused_on_export(side, fields, message):
    """The reference has one head_dim for its three models and one n_kv_heads for both local
    models: a model whose models differ there has no reference arguments."""
    config = _replace_local(lst_config_from_reference(head_shape_args("all_on_packed_documents")),
                            side, **fields)
    with pytest.raises(ReferenceImportError, match=message):
        reference_model_args(config)


def test_a_width_its_heads_do_not_divide_is_refused_on_export():
    """A head size lets this package build 38 wide with 4 heads of 10; the reference asserts
    dim % n_heads == 0 whatever its head_dim."""
    config = lst_config_from_reference(head_shape_args("all_on_packed_documents"))
    config = dataclasses.replace(config, global_model=dataclasses.replace(
        config.global_model, hidden_size=38))
    with pytest.raises(ReferenceImportError, match=r"global model.s hidden_size 38 is not "
                                                   r"divisible by its 4 heads: the reference"):
        reference_model_args(config)


@pytest.mark.parametrize(("update", "message"), [
    ({"head_dim": 7}, r"head size 7 of the global model .* is odd: the reference's RoPE"),
    ({"head_dim": None, "dim_local_encoder": 18, "dim_local_decoder": 18, "n_heads_local_encoder": 6,
      "n_heads_local_decoder": 6}, r"head size 3 of the local encoder model"),
    ({"n_kv_heads": 3, "n_heads_local_encoder": 4, "n_heads_local_decoder": 4},
     r"n_heads_local_encoder 4 is not divisible by n_kv_heads 3"),
    ({"n_kv_heads_global": 3}, r"n_heads_global 4 is not divisible by n_kv_heads_global 3"),
    # the reference's blocks assert dim % n_heads == 0 even when head_dim is given
    ({"head_dim": 8, "n_heads_global": 5}, r"dim_global 32 is not divisible by n_heads_global 5: "
                                           r"the reference's global blocks assert it"),
    ({"n_kv_heads": -1}, r"n_kv_heads=-1 is not a number of units or heads"),
    ({"head_dim": 2.5}, r"head_dim=2.5 is not a whole number"),
    ({"n_kv_heads_global": "2"}, r"n_kv_heads_global='2' is not a whole number"),
    # A bool is an int in Python: it was read as 1 (or 0) head, layer, unit ...
    ({"n_heads_global": True}, r"n_heads_global=True is not a whole number"),
    ({"n_layers_local_decoder": False}, r"n_layers_local_decoder=False is not a whole number"),
    ({"cross_attn_nheads": True}, r"cross_attn_nheads=True is not a whole number"),
    ({"vocab_size": True}, r"vocab_size=True is not a whole number"),
    ({"dim_local_encoder": [16]}, r"dim_local_encoder=\[16\] is not a whole number"),
])
def test_head_shapes_the_reference_cannot_build_are_refused_naming_the_field(update, message):
    with pytest.raises(ReferenceImportError, match=message):
        lst_config_from_reference({**BASE_ARGS, **update})
