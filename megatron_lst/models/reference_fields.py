"""The reference's model-args fields (`ByteLatentTransformerArgs`) and how the import treats each.

Its defaults, every field it declares, the options LSTModel implements with one value only, and
the fields the import reads but does not carry over or that have no effect on the model, each
with why; `fields_not_carried_over` turns those not carried over into notices.
"""

from __future__ import annotations

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
