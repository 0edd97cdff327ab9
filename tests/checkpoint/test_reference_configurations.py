"""Imported reference checkpoints compute the reference's function on configurations other than
the fixture's: `LSTModel` built by `lst_config_from_reference` and loaded through the import path
agrees with an independent dense-mask re-implementation of the reference forward
(`reference_oracle`), the export gives back the reference tensors, and a round trip through
our training checkpoint (reference -> portable -> dist -> portable -> reference) changes no tensor
and no configuration. Named configurations cover each option; a property test draws them together.

The oracle itself is proven on the reference's own logits (the fixtures; skipped without them).
Weights are random, made in the reference's names and shapes straight from the arguments.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from checkpoint.reference_oracle import reference_logits, reference_tensor_shapes
from megatron_lst.checkpoint.convert import (
    dist_to_portable,
    export_portable_to_reference,
    import_reference_to_portable,
    portable_to_dist,
)
from megatron_lst.checkpoint.model_state import full_state_dict
from megatron_lst.checkpoint.portable import load_portable
from megatron_lst.checkpoint.reference import (
    export_reference,
    import_reference,
    read_reference_model_args,
    reference_model_args,
)
from megatron_lst.checkpoint.reference_files import read_reference_state_dict
from megatron_lst.models.lst_model import LSTModel
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference
from megatron_lst.models.reference_fields import REFERENCE_MODEL_FIELDS, REQUIRED_REFERENCE_OPTIONS
from megatron_lst.models.reference_tensors import load_reference_state_dict

VOCAB, EOS = 40, 2

BASE_ARGS = {
    **REQUIRED_REFERENCE_OPTIONS, "encoder_hash_byte_group_size": [], "vocab_size": VOCAB,
    "eos_id": EOS, "dim_global": 32, "n_layers_global": 2, "n_heads_global": 4,
    "dim_token": None, "dim_local_encoder": 16, "dim_local_decoder": 16,
    "n_layers_local_encoder": 2, "n_layers_local_decoder": 2, "n_heads_local_encoder": 2,
    "n_heads_local_decoder": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.0,
    "attn_impl": "sdpa", "attn_bias_type": "causal", "max_encoder_seq_length": 64,
    "local_attention_window_len": 64, "cross_attn_k": 2, "cross_attn_nheads": 2,
    "cross_attn_window_encoder": 3, "cross_attn_window_decoder": 4,
    "cross_attn_all_layers_encoder": True, "cross_attn_all_layers_decoder": True,
    "downsampling_by_pooling": "max",
    # the reference builds no model without both (its local models' args require them)
    "patching_mode": "static", "patch_size": 4.0,
}

# The model section of the reference's own training config, lst/configs/lst.yaml, shrunk: its
# sizes scaled down (dim_token == dim_local_encoder as there, 8 slots, its heads), every mode and
# flag as there (the fields it leaves out take the reference's defaults, as in a run of it).
REFERENCE_LST_YAML = {
    "n_heads": 8, "dim": 32, "vocab_size": VOCAB, "dim_token": 16, "patch_size": 6,
    "patching_mode": "static", "tie_local_encoder_decoder_logits": False,
    "patch_in_forward": False, "max_encoder_seq_length": 64, "pad_to_max_length": True,
    "patching_threshold": 3.1439168453216553, "encoder_hash_byte_group_size": [],
    "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_window_encoder": 512,
    "cross_attn_window_decoder": 512, "dim_local_encoder": 16, "dim_local_decoder": 16,
    "cross_attn_k": 8, "cross_attn_nheads": 4, "cross_attn_all_layers_decoder": True,
    "cross_attn_all_layers_encoder": True, "cross_attn_use_flex_attention": True,
    "cross_attn_init_by_pooling": True, "log_patch_lengths": True, "non_linearity": "swiglu",
    "use_rope": True, "recompute_fc1_out": False, "recompute_fc3_out": False,
    "recompute_attn": False, "custom_bwd": False, "layer_ckpt": "none",
    "use_local_encoder_transformer": True, "init_use_gaussian": True, "init_use_depth": "current",
    "attn_impl": "xformers", "attn_bias_type": "block_causal", "alpha_depth": "disabled",
    "max_length": 256, "local_attention_window_len": 512, "max_seqlen": 64,
    "downsampling_by_pooling": "max",
    # left out there: the reference's defaults, but 2 layers each instead of 8 and a 32-wide
    # global model (8 heads of 4 channels)
    "dim_global": 32, "n_layers_global": 2, "n_layers_local_encoder": 2,
    "n_layers_local_decoder": 2, "multiple_of": 256, "n_heads_global": 8,
    "n_heads_local_encoder": 8, "n_heads_local_decoder": 8,
}

# Each differs from BASE_ARGS in the fields named; together they cover every option the import
# accepts. "docs" cases pack several EOS-separated documents per row.
CONFIGURATIONS = {
    "base": {},
    "gqa_avg_pooling": {"n_heads_global": 4, "n_kv_heads_global": 2, "downsampling_by_pooling": "avg"},
    "cross_attention_first_and_last_layer_only": {
        "n_layers_local_encoder": 3, "n_layers_local_decoder": 3,
        "cross_attn_all_layers_encoder": False, "cross_attn_all_layers_decoder": False},
    "own_patch_windows": {"cross_attn_window_encoder": None, "cross_attn_window_decoder": None},
    "one_slot_more_heads": {"cross_attn_k": 1, "cross_attn_nheads": 4, "dim_global": 24,
                            "n_heads_global": 2, "cross_attn_window_encoder": 1,
                            "cross_attn_window_decoder": 2},
    "min_pooling_three_slots": {"downsampling_by_pooling": "min", "cross_attn_k": 3,
                                "dim_global": 40, "n_heads_global": 5},
    "defaults_spelt_out_mean_pooling": {"dim_token": 16, "n_kv_heads_global": 4,
                                        "ffn_dim_multiplier": None, "multiple_of": 32,
                                        "downsampling_by_pooling": "mean"},
    "projected_three_slots": {"cross_attn_k": 3, "dim_global": 40, "n_heads_global": 5,
                              "cross_attn_window_encoder": 2},
    "ffn_multiplier_norm_eps_rope_theta": {
        "multiple_of": 8, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-3, "rope_theta": 500.0,
        "n_layers_global": 3, "n_layers_local_encoder": 1, "n_layers_local_decoder": 3,
        "n_heads_local_encoder": 4, "n_heads_local_decoder": 1},
    "flex_attention": {"attn_impl": "flex_attention", "attn_bias_type": "block_causal"},
    # Dg == Dd with one slot: the reference stores no decoder patch projection (and, as k*De ==
    # Dg, no global input projection); the import puts the identity in its place
    "equal_widths_one_slot_no_projections": {"cross_attn_k": 1, "dim_global": 16,
                                             "n_heads_global": 2, "n_kv_heads_global": 1},
    # the token width from dim_global // patch_size (32 // 2 == dim_local_encoder)
    "token_width_from_patch_size": {"use_local_encoder_transformer": False, "dim_token": None,
                                    "patch_size": 2, "patching_mode": "static"},
    # the decoder's token width from dim_local_decoder, not the encoder's (the reference's
    # share_encoder_decoder_emb false): the same width, so the same decoder patch projection
    "token_width_from_patch_size_unshared_decoder": {
        "use_local_encoder_transformer": False, "dim_token": None, "patch_size": 2,
        "patching_mode": "static", "share_encoder_decoder_emb": False},
    "head_dim_and_local_kv_heads_spelt_out": {"head_dim": 8, "n_kv_heads": 2,
                                              "n_kv_heads_global": None},
    # the reference reads these sizes as `value or derived`: 0 is null
    "zero_head_sizes_mean_derived": {"head_dim": 0, "n_kv_heads": 0, "n_kv_heads_global": 0},
    # hash n-gram sizes but no hash functions: the reference builds no hash embedding table
    "hash_sizes_without_hash_functions": {"encoder_hash_byte_group_size": [3, 4],
                                          "encoder_hash_byte_group_nb_functions": 0},
    # sizes given as a string: the reference reads its comma-separated integers, "," as none
    "hash_sizes_as_a_string_of_none": {"encoder_hash_byte_group_size": ","},
    # fields that change training or initialisation only, or that the reference does not read
    "training_and_init_fields": {
        "dropout": 0.25, "init_base_std": 0.5, "init_std_factor": "current_depth", "seed": 7,
        "rope_use_fp32_in_outer_product": True, "norm_affine": False, "max_length": 3,
        "cross_attn_use_flex_attention": True, "encoder_hash_byte_group_vocab": 7,
        "encoder_hash_byte_group_nb_functions": 5, "patching_mode": "aligned",
        "patch_size": 6.0, "share_encoder_decoder_emb": False},
    # documents of 5..12 tokens, local windows shorter than a document
    "xformers_block_causal_docs_own_patch_windows": {
        "attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 5,
        "cross_attn_window_encoder": None, "cross_attn_window_decoder": None},
    "xformers_block_causal_gqa_docs_own_patch_windows": {
        "attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 3,
        "n_kv_heads_global": 1, "cross_attn_all_layers_encoder": False,
        "cross_attn_window_encoder": 1, "cross_attn_window_decoder": 1,
        "downsampling_by_pooling": "avg"},
    "xformers_block_causal_docs": {
        "attn_impl": "xformers", "attn_bias_type": "block_causal", "local_attention_window_len": 5},
    "xformers_causal_docs": {
        "attn_impl": "xformers", "attn_bias_type": "causal", "local_attention_window_len": 5},
    # every field BASE_ARGS sets but lst.yaml leaves out is the reference's default there
    "reference_lst_yaml": REFERENCE_LST_YAML,
}


# The reference's other shipped model configurations, shrunk as REFERENCE_LST_YAML, which the
# import refuses naming the field it has no counterpart of: lst/configs/debug.yaml and lst.yaml
# as stored at 9e86f12 (hash n-gram embeddings; debug.yaml patches by "space" too), and
# apps/main/configs/llama_{1B,7B}.yaml (the plain token transformer of apps/main, no LST model).
HASH_NGRAMS = {"encoder_hash_byte_group_size": [4], "encoder_hash_byte_group_vocab": 50002,
               "encoder_hash_byte_group_nb_functions": 3, "encoder_enable_byte_ngrams": False}
REFUSED_REFERENCE_CONFIGURATIONS = {
    "debug_yaml": ({**REFERENCE_LST_YAML, **HASH_NGRAMS, "patching_mode": "space"},
                   "reference encoder_hash_byte_group_size=[4] is not supported"),
    "lst_yaml_at_9e86f12": ({**REFERENCE_LST_YAML, **HASH_NGRAMS},
                            "reference encoder_hash_byte_group_size=[4] is not supported"),
    "hash_sizes_as_a_string": ({**REFERENCE_LST_YAML, **HASH_NGRAMS,
                                "encoder_hash_byte_group_size": "3,,4"},
                               "reference encoder_hash_byte_group_size='3,,4' is not supported"),
    "hash_sizes_as_a_string_of_no_integers": (
        {**REFERENCE_LST_YAML, "encoder_hash_byte_group_size": "3,four"},
        "reference encoder_hash_byte_group_size='3,four' is not a comma-separated list of "
        "integers"),
    "llama_1B_yaml": ({"dim": 64, "n_layers": 3, "n_heads": 4},
                      "reference option cross_attn_encoder=False is not supported (need True): "
                      "without the local encoder's and decoder's cross-attention the args "
                      "describe no LST model"),
    "llama_7B_yaml": ({"dim": 64, "n_layers": 3, "n_heads": 4, "rope_theta": 100_000,
                       "ffn_dim_multiplier": 1.0, "multiple_of": 256},
                      "reference option cross_attn_encoder=False is not supported (need True): "
                      "without the local encoder's and decoder's cross-attention the args "
                      "describe no LST model"),
}


def reference_args(name: str) -> dict:
    return {**BASE_ARGS, **CONFIGURATIONS[name]}


def random_reference_state(model_args: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the reference's names and shapes: norms near 1, matrices with std
    1/sqrt(fan_in) (activations stay O(1)), embeddings with std 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(reference_tensor_shapes(model_args).items()):
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith("tok_embeddings.weight"):
            state[name] = noise
        else:
            state[name] = noise / shape[1] ** 0.5
    return state


def random_patch_lengths(generator: torch.Generator, row: torch.Tensor, patches: int,
                         longest: int) -> list[int]:
    """`patches` lengths summing to `len(row) + 1` (the batch contract), the first 1, then random
    lengths 1..longest, and zero-length patches where the tokens run out first. As in LST data,
    an EOS and the token after it (the next document's BOS) are patches of their own."""
    n = len(row)
    eos = torch.nonzero(row == EOS).flatten().tolist()
    starts = sorted({start for e in eos for start in (e, e + 1, e + 2)} | {n})
    lengths, position = [1], 1
    while position < n:
        next_start = min(start for start in starts if start > position)
        drawn = int(torch.randint(1, longest + 1, (1,), generator=generator))
        lengths.append(min(drawn, next_start - position))
        position += lengths[-1]
    lengths[-1] += 1  # the last patch also holds the last target's place
    return lengths + [0] * (patches - len(lengths))


def random_batch(model_args: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens [3, 30]` (under "xformers" several documents of 5..12 tokens, each ended by EOS)
    and ragged `patch_lengths [3, 30]` that end in zero-length patches."""
    generator = torch.Generator().manual_seed(seed)
    rows, n = 3, 30
    tokens = torch.randint(3, VOCAB, (rows, n), generator=generator)
    if model_args["attn_impl"] == "xformers":
        for row in tokens:
            position = int(torch.randint(3, 8, (1,), generator=generator))
            while position < n:
                row[position] = EOS
                position += int(torch.randint(5, 13, (1,), generator=generator))
    lengths = [random_patch_lengths(generator, row, n, longest)  # n patches always suffice
               for row, longest in zip(tokens, (5, 2, 4), strict=True)]
    return tokens, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("name", sorted(REFUSED_REFERENCE_CONFIGURATIONS))
def test_the_reference_configurations_it_cannot_compute_are_refused_by_field(name):
    model_args, message = REFUSED_REFERENCE_CONFIGURATIONS[name]
    with pytest.raises(ReferenceImportError, match=re.escape(message)):
        lst_config_from_reference(model_args)


@pytest.mark.parametrize("inputs", ["static", "aligned", "ragged"])
def test_oracle_reproduces_the_reference_logits(reference_fixtures, inputs):
    model_args = json.loads((reference_fixtures / "config_A.json").read_text())["model_args"]
    reference = load_file(str(reference_fixtures / "state_dict_A.safetensors"))
    assert {name: tuple(t.shape) for name, t in reference.items()} == reference_tensor_shapes(model_args)
    data = json.loads((reference_fixtures / f"inputs_{inputs}.json").read_text())
    expected = torch.from_numpy(np.load(reference_fixtures / f"logits_A_{inputs}.npy"))
    logits = reference_logits(model_args, reference, torch.tensor(data["tokens"]),
                              torch.tensor(data["patch_lengths"]))
    assert (logits - expected).abs().max().item() <= 1e-4


def imported_model(model_args: dict, reference: dict[str, torch.Tensor]) -> LSTModel:
    config = lst_config_from_reference(model_args)
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend="sdpa", kernel_backend="torch")
    load_reference_state_dict(model, reference)
    return model.eval()


def assert_same_tensors(exported: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    """The reference tensors came back: the same names, dtypes and values, bit for bit."""
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def export_after_training_checkpoint(reference: dict[str, torch.Tensor], model_args: dict,
                                     config, directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reference checkpoint -> portable -> our training (dist) checkpoint -> portable -> reference
    checkpoint, all in `directory`, checking on the way that the portable checkpoint read back
    holds `config` (the import's): the tensors and model args of the exported reference
    checkpoint."""
    save_file(reference, str(directory / "reference.safetensors"))
    (directory / "params.json").write_text(json.dumps({"model": model_args}))
    import_reference_to_portable(directory / "reference.safetensors", directory / "params.json",
                                 directory / "portable", num_units=20)
    portable_to_dist(directory / "portable", directory / "dist")
    dist_to_portable(directory / "dist", directory / "portable_again")
    assert load_portable(directory / "portable_again").config == config
    export_portable_to_reference(directory / "portable_again", directory / "exported")
    return (read_reference_state_dict(directory / "exported" / "consolidated.pth"),
            read_reference_model_args(directory / "exported" / "params.json"))


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_imported_model_matches_reference_forward(single_rank, name):
    model_args = reference_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    tokens, patch_lengths = random_batch(model_args)
    with torch.no_grad():
        expected = reference_logits(model_args, reference, tokens, patch_lengths)
        logits = imported_model(model_args, reference)(tokens, patch_lengths)
    assert logits.shape == expected.shape == (*tokens.shape, VOCAB)
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "flex_attention", "xformers"])
def test_rows_of_max_encoder_seq_length_tokens_are_the_reference_function(single_rank, impl):
    """The reference runs rows of at most `max_encoder_seq_length` tokens (its local RoPE table);
    its causal implementations are imported with that many tokens as the local window. At the
    limit (the first token still seen from the last, the largest RoPE angle) the imported model
    computes the reference's function; one token more the reference refuses (docs/architecture.md:
    the import carries no such limit, and a longer row is an extension the reference has none
    of)."""
    model_args = {**BASE_ARGS, "attn_impl": impl, "local_attention_window_len": 7}
    reference = random_reference_state(model_args, seed=5)
    tokens, patch_lengths = random_batch(model_args)  # rows of 30 tokens
    model = imported_model({**model_args, "max_encoder_seq_length": 30}, reference)
    with torch.no_grad():
        expected = reference_logits({**model_args, "max_encoder_seq_length": 30}, reference,
                                    tokens, patch_lengths)
        assert (model(tokens, patch_lengths) - expected).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="rows of 30 tokens: the reference runs rows of at most "
                                         "max_encoder_seq_length 29 tokens"):
        reference_logits({**model_args, "max_encoder_seq_length": 29}, reference, tokens,
                         patch_lengths)


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_export_gives_back_the_reference_tensors(single_rank, name):
    model_args = reference_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    model = imported_model(model_args, reference)
    assert_same_tensors(export_reference(full_state_dict(model), model.lst_config), reference)


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_import_training_checkpoint_export_reimport_is_identical(single_rank, tmp_path, name):
    """Reference checkpoint -> portable -> our training (dist) checkpoint -> portable -> reference
    checkpoint: the reference tensors come back bit for bit, and the written args import to the
    same configuration (the dist checkpoint keeps lst-train's flags, not the reference's args)."""
    model_args = reference_args(name)
    reference = random_reference_state(model_args, seed=len(name))
    config, state = import_reference(reference, model_args)
    exported, written = export_after_training_checkpoint(reference, model_args, config, tmp_path)
    assert_same_tensors(exported, reference)
    assert set(written) <= REFERENCE_MODEL_FIELDS, set(written) - REFERENCE_MODEL_FIELDS
    config_again, state_again = import_reference(exported, written)
    assert config_again == config
    assert sorted(state_again) == sorted(state)
    assert all(torch.equal(state_again[key], tensor) for key, tensor in state.items())


@st.composite
def reference_configurations(draw) -> dict:
    """Reference model args drawn over every option the import accepts: widths (the global one
    equal to the local one with one slot, else any that `k * De` may project from), layers,
    heads and key/value heads, slots, cross-attention heads and windows, layer switches,
    pooling, FFN rule, norm epsilon, RoPE base, attention implementation, and head sizes and
    local key/value heads left null, spelt out as derived, or of other values."""
    local = draw(st.sampled_from((8, 16, 24)))
    local_heads = draw(st.sampled_from([h for h in (1, 2, 4) if local % h == 0 and (local // h) % 2 == 0]))
    slots = draw(st.integers(1, 3))
    global_heads = draw(st.sampled_from((1, 2, 4)))
    if slots == 1 and draw(st.booleans()):
        global_heads = draw(st.sampled_from([h for h in (1, 2, 4) if (local // h) % 2 == 0]))
        width = local  # no global input projection and no decoder patch projection
    else:
        width = global_heads * 2 * draw(st.integers(2, 5))
        if width == local:
            width += 2 * global_heads  # equal widths need one slot (a case of the branch above)
    windows = (None, 1, 2, 3, 64)
    impl = draw(st.sampled_from(("sdpa", "flex_attention", "xformers")))
    args = {
        "dim_global": width, "n_heads_global": global_heads,
        "n_kv_heads_global": draw(st.sampled_from([None] + [g for g in (1, 2, 4) if global_heads % g == 0])),
        "dim_local_encoder": local, "dim_local_decoder": local,
        "n_layers_global": draw(st.integers(1, 2)), "n_layers_local_encoder": draw(st.integers(1, 3)),
        "n_layers_local_decoder": draw(st.integers(1, 3)),
        "n_heads_local_encoder": local_heads,
        "n_heads_local_decoder": draw(st.sampled_from([h for h in (1, 2, 4) if local % h == 0 and (local // h) % 2 == 0])),
        "cross_attn_k": slots,
        "cross_attn_nheads": draw(st.sampled_from([h for h in (1, 2, 4) if local % h == 0])),
        "cross_attn_window_encoder": draw(st.sampled_from(windows)),
        "cross_attn_window_decoder": draw(st.sampled_from(windows)),
        "cross_attn_all_layers_encoder": draw(st.booleans()),
        "cross_attn_all_layers_decoder": draw(st.booleans()),
        "downsampling_by_pooling": draw(st.sampled_from(("max", "avg", "mean", "min"))),
        "multiple_of": draw(st.sampled_from((1, 8, 16, 32))),
        "ffn_dim_multiplier": draw(st.sampled_from((None, 1.0, 0.5, 1.3))),
        "norm_eps": draw(st.sampled_from((1e-5, 1e-3, 0.1))),
        "rope_theta": draw(st.sampled_from((10.0, 500.0, 10000.0))),
        "attn_impl": impl, "attn_bias_type": draw(st.sampled_from(("causal", "block_causal"))),
    }
    if impl == "xformers":  # packed documents, local windows shorter than some of them
        args.update(local_attention_window_len=draw(st.integers(1, 8)))
    shared_heads = math.gcd(local_heads, args["n_heads_local_decoder"])
    if draw(st.booleans()):  # spelt out where they restate the derived sizes
        head_sizes = {width // global_heads, local // local_heads, local // args["n_heads_local_decoder"]}
        args.update(head_dim=head_sizes.pop() if len(head_sizes) == 1 else None,
                    n_kv_heads=local_heads if local_heads == args["n_heads_local_decoder"] else None)
    elif draw(st.booleans()):  # heads of another size, local key/value heads shared by groups
        args.update(head_dim=draw(st.sampled_from((None, 2, 6, 12))),
                    n_kv_heads=draw(st.sampled_from(
                        [None] + [g for g in (1, 2, 4) if shared_heads % g == 0])))
    return {**BASE_ARGS, **args}


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model_args=reference_configurations())
def test_any_accepted_reference_configuration_matches_the_oracle_and_exports_back(single_rank,
                                                                                  model_args):
    reference = random_reference_state(model_args, seed=1)
    tokens, patch_lengths = random_batch(model_args)
    model = imported_model(model_args, reference)
    with torch.no_grad():
        expected = reference_logits(model_args, reference, tokens, patch_lengths)
        logits = model(tokens, patch_lengths)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert_same_tensors(export_reference(full_state_dict(model), model.lst_config), reference)
    assert lst_config_from_reference(reference_model_args(model.lst_config)) == model.lst_config
