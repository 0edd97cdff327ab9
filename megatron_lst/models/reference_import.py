"""Import the reference implementation's checkpoints (`neillu23/lst`, a BLT fork) into `LSTModel`.

Two steps:
1. `canonical_state_dict`: reference names and layouts -> this package's names for an unsharded
   model (TP=1, PP=1, megatron's local spec), e.g. `wq/wk/wv` -> a fused `linear_qkv`. The one
   table `reference_tensor_map` states this mapping; the export
   (`megatron_lst.checkpoint.reference.export_reference`) splits by the same table.
2. `shard_for_model`: canonical tensors -> the state dict of one rank's `LSTModel`, whatever its
   tensor-parallel rank, pipeline stage or global-block spec (local or Transformer Engine names).

Layouts (reference -> ours):
- local attention `wq, wk, wv` -> `linear_qkv = [wq; wk; wv]` (`H`, `G` and `G` heads of
  `head_dim` rows: the reference's `n_kv_heads` key/value heads and `head_dim` head size); `wo`
  -> `linear_proj`;
- global attention -> megatron's grouped `linear_qkv`: for each KV group g, the rows of its query
  heads, then its key head, then its value head (reference GQA repeats each KV head for
  consecutive query heads, which is megatron's grouping);
- SwiGLU `w1, w3` -> `linear_fc1 = [w1; w3]` (gate first, megatron's `glu` chunk order); `w2` ->
  `linear_fc2`. Under TP each rank holds `[w1_r; w3_r]`, so fc1 is sharded per half;
- cross-attention `wk, wv` -> `linear_kv = [wk; wv]`; `cross_attn_norm_q/kv` -> `norm_q/kv`;
- `attention_norm` / `ffn_norm` -> `input_norm` / `pre_mlp_norm` (local) or megatron's
  `input_layernorm` / `pre_mlp_layernorm`;
- the decoder's patch projection: the reference builds it only when `dim_global` differs from
  `dim_local_decoder`; without it (then `cross_attn_k` is 1) its cross-attention reads the global
  output itself, which our `local_decoder.patch_projection` computes as the identity matrix
  (`reference_identity_tensors`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from .config import (
    CrossAttentionConfig,
    DocumentMaskingConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    ModelConfigError,
    swiglu_ffn_size,
)


class ReferenceImportError(ValueError):
    """A reference checkpoint or config cannot be mapped onto `LSTModel`."""


# The reference's own defaults (its `ByteLatentTransformerArgs`) for every field read here: an
# args file that leaves a field out means what it means to the reference.
REFERENCE_DEFAULTS = {
    "vocab_size": -1, "dim_global": 512, "n_layers_global": 8, "n_heads_global": 8,
    "n_kv_heads_global": None, "dim_token": None, "dim_local_encoder": 512,
    "dim_local_decoder": 512, "n_layers_local_encoder": 8, "n_layers_local_decoder": 8,
    "n_heads_local_encoder": 8, "n_heads_local_decoder": 8, "head_dim": None, "n_kv_heads": None,
    "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "attn_impl": "sdpa", "attn_bias_type": "causal", "eos_id": 2,
    "local_attention_window_len": None, "max_encoder_seq_length": None,
    "cross_attn_encoder": False, "cross_attn_decoder": False, "cross_attn_init_by_pooling": False,
    "cross_attn_k": None, "cross_attn_nheads": None, "cross_attn_window_encoder": None,
    "cross_attn_window_decoder": None, "cross_attn_all_layers_encoder": False,
    "cross_attn_all_layers_decoder": False, "cross_attn_use_flex_attention": True,
    "downsampling_by_pooling": None,
    "use_local_encoder_transformer": False, "use_rope": True, "encoder_enable_byte_ngrams": False,
    "encoder_hash_byte_group_size": None, "encoder_hash_byte_group_nb_functions": 3,
    "pm_size": 0, "max_seqlen": 1024,
    "patch_size": None, "patching_mode": None,
}

# Every field of the reference's model args (its `ByteLatentTransformerArgs` with the base
# `BaseTransformerArgs`). Its loader (pydantic, extra="forbid") refuses args with any other field,
# and so does the import: a misspelt field (`norm_esp`) or one of a reference version that
# computes something else would otherwise be ignored, the model built without it.
REFERENCE_MODEL_FIELDS = frozenset("""
    dim n_layers head_dim n_heads n_kv_heads ffn_dim_multiplier multiple_of norm_eps rope_theta
    rope_use_fp32_in_outer_product init_base_std init_std_factor max_seqlen attn_impl
    attn_bias_type eos_id seed vocab_size weight_tying patch_in_forward dim_token dim_global
    dim_local_decoder dim_local_encoder n_layers_global n_layers_local_decoder
    n_layers_local_encoder patch_size patching_mode patching_threshold patching_threshold_add
    patcher_curr_align_steps patcher_curr_mixed_steps monotonicity patching_batch_size
    patching_device max_patch_length tie_local_encoder_decoder_logits
    use_local_encoder_transformer encoder_lm_loss max_encoder_seq_length pad_to_max_length
    encoder_enable_byte_ngrams encoder_enable_byte_group_hash ngram_vocab_sizes
    cross_attn_encoder cross_attn_decoder cross_attn_window_encoder cross_attn_window_decoder
    cross_attn_k cross_attn_nheads cross_attn_all_layers_decoder cross_attn_all_layers_encoder
    cross_attn_use_flex_attention cross_attn_init_by_pooling encoder_hash_byte_group_size
    encoder_hash_byte_group_vocab encoder_hash_byte_group_nb_functions log_patch_lengths
    non_linearity use_rope recompute_fc1_out recompute_fc3_out recompute_attn custom_bwd
    layer_ckpt init_use_gaussian init_use_depth alpha_depth max_length norm_affine pre_norm
    norm_type dropout output_size architecture share_encoder_decoder_emb
    global_local_decoder_residual_layer tokenize_with_bpe_delimiter patching_thresholds_str
    tie_local_encoder_decoder encoder_preds_low_entropy_toks encoder_preds_random_toks
    dim_token_emb dim_patch_emb encoder_ngram_table_dir encoder_ngram_to_size_str
    entropy_model_checkpoint_dir entropy_model_is_ngram_model downsampling_by_pooling
    n_heads_global n_heads_local_decoder n_heads_local_encoder n_kv_heads_global
    conv_kernel_size local_attention_window_len sequence_parallel loss_parallel
    fuse_sequence_parallel use_fsdp attn_to_keep pm_size full_logging_n_layers
""".split())

# Reference options LSTModel implements only with one value; `use_local_encoder_transformer`
# only picks the token width when `dim_token` is null, and any value giving the local width
# imports (`_check_token_width`).
REQUIRED_REFERENCE_OPTIONS = {
    "use_rope": True, "cross_attn_encoder": True, "cross_attn_decoder": True,
    "cross_attn_init_by_pooling": True, "use_local_encoder_transformer": True,
    # byte n-gram embeddings add ngram_ids to every batch (the reference refuses batches
    # without them); the hash n-gram embeddings are refused below
    "encoder_enable_byte_ngrams": False,
    # extra "parameter mixing" rows in the token embedding and the output layer
    "pm_size": 0,
    # with false it builds dense cross-attention masks, which its cross-attention (flex
    # attention only) refuses: it runs no forward
    "cross_attn_use_flex_attention": True,
}

# Why a required option's other value is not an LST model at all (`lst_config_from_reference`).
_NO_LST_MODEL = dict.fromkeys(
    ("cross_attn_encoder", "cross_attn_decoder"),
    ": without the local encoder's and decoder's cross-attention the args describe no LST model "
    "(the reference's apps/main configurations, llama_1B and llama_7B, are plain token "
    "transformers; train the token baseline here with --patching-mode none)")

# Fields of the reference's args that its model never reads: its norms are RMSNorm, its FFNs
# SwiGLU and its output layer the local decoder's own, whatever these say, so any value imports.
# An export writes the reference's defaults.
REFERENCE_FIELDS_ITS_MODEL_IGNORES = {
    "non_linearity": "swiglu", "norm_type": "rmsnorm", "pre_norm": True, "weight_tying": False,
    "tie_local_encoder_decoder_logits": False,
}


# Fields of the reference's args that its model reads only in training (`dropout`) or when it
# initialises new weights (`init_base_std`, `init_std_factor`), and the init fields it declares
# but never reads (`init_use_gaussian`, `init_use_depth`, `alpha_depth`): an imported model holds
# trained weights and fine-tunes under lst-train's own flags, so none is carried over. (No path
# here builds a model from reference args without its weights: `lst-convert import-reference`
# needs the checkpoint.) Each: the reference's default, and what lst-train offers in its place
# (`fields_not_carried_over`).
_NEVER_READ = ("the reference's model never reads it (its initialisation reads init_base_std and "
               "init_std_factor only), and imported weights are not initialised")
REFERENCE_FIELDS_NOT_CARRIED_OVER = {
    "dropout": (0, "no lst-train flag drops what the reference dropped (the inputs of its local "
                   "encoder, global model and local decoder, and the decoder's last hidden "
                   "states); the nearest is lst-train --hidden-dropout, after the global "
                   "model's attention and MLP blocks"),
    "init_base_std": (None, "imported weights are not initialised; lst-train --init-method-std "
                            "sets the std of the normal initialisation of new weights"),
    "init_std_factor": ("disabled", "imported weights are not initialised, and no lst-train flag "
                                    "scales an initialisation by depth"),
    "init_use_gaussian": (True, _NEVER_READ),
    "init_use_depth": ("current", _NEVER_READ),
    "alpha_depth": ("disabled", _NEVER_READ),
}

# The values of the reference's `init_std_factor` (its `InitStdFactor`); its loader refuses others.
REFERENCE_INIT_STD_FACTORS = ("disabled", "global_depth", "current_depth", "dim_ratio")

# Fields of the reference's args that change neither the weights nor the forward (given tokens
# and patch lengths) of any model the import accepts, each with why: read off its model code
# (`lst/model/*.py`, `lst/base_transformer.py`), which builds and runs every module. Any value
# imports; an export keeps the value of the args it came with, else leaves the field out (the
# reference's default).
_NOT_READ_BY_ITS_MODEL = "declared in the reference's args, read by none of its modules"
_DATA_OR_PATCHER = ("read by the reference's tokenizer, data pipeline or patcher, which make the "
                    "model's inputs (tokens and patch lengths: lst-train's own data and "
                    "--patching-mode flags here), never by its model's function of them")
_TRAINING_RUN = ("a setting of its training run (seeding, activation recomputation, "
                 "parallelism, logging) that its model's function does not read")
_NGRAM_TABLES = ("used only to build the byte n-gram embeddings, which only "
                 "encoder_enable_byte_ngrams true keeps (refused)")
REFERENCE_FIELDS_WITHOUT_EFFECT = {
    **dict.fromkeys(("dim", "n_layers", "n_heads"),
                    "the reference builds its global and local models from dim_global, "
                    "dim_local_encoder, dim_local_decoder and their n_layers_* and n_heads_*; "
                    "these top-level sizes size none of them"),
    **dict.fromkeys(("dim_token_emb", "dim_patch_emb"),
                    "the reference overwrites them for each of its models from dim_token, the "
                    "model widths and cross_attn_k"),
    "share_encoder_decoder_emb": (
        "picks the local decoder's token width (true: the encoder's token width; false: "
        "dim_token, else dim_local_decoder), which sizes the rows of its decoder patch "
        "projection (width * cross_attn_k) and, when it is not dim_local_decoder, adds a "
        "token projection its forward never applies; "
        "it shares no weights (the decoder has no embedding). The import requires the "
        "encoder's token width == dim_local_encoder == dim_local_decoder, where both values "
        "give dim_local_decoder"),
    "rope_use_fp32_in_outer_product": (
        "casts the RoPE positions to float32 before their outer product with the frequencies; "
        "without it the product promotes the integer positions to float32 itself: the same "
        "table"),
    "max_length": "sizes the learned position embeddings built only with use_rope false (refused)",
    "encoder_hash_byte_group_vocab": (
        "sizes the hash n-gram embedding tables, which are refused "
        "(encoder_hash_byte_group_size)"),
    **dict.fromkeys(("ngram_vocab_sizes", "encoder_ngram_table_dir", "encoder_ngram_to_size_str"),
                    _NGRAM_TABLES),
    **dict.fromkeys((
        "architecture", "output_size", "norm_affine", "global_local_decoder_residual_layer",
        "tie_local_encoder_decoder", "conv_kernel_size", "encoder_lm_loss",
        "encoder_preds_low_entropy_toks", "encoder_preds_random_toks",
        "encoder_enable_byte_group_hash", "attn_to_keep"), _NOT_READ_BY_ITS_MODEL),
    "patch_in_forward": (
        "builds a patcher that its forward runs only when given no patch lengths; given them "
        "(as lst-train gives them) it computes the same"),
    **dict.fromkeys((
        "patching_threshold", "patching_threshold_add",
        "patcher_curr_align_steps", "patcher_curr_mixed_steps", "monotonicity",
        "patching_batch_size", "patching_device", "max_patch_length", "patching_thresholds_str",
        "entropy_model_checkpoint_dir", "entropy_model_is_ngram_model", "pad_to_max_length",
        "tokenize_with_bpe_delimiter"), _DATA_OR_PATCHER),
    **dict.fromkeys((
        "seed", "recompute_fc1_out", "recompute_fc3_out", "recompute_attn", "custom_bwd",
        "layer_ckpt", "sequence_parallel", "loss_parallel", "fuse_sequence_parallel", "use_fsdp",
        "log_patch_lengths", "full_logging_n_layers"), _TRAINING_RUN),
}


def fields_not_carried_over(model_args: dict) -> list[str]:
    """A notice for each field of `REFERENCE_FIELDS_NOT_CARRIED_OVER` that `model_args` (the
    reference's model args) set to other than the reference's default: that it is not carried
    over, and what lst-train offers in its place. (`lst_config_from_reference` has refused
    values the reference cannot build a model from.)"""
    return [f"reference {name}={model_args[name]!r} is not carried over: {instead}"
            for name, (default, instead) in REFERENCE_FIELDS_NOT_CARRIED_OVER.items()
            if model_args.get(name, default) != default]


def row_limit_notice(model_args: dict) -> str:
    """A notice naming the longest row the reference model ran, `max_encoder_seq_length` tokens
    (its local models' RoPE table, which a longer row overruns, failing a shape assert): the
    imported model computes the reference's function up to it, and on a longer row RoPE
    positions past that table (and, for a whole-row `attn_impl`, a window of that many tokens),
    which the reference has no counterpart of. Call after `lst_config_from_reference` accepted
    `model_args`."""
    a = {**REFERENCE_DEFAULTS, **model_args}
    longest, beyond = a["max_encoder_seq_length"], "RoPE positions past its table"
    if a["attn_impl"] in CAUSAL_ATTN_IMPLS:  # imported with a window of `longest` tokens
        beyond += f", and local attention over the last {longest} tokens, not the whole row"
    return (f"reference max_encoder_seq_length={longest}: the reference runs rows of at most "
            f"{longest} tokens (its local RoPE table), and the imported model computes its "
            f"function on those; keep --max-tokens at or below {longest}: on longer rows it "
            f"computes what the reference cannot ({beyond})")


# Sizes the reference reads as `value or derived`: 0 means what null means (heads of hidden size /
# heads, one key/value head per query head).
UNSET_WHEN_ZERO = ("head_dim", "n_kv_heads", "n_kv_heads_global")


# The reference's `downsampling_by_pooling` values -> `CrossAttentionConfig.pooling` ("avg" and
# "mean" both pool by mean in the reference). It tests for each name inside the string and
# concatenates the pools of every one it finds, which its patch projection cannot take then.
REFERENCE_POOLING = {"max": "max", "avg": "mean", "mean": "mean", "min": "min"}


def lst_config_from_reference(model_args: dict) -> LSTConfig:
    """`LSTConfig` from the reference's `ByteLatentTransformerArgs` (as a dict, e.g. `model_args`
    of a reference config; a field left out takes the reference's default). Raises for reference
    options this package does not implement and for arguments the reference itself cannot build
    a model from."""
    unknown = sorted(set(model_args) - REFERENCE_MODEL_FIELDS)
    if unknown:
        raise ReferenceImportError(
            f"reference model args hold field(s) {unknown} that the reference's model args do "
            "not have (its loader refuses them too): a misspelt field, or one of another "
            "reference version, whose meaning the import does not know; correct or remove it")
    a = {**REFERENCE_DEFAULTS, **model_args}
    _read_whole_numbers(a)
    for key in UNSET_WHEN_ZERO:
        if a[key] == 0:  # None == 0 is False
            a[key] = None
    for key, value in REQUIRED_REFERENCE_OPTIONS.items():
        if a[key] != value and key != "use_local_encoder_transformer":
            raise ReferenceImportError(f"reference option {key}={a[key]!r} is not supported (need "
                                       f"{value!r}){_NO_LST_MODEL.get(key, '')}")
    _check_hash_embeddings(a)
    _check_init_fields(a)
    for key in ("vocab_size", "multiple_of", "cross_attn_k", "cross_attn_nheads", "max_seqlen"):
        if not isinstance(a[key], int) or a[key] < 1:
            raise ReferenceImportError(
                f"reference {key}={a[key]!r}: the reference builds no model without a positive "
                "integer there; fix the model arguments")
    _check_cross_attention_heads(a)
    _check_token_width(a)
    _check_decoder_input_width(a)
    _check_patching_mode(a)
    pooling = a["downsampling_by_pooling"]
    if not isinstance(pooling, str) or pooling not in REFERENCE_POOLING:
        raise ReferenceImportError(
            f"reference downsampling_by_pooling={pooling!r} is not supported "
            f"(need one of {', '.join(map(repr, REFERENCE_POOLING))})")
    _check_head_shapes(a)
    _check_decoder_projection(a)
    window, documents = reference_attention(a)
    # None: no multiplier (the reference multiplies only by a number it is given, 0 included)
    multiple_of, multiplier = a["multiple_of"], a["ffn_dim_multiplier"]
    if multiplier is None:
        multiplier = 1.0
    elif not isinstance(multiplier, int | float) or isinstance(multiplier, bool) \
            or not math.isfinite(multiplier):
        raise ReferenceImportError(
            f"reference ffn_dim_multiplier={multiplier!r} is not a number; the reference builds "
            "no FFN from it (give a number, or null for none)")

    def local(dim: int, layers: int, heads: int) -> LocalModelConfig:
        return LocalModelConfig(dim, layers, heads, swiglu_ffn_size(dim, multiple_of, multiplier),
                                window=window, num_query_groups=a["n_kv_heads"],
                                kv_channels=a["head_dim"])

    try:
        return LSTConfig(
            vocab_size=a["vocab_size"],
            global_model=GlobalModelConfig(
                hidden_size=a["dim_global"], num_layers=a["n_layers_global"],
                num_heads=a["n_heads_global"],
                ffn_hidden_size=swiglu_ffn_size(a["dim_global"], multiple_of, multiplier),
                num_query_groups=a["n_kv_heads_global"], kv_channels=a["head_dim"],
            ),
            encoder=local(a["dim_local_encoder"], a["n_layers_local_encoder"], a["n_heads_local_encoder"]),
            decoder=local(a["dim_local_decoder"], a["n_layers_local_decoder"], a["n_heads_local_decoder"]),
            cross_attention=CrossAttentionConfig(
                slots_per_patch=a["cross_attn_k"], num_heads=a["cross_attn_nheads"],
                encoder_window=_patch_window(a["cross_attn_window_encoder"]),
                decoder_window=_patch_window(a["cross_attn_window_decoder"]),
                all_encoder_layers=a["cross_attn_all_layers_encoder"],
                all_decoder_layers=a["cross_attn_all_layers_decoder"],
                pooling=REFERENCE_POOLING[pooling], double_residual=True,
            ),
            norm_eps=a["norm_eps"],
            rope_theta=a["rope_theta"],
            max_sequence_length=a["max_seqlen"],
            documents=documents,
        )
    except (ModelConfigError, TypeError) as error:  # TypeError: a size that is no number
        raise ReferenceImportError(
            f"reference model args do not describe a model this package builds: {error}") from None


# The reference's integer fields read here (pydantic reads 64.0 there as 64).
WHOLE_NUMBER_FIELDS = (
    "vocab_size", "dim_global", "n_layers_global", "n_heads_global", "n_kv_heads_global",
    "dim_token", "dim_local_encoder", "dim_local_decoder", "n_layers_local_encoder",
    "n_layers_local_decoder", "n_heads_local_encoder", "n_heads_local_decoder", "head_dim",
    "n_kv_heads", "multiple_of", "eos_id", "local_attention_window_len", "max_encoder_seq_length",
    "cross_attn_k", "cross_attn_nheads", "cross_attn_window_encoder", "cross_attn_window_decoder",
    "pm_size", "max_seqlen", "encoder_hash_byte_group_nb_functions")


def _read_whole_numbers(a: dict) -> None:
    """Integer fields written as floats: a whole one (64.0) is that integer, as the reference
    reads it; another (NaN, 2.5), a bool (`n_heads_global: true` compared as 1 head) and any
    other value but an integer or null are refused naming the field."""
    for key in WHOLE_NUMBER_FIELDS:
        value = a[key]
        if isinstance(value, float) and value.is_integer():
            a[key] = int(value)
        elif value is not None and type(value) is not int:  # bool is an int subclass
            raise ReferenceImportError(
                f"reference {key}={value!r} is not a whole number; the reference builds no "
                "model from it (give an integer)")


def require_reference_value(value: object, accepted: tuple, field: str) -> None:
    """Refuse, naming `field` (as the message should start), a value outside `accepted`: the
    values of the enum the reference's loader reads that field as, which refuses any other."""
    if value not in accepted:
        raise ReferenceImportError(
            f"{field} {value!r} is not one of the reference's {', '.join(map(repr, accepted))} "
            "(its loader refuses it: a misspelt value?); correct it")


def _check_init_fields(a: dict) -> None:
    """The reference's loader reads `init_std_factor` as one of `REFERENCE_INIT_STD_FACTORS` (its
    `InitStdFactor`) and refuses args with any other value; so does the import, naming the field
    (it is not carried over either way: `fields_not_carried_over`)."""
    require_reference_value(a.get("init_std_factor", "disabled"), REFERENCE_INIT_STD_FACTORS,
                            "reference init_std_factor")


def _check_token_width(a: dict) -> None:
    """The reference's token width (its `dim_token_emb`): `dim_token` when given, else
    `dim_local_encoder` with `use_local_encoder_transformer`, else `dim_global // patch_size`. A
    width other than `dim_local_encoder` gives its local models a token projection that its
    forward never applies, and patch slots it cannot reshape to the local width: refused."""
    de = a["dim_local_encoder"]
    if a["dim_token"] is not None:
        width, source = a["dim_token"], f"dim_token {a['dim_token']!r}"
    elif a["use_local_encoder_transformer"]:
        return
    elif isinstance(a["dim_global"], int) and isinstance(a["patch_size"], int | float) \
            and a["patch_size"] > 0:
        width = a["dim_global"] // a["patch_size"]
        source = (f"dim_global {a['dim_global']} // patch_size {a['patch_size']!r} (dim_token "
                  "null and use_local_encoder_transformer false)")
    else:
        raise ReferenceImportError(
            f"reference use_local_encoder_transformer=False with dim_token null takes the token "
            f"width from dim_global {a['dim_global']!r} // patch_size {a['patch_size']!r}, which "
            "is no width; set dim_token to dim_local_encoder")
    if width != de:
        raise ReferenceImportError(
            f"reference token width {source} != dim_local_encoder {de!r}: token-embedding "
            "projections are not supported (the reference cannot reshape its patch slots then); "
            "set dim_token to dim_local_encoder")


def _check_decoder_input_width(a: dict) -> None:
    """The reference's local decoder takes the local encoder's last token states as its input
    and runs them through its own cross-attention and layers: with `dim_local_decoder !=
    dim_local_encoder` the reference builds a model but runs no forward (its decoder's norms
    take `dim_local_decoder`-wide states), so no reference model was trained with such args.
    Refused naming both widths (the decoder token width that `share_encoder_decoder_emb` picks
    sizes only the decoder's patch projection and does not make it run)."""
    de, dd = a["dim_local_encoder"], a["dim_local_decoder"]
    if isinstance(de, int) and isinstance(dd, int) and de != dd:
        raise ReferenceImportError(
            f"reference dim_local_decoder {dd} != dim_local_encoder {de}: the reference's local "
            f"decoder reads the encoder's {de}-wide token states into its {dd}-wide layers and "
            "runs no forward with these args, whatever share_encoder_decoder_emb and dim_token "
            "say, so no reference model was trained with them; give the model args saved with "
            "the checkpoint")


def _check_cross_attention_heads(a: dict) -> None:
    """The reference's cross-attention heads have `dim // cross_attn_nheads` channels each (its
    `wq`, `wk`, `wv` are `nheads * head size` rows by `dim`), so a head count that does not divide
    the local width covers fewer channels than the width; LSTModel's cross-attention splits the
    width evenly: refused, naming the fields."""
    heads = a["cross_attn_nheads"]
    for dim in ("dim_local_encoder", "dim_local_decoder"):
        width = a[dim]
        if isinstance(width, int) and width >= 1 and width % heads:
            raise ReferenceImportError(
                f"reference cross_attn_nheads {heads} does not divide {dim} {width}: its "
                f"cross-attention then has heads of {width} // {heads} = {width // heads} "
                f"channels, {heads * (width // heads)} of the {width}, which LSTModel's (heads "
                f"splitting the width evenly) does not compute; not supported (need a head "
                f"count that divides {width})")


def _check_hash_embeddings(a: dict) -> None:
    """The reference builds `encoder_hash_byte_group_nb_functions` hash n-gram embedding tables
    for each size in `encoder_hash_byte_group_size` and adds them to the token embedding: none
    (and the same function as without) when either is empty. Tables are refused: they have no
    counterpart here."""
    sizes, functions = a["encoder_hash_byte_group_size"], a["encoder_hash_byte_group_nb_functions"]
    if not isinstance(functions, int) or isinstance(functions, bool):
        raise ReferenceImportError(
            f"reference encoder_hash_byte_group_nb_functions={functions!r} is not a number of "
            "hash functions; the reference builds no model from it")
    if sizes and functions > 0:
        raise ReferenceImportError(
            f"reference encoder_hash_byte_group_size={sizes!r} is not supported: with "
            f"encoder_hash_byte_group_nb_functions={functions} it adds hash n-gram embeddings, "
            "which have no counterpart here (need [] or None, or 0 hash functions)")


def _check_patching_mode(a: dict) -> None:
    """The reference builds no model without a `patching_mode` string and a `patch_size` number:
    its local models' args (`LocalModelArgs`, a pydantic model) declare `patching_mode: str` and
    `patch_size: float` with no default, and its `ByteLatentTransformer` passes the model args'
    values, so null (or absent: its model args default both to null) fails validation; such args
    describe no model the reference trained. Its forward prepends `patch_size - 1` BOE tokens to
    every row (and adds them to the first patch) when `patching_mode` is the empty string; no
    model here does that."""
    for key, kind in (("patching_mode", "a string"), ("patch_size", "a number")):
        if a[key] is None:
            raise ReferenceImportError(
                f"reference {key} is null or absent: the reference builds no model without "
                f"{kind} there (its local models' args require one), so no reference model was "
                f"trained with these args; give the model args saved with the checkpoint (e.g. "
                f"patching_mode 'static', patch_size 4)")
    if a["patching_mode"] == "":
        raise ReferenceImportError(
            f"reference patching_mode '' is not supported: the reference then prepends "
            f"patch_size - 1 = {a.get('patch_size')!r} - 1 BOE tokens to every row inside the "
            "model, which LSTModel does not (name the patching mode the model was trained with, "
            "e.g. 'static', or null)")


def _check_decoder_projection(a: dict) -> None:
    """The reference builds the decoder's patch projection (global output -> k slots) only when
    `dim_global != dim_local_decoder`. Without it, its cross-attention reads the P global states
    themselves, which is our projection with the identity matrix when `cross_attn_k` is 1; with
    more slots it masks P*k slots over P states, which it cannot run."""
    dg, dd, k = a["dim_global"], a["dim_local_decoder"], a["cross_attn_k"]
    if isinstance(dg, int) and dg == dd and k != 1:
        raise ReferenceImportError(
            f"reference dim_global {dg!r} == dim_local_decoder {dd!r} with cross_attn_k {k!r}: "
            "the reference then builds no decoder patch projection and its cross-attention masks "
            f"P*{k} slots over the P global states, which it cannot run; equal widths import "
            "only with cross_attn_k 1")


def _check_head_shapes(a: dict) -> None:
    """The reference's `head_dim` (one head size for the global and both local models; null:
    each model's `dim / n_heads`) and `n_kv_heads` (the local models' key/value heads; the global
    model's are `n_kv_heads_global`) must be positive (whole numbers already: see
    `_read_whole_numbers`), and each of its three
    `TransformerBlock`s asserts `dim % n_heads == 0` (even when `head_dim` is given) and
    `n_heads % n_kv_heads == 0`; its RoPE pairs the head's channels, so a head size must be
    even. Arguments breaking these build no reference model: refused, naming the field."""
    for key in ("head_dim", "n_kv_heads", "n_kv_heads_global"):
        # an integer or None here: `_read_whole_numbers` refused any other value (a bool too)
        if a[key] is not None and a[key] < 1:
            raise ReferenceImportError(
                f"reference {key}={a[key]!r} is not a number of units or heads (give a positive "
                "integer, or null for the one derived from the hidden size and heads)")
    models = {"global": ("dim_global", "n_heads_global", "n_kv_heads_global"),
              "local encoder": ("dim_local_encoder", "n_heads_local_encoder", "n_kv_heads"),
              "local decoder": ("dim_local_decoder", "n_heads_local_decoder", "n_kv_heads")}
    for model, (dim, heads, kv_heads) in models.items():
        if not (isinstance(a[dim], int) and isinstance(a[heads], int) and a[heads] >= 1):
            continue  # no sizes to compare: the model's configuration refuses them, named
        if a[dim] % a[heads]:
            raise ReferenceImportError(
                f"reference {dim} {a[dim]!r} is not divisible by {heads} {a[heads]!r}: the "
                f"reference's {model} blocks assert it (whatever head_dim says); fix the model "
                "arguments")
        if a[kv_heads] is not None and a[heads] % a[kv_heads]:
            raise ReferenceImportError(
                f"reference {heads} {a[heads]!r} is not divisible by {kv_heads} "
                f"{a[kv_heads]!r}: the reference's {model} blocks share each key/value head "
                "among a whole group of query heads; fix the model arguments")
        head_dim = a["head_dim"] or a[dim] // a[heads]
        if head_dim % 2:
            raise ReferenceImportError(
                f"reference head size {head_dim} of the {model} model (head_dim "
                f"{a['head_dim']!r}, {dim} {a[dim]!r} / {heads} {a[heads]!r}) is odd: the "
                "reference's RoPE rotates pairs of channels and cannot run it")


def _patch_window(window: int | None) -> int:
    """A reference cross-attention window in patches. None: its mask is `patch id == query
    patch`, i.e. a slot sees its own patch's tokens and a token its own global patch."""
    return 1 if window is None else window


# The reference model marks the global patches that hold this token id (its `EOS_ID` constant),
# whatever its `eos_id` argument, and its global block-causal mask ends documents at `eos_id`.
REFERENCE_EOS_ID = 2


# The reference's attention implementations whose self-attention is plain causal over the whole
# row: no sliding window and no document ends (its "sdpa" path needs LST_SUPPRESS_ATTN_ERROR=1 to
# run at all and then builds a causal mask; "flex_attention" builds a causal block mask).
CAUSAL_ATTN_IMPLS = ("sdpa", "flex_attention")


def reference_attention(model_args: dict) -> tuple[int, DocumentMaskingConfig | None]:
    """`(local window in tokens, document rule)` of the self-attention a reference model ran with,
    which its `attn_impl` decides (its cross-attention is masked by patch windows only, always:
    the document rules keep the cross-attention unreset):

    - "xformers": the local models attend `local_attention_window_len` tokens and stop at
      `eos_id` (-> document masking at `eos_id`); the global model stops at EOS too with
      `attn_bias_type` "block_causal" (then `eos_id` must be `REFERENCE_EOS_ID`) and runs over
      the whole row with "causal" (-> the global attention unreset);
    - `CAUSAL_ATTN_IMPLS`: causal attention over the whole row everywhere. Rows are at most
      `max_encoder_seq_length` tokens (its local RoPE table), so that window is the same function.
    """
    a = {**REFERENCE_DEFAULTS, **model_args}
    impl = a["attn_impl"]
    if impl == "xformers":
        window, bias = a["local_attention_window_len"], a["attn_bias_type"]
        if not isinstance(window, int) or window < 1:
            raise ReferenceImportError(
                f"reference attn_impl 'xformers' needs local_attention_window_len >= 1 (got "
                f"{window!r}): its local attention is a sliding window")
        longest = a["max_encoder_seq_length"]
        if not isinstance(longest, int) or isinstance(longest, bool) or longest < 1:
            raise ReferenceImportError(
                f"reference max_encoder_seq_length={longest!r}: the reference sizes its local "
                "models' RoPE table by it (the longest row they run) and builds them from a "
                "positive integer only; set it to the longest row in tokens the model ran on")
        eos = a["eos_id"]
        if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
            raise ReferenceImportError(
                "reference attn_impl 'xformers' stops its local attention at eos_id (and with "
                f"attn_bias_type 'block_causal' its global one), but the arguments give eos_id "
                f"{eos!r}, no token id")
        if bias in (None, "causal"):
            return window, DocumentMaskingConfig(eos_id=a["eos_id"], reset_cross_attention=False,
                                                 reset_global_attention=False)
        if bias != "block_causal":
            raise ReferenceImportError(
                f"reference attn_bias_type {bias!r} is not one of 'causal' or 'block_causal'")
        if a["eos_id"] != REFERENCE_EOS_ID:
            raise ReferenceImportError(
                f"reference eos_id={a['eos_id']!r} with attn_bias_type 'block_causal': its local "
                "attention stops at eos_id, but its global attention looks for eos_id among "
                f"patches marked with its fixed EOS id {REFERENCE_EOS_ID}, a rule no document "
                f"masking here computes; only eos_id {REFERENCE_EOS_ID} imports")
        return window, DocumentMaskingConfig(eos_id=a["eos_id"], reset_cross_attention=False)
    if impl not in CAUSAL_ATTN_IMPLS:
        raise ReferenceImportError(
            f"reference attn_impl {impl!r} is not one of 'xformers', {', '.join(map(repr, CAUSAL_ATTN_IMPLS))}")
    longest = a["max_encoder_seq_length"]
    if not isinstance(longest, int) or longest < 1:
        raise ReferenceImportError(
            f"reference attn_impl {impl!r} attends over the whole row, whose length "
            f"max_encoder_seq_length bounds, but that is {longest!r}; set it to the longest row in "
            "tokens the model ran on")
    return longest, None


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One of our unsharded tensors and the reference tensors it is made of.

    One reference tensor is copied. Several are stacked by rows: their rows are cut into `groups`
    equal blocks and, for each group in turn, that block of every part in order is emitted. With
    one group this is plain concatenation `[a; b; c]`; the global block's grouped-query QKV uses
    one group per KV head (its query heads, then its key head, then its value head).
    `row_shares` are the parts' relative row counts within a group (equal when empty); `split`
    needs them to cut the stacked tensor back into the parts.
    """

    ours: str
    reference: tuple[str, ...]
    groups: int = 1
    row_shares: tuple[int, ...] = ()

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our tensor from the reference tensors, given in the order of `reference`."""
        if len(parts) == 1:
            return parts[0]
        blocks = [part.unflatten(0, (self.groups, -1)) for part in parts]  # [G, rows/G, ...]
        return torch.cat(blocks, dim=1).flatten(0, 1)

    def split(self, ours: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference tensors, in the order of `reference`, from ours (inverse of `combine`)."""
        if len(self.reference) == 1:
            return (ours,)
        shares = self.row_shares or (1,) * len(self.reference)
        grouped = ours.unflatten(0, (self.groups, -1))  # [G, rows/G, ...]
        unit = grouped.shape[1] // sum(shares)
        parts = grouped.split([share * unit for share in shares], dim=1)
        return tuple(part.flatten(0, 1) for part in parts)


def _transformer_layer(ours: str, ref: str, norms: tuple[str, str], qkv_groups: int = 1,
                       row_shares: tuple[int, int, int] = (1, 1, 1)) -> list[TensorMapping]:
    """A self-attention + SwiGLU layer. `ours`/`ref`: the layer's name prefixes, trailing dot
    included; `norms`: our names of its attention and FFN pre-norms; the fused QKV stacks
    `qkv_groups` groups, each of `row_shares` (query, key, value) heads (one group: plain
    `[wq; wk; wv]`). Head sizes come from the tensors' rows."""
    return [
        TensorMapping(f"{ours}self_attention.linear_qkv.weight",
                      tuple(f"{ref}attention.{w}.weight" for w in ("wq", "wk", "wv")),
                      qkv_groups, row_shares),
        TensorMapping(f"{ours}self_attention.linear_proj.weight", (f"{ref}attention.wo.weight",)),
        TensorMapping(f"{ours}mlp.linear_fc1.weight",
                      (f"{ref}feed_forward.w1.weight", f"{ref}feed_forward.w3.weight")),
        TensorMapping(f"{ours}mlp.linear_fc2.weight", (f"{ref}feed_forward.w2.weight",)),
        TensorMapping(f"{ours}{norms[0]}.weight", (f"{ref}attention_norm.weight",)),
        TensorMapping(f"{ours}{norms[1]}.weight", (f"{ref}ffn_norm.weight",)),
    ]


_GLOBAL_NORMS = ("input_layernorm", "pre_mlp_layernorm")  # megatron's local-spec names


def _global_layer(ours: str, ref: str, g: GlobalModelConfig) -> list[TensorMapping]:
    groups = g.num_query_groups or g.num_heads
    return _transformer_layer(ours, ref, _GLOBAL_NORMS, groups, (g.num_heads // groups, 1, 1))


def _local_layers(ours: str, ref: str, local: LocalModelConfig) -> list[TensorMapping]:
    """A local model's layers: its fused QKV is plain `[wq; wk; wv]`, of `H`, `G` and `G` heads."""
    return [mapping for i in range(local.num_layers) for mapping in
            _transformer_layer(f"{ours}.layers.{i}.", f"{ref}.layers.{i}.", ("input_norm", "pre_mlp_norm"),
                               row_shares=(local.num_heads, local.kv_groups, local.kv_groups))]


def _cross_attention_layers(ours: str, ref: str, count: int) -> list[TensorMapping]:
    mappings = []
    for i in range(count):
        o, r = f"{ours}.cross_attn_layers.{i}", f"{ref}.cross_attn_layers.{i}"
        mappings += [
            TensorMapping(f"{o}.norm_q.weight", (f"{r}.cross_attn_norm_q.weight",)),
            TensorMapping(f"{o}.norm_kv.weight", (f"{r}.cross_attn_norm_kv.weight",)),
            TensorMapping(f"{o}.linear_q.weight", (f"{r}.wq.weight",)),
            TensorMapping(f"{o}.linear_kv.weight", (f"{r}.wk.weight", f"{r}.wv.weight")),
            TensorMapping(f"{o}.linear_proj.weight", (f"{r}.wo.weight",)),
        ]
    return mappings


DECODER_PROJECTION = "local_decoder.patch_projection.weight"


def reference_tensor_map(config: LSTConfig) -> list[TensorMapping]:
    """Every tensor of an unsharded `LSTModel` (TP=1, PP=1, local spec) with the reference tensors
    it is made of, in the reference's module order. Import combines, export splits."""
    xattn, g = config.cross_attention, config.global_model
    mappings = [TensorMapping("token_encoder.embedding.weight", ("local_encoder.tok_embeddings.weight",))]
    mappings += _local_layers("token_encoder", "local_encoder", config.encoder)
    mappings.append(TensorMapping("patch_encoder.patch_projection.weight",
                                  ("local_encoder.patch_embedding_projection.weight",)))
    mappings += _cross_attention_layers("patch_encoder", "local_encoder",
                                        config.encoder.num_layers if xattn.all_encoder_layers else 1)
    if config.patch_width != g.hidden_size:
        mappings.append(TensorMapping("global_input_projection.weight",
                                      ("global_transformer.token_embedding_projection.weight",)))
    for i in range(g.num_layers):
        mappings += _global_layer(f"global_transformer.block.layers.{i}.", f"global_transformer.layers.{i}.", g)
    if _reference_has_decoder_projection(config):
        mappings.append(TensorMapping(DECODER_PROJECTION,
                                      ("local_decoder.patch_embedding_projection.weight",)))
    mappings += _cross_attention_layers("local_decoder", "local_decoder",
                                        config.decoder.num_layers if xattn.all_decoder_layers else 1)
    mappings += _local_layers("local_decoder", "local_decoder", config.decoder)
    mappings += [
        TensorMapping("local_decoder.final_norm.weight", ("local_decoder.norm.weight",)),
        TensorMapping("output_layer.weight", ("local_decoder.output.weight",)),
    ]
    return mappings


def _reference_has_decoder_projection(config: LSTConfig) -> bool:
    """Whether the reference stores the decoder's patch projection (`_check_decoder_projection`):
    it builds one only when `dim_global != dim_local_decoder`, and runs without one only with one
    slot per patch, where ours is the identity."""
    g, dec, k = config.global_model, config.decoder, config.cross_attention.slots_per_patch
    if g.hidden_size != dec.hidden_size:
        return True
    if k != 1:
        raise ReferenceImportError(
            f"a model with global hidden_size {g.hidden_size} == decoder hidden_size "
            f"{dec.hidden_size} and {k} slots per patch has no reference checkpoint: the reference "
            "builds no decoder patch projection for equal widths and then runs only with "
            "cross_attn_k 1")
    return False


def reference_identity_tensors(config: LSTConfig) -> dict[str, int]:
    """Our tensors the reference does not store because it applies no layer there, with the size
    of the identity matrix that computes the same: `{DECODER_PROJECTION: Dg}` when the reference
    has no decoder patch projection, else empty."""
    if _reference_has_decoder_projection(config):
        return {}
    return {DECODER_PROJECTION: config.global_model.hidden_size}


# Reference names of one global layer's tensors, relative to `global_transformer.layers.{i}.`.
GLOBAL_LAYER_TENSORS = tuple(
    name for mapping in _transformer_layer("", "", _GLOBAL_NORMS) for name in mapping.reference
)


def global_layer_to_megatron(layer: dict[str, torch.Tensor], g: GlobalModelConfig) -> dict[str, torch.Tensor]:
    """One reference global layer (keys `GLOBAL_LAYER_TENSORS`) -> megatron layer tensors (keys
    relative to `layers.{i}.`, local-spec names, unsharded)."""
    return {mapping.ours: mapping.combine([layer[name] for name in mapping.reference])
            for mapping in _global_layer("", "", g)}


def canonical_state_dict(reference: dict[str, torch.Tensor], config: LSTConfig) -> dict[str, torch.Tensor]:
    """Reference state dict -> unsharded `LSTModel` names and layouts (`reference_tensor_map`)."""
    mappings = reference_tensor_map(config)
    _check_reference_names(reference, {name for m in mappings for name in m.reference})
    ref = dict(reference)
    out: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        parts = [ref.pop(name) for name in mapping.reference]
        try:
            out[mapping.ours] = mapping.combine(parts)
        except RuntimeError:
            shapes = {name: tuple(part.shape) for name, part in zip(mapping.reference, parts,
                                                                     strict=True)}
            raise ReferenceImportError(
                f"reference tensors {shapes} do not combine into {mapping.ours!r}: their shapes "
                "do not fit the model args") from None
    dtype = reference["local_decoder.output.weight"].dtype
    for name, size in reference_identity_tensors(config).items():
        out[name] = torch.eye(size, dtype=dtype)
    return out


# Reference modules the import does not support, by name prefix, with the args field that builds them.
_UNSUPPORTED_REFERENCE_MODULES = {"encoder_hash_tok_embedding.": "encoder_hash_byte_group_size",
                                  "encoder_ngram_embedding.": "encoder_ngram_to_size_str"}


def _check_reference_names(reference: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Refuse a reference state dict whose tensor names are not those the model args give, naming
    the missing and the unmapped ones (up to 5 of each) and the count of each."""
    missing = sorted(expected - set(reference))
    unmapped = sorted(set(reference) - expected)
    if not missing and not unmapped:
        return

    def some(names: list[str]) -> str:
        return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

    parts = []
    if missing:
        parts.append(f"reference checkpoint has no tensor {missing[0]!r} ({len(missing)} the model "
                     f"args describe are missing: {some(missing)})")
    if unmapped:
        parts.append(f"reference tensors left unmapped ({len(unmapped)} the model args do not "
                     f"describe): {some(unmapped)}")
    modules = sorted({field for name in unmapped
                      for prefix, field in _UNSUPPORTED_REFERENCE_MODULES.items()
                      if name.startswith(prefix)})
    advice = (f"the checkpoint holds modules built by {modules}, which this import does not "
              "support" if modules else
              "the checkpoint and the model args are of different models: pass the params.json "
              "saved with this checkpoint")
    raise ReferenceImportError(f"{'; '.join(parts)}; {advice}")


_GLOBAL_LAYER = re.compile(r"^global_transformer\.block\.layers\.(\d+)\.(.*)$")
# Transformer Engine fuses the pre-norms into the following linear.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
PARTITIONS = ("rows", "columns", "gated_rows", "replicated")


def canonical_name(model, key: str) -> tuple[str, str]:
    """`(canonical name, how it is split across tensor-parallel ranks)` of a model state-dict key.

    Global layers are renumbered from this stage's local index to the global one; the split is one
    of `PARTITIONS`: "rows" (vocab-parallel embedding/head, column-parallel qkv, whose row blocks
    are whole KV groups), "columns" (row-parallel projections), "gated_rows" (fc1: each half
    `[W1; W3]` split by rows) or "replicated" (norms, the local modules).
    """
    name, suffix = key, None
    match = _GLOBAL_LAYER.match(key)
    if match:
        layer = model.global_transformer.block.layers[int(match.group(1))].layer_number - 1
        suffix = _TE_NORMS.get(match.group(2), match.group(2))
        name = f"global_transformer.block.layers.{layer}.{suffix}"
    if name in ("token_encoder.embedding.weight", "output_layer.weight") or (
        suffix == "self_attention.linear_qkv.weight"
    ):
        return name, "rows"
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return name, "columns"
    if suffix == "mlp.linear_fc1.weight":
        return name, "gated_rows"
    return name, "replicated"


def shard_tensor(full: torch.Tensor, partition: str, rank: int, world_size: int) -> torch.Tensor:
    """This tensor-parallel rank's piece of an unsharded tensor."""
    if partition == "rows":
        return full.chunk(world_size, dim=0)[rank]
    if partition == "columns":
        return full.chunk(world_size, dim=1)[rank]
    if partition == "gated_rows":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(world_size)[rank], up.chunk(world_size)[rank]])
    return full


def gather_tensor(shard: torch.Tensor, partition: str) -> torch.Tensor:
    """Collective over the tensor-parallel group: the unsharded tensor (inverse of `shard_tensor`)."""
    from megatron.core import parallel_state

    world_size = parallel_state.get_tensor_model_parallel_world_size()
    if partition == "replicated" or world_size == 1:
        return shard
    shards = [torch.empty_like(shard) for _ in range(world_size)]
    torch.distributed.all_gather(
        shards, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    if partition == "rows":
        return torch.cat(shards, dim=0)
    if partition == "columns":
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


def shard_for_model(canonical: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """This rank's state dict for `model` (an `LSTModel`) from unsharded canonical tensors."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    sharded = {}
    for key, target in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        name, partition = canonical_name(model, key)
        if name not in canonical:
            raise ReferenceImportError(f"no canonical tensor for model parameter {key!r}")
        shard = shard_tensor(canonical[name], partition, tp_rank, tp_size)
        if shard.shape != target.shape:
            raise ReferenceImportError(
                f"{key}: reference gives {tuple(shard.shape)}, model expects {tuple(target.shape)}; "
                "is the model built from lst_config_from_reference(...)?"
            )
        sharded[key] = shard.to(dtype=target.dtype, device=target.device)
    return sharded


def gather_canonical(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective over the tensor-parallel group: unsharded canonical tensors from per-rank ones
    keyed like `model.state_dict()` (weights, or gradients of the same shapes)."""
    return {
        name: gather_tensor(tensor, partition)
        for name, partition, tensor in (
            (*canonical_name(model, key), tensor) for key, tensor in sorted(tensors.items())
        )
    }


def load_reference_state_dict(model, reference: dict[str, torch.Tensor]) -> None:
    """Load a reference state dict into `model` (any TP rank / pipeline stage), strictly."""
    sharded = shard_for_model(canonical_state_dict(reference, model.lst_config), model)
    missing, unexpected = model.load_state_dict(sharded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ReferenceImportError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def load_reference_checkpoint(model, path: str | Path) -> None:
    """Load a reference `.safetensors` state dict file into `model`."""
    from safetensors.torch import load_file

    load_reference_state_dict(model, load_file(str(path)))
