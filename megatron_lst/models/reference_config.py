"""`LSTConfig` from the reference implementation's model args (`neillu23/lst`, a BLT fork).

`lst_config_from_reference` reads them (a field left out takes the reference's default, the
field tables are in `reference_fields`) and refuses options this package does not implement and
arguments the reference itself cannot build a model from; `reference_attention` gives the
attention its `attn_impl` ran with, `row_limit_notice` the longest row it ran.
"""

from __future__ import annotations

import math

from .config import (
    CrossAttentionConfig,
    DocumentMaskingConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    ModelConfigError,
    swiglu_ffn_size,
)
from .reference_fields import (
    REFERENCE_DEFAULTS,
    REFERENCE_INIT_STD_FACTORS,
    REFERENCE_MODEL_FIELDS,
    REQUIRED_REFERENCE_OPTIONS,
)


class ReferenceImportError(ValueError):
    """A reference checkpoint or config cannot be mapped onto `LSTModel`."""


# Why a required option's other value is not an LST model at all (`lst_config_from_reference`).
_NO_LST_MODEL = dict.fromkeys(
    ("cross_attn_encoder", "cross_attn_decoder"),
    ": without the local encoder's and decoder's cross-attention the args describe no LST model "
    "(the reference's apps/main configurations, llama_1B and llama_7B, are plain token "
    "transformers; train the token baseline here with --patching-mode none)")


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


# `CrossAttentionConfig.pooling` -> the names the reference looks for inside its
# `downsampling_by_pooling` string to pool by it (`reference_pooling`).
REFERENCE_POOLING_NAMES = {"mean": ("avg", "mean"), "min": ("min",), "max": ("max",)}


def reference_pooling(value: object) -> str:
    """`CrossAttentionConfig.pooling` of the reference's `downsampling_by_pooling`. The reference
    tests for each name of `REFERENCE_POOLING_NAMES` inside the string (so "max_pool" and
    "maximum" pool by max, "avg" and "mean" by mean) and concatenates the pools of every kind it
    finds; its patch projection takes one pool's width only, so it runs a forward with exactly
    one. Refused naming the field: no string, no kind found (it then takes the concatenating
    downsampling, which fails without patch lengths), or several."""
    found = [pooling for pooling, names in REFERENCE_POOLING_NAMES.items()
             if isinstance(value, str) and any(name in value for name in names)]
    if len(found) != 1:
        kinds = ", ".join(f"{pooling} ({' or '.join(map(repr, names))})"
                          for pooling, names in REFERENCE_POOLING_NAMES.items())
        raise ReferenceImportError(
            f"reference downsampling_by_pooling={value!r} is not supported: the reference pools "
            f"by each kind whose name it finds inside that string, of {kinds}, and runs a "
            f"forward with exactly one; it finds {len(found)} ({', '.join(found) or 'none'}); "
            "give the one the model was trained with, e.g. 'max'")
    return found[0]


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
    _check_model_sizes(a)
    _check_cross_attention_heads(a)
    _check_token_width(a)
    _check_decoder_input_width(a)
    _check_patching_mode(a)
    pooling = reference_pooling(a["downsampling_by_pooling"])
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
                pooling=pooling, double_residual=True,
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
    reads it; another (NaN, 2.5) is refused naming the field. So are a bool and a string, which
    the reference's pydantic args may coerce (`true` to 1 head, "64" to 64) but no params.json it
    writes holds: such args were edited by hand, and a number is asked for rather than guessed."""
    for key in WHOLE_NUMBER_FIELDS:
        value = a[key]
        if isinstance(value, float) and value.is_integer():
            a[key] = int(value)
        elif value is not None and type(value) is not int:  # bool is an int subclass
            raise ReferenceImportError(
                f"reference {key}={value!r} is not a whole number; write the value the "
                "checkpoint was trained with as an integer (e.g. 64, not \"64\" or true)")


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


# The reference's sizes of its three models (`MODEL_SIZE_FIELDS`) and its cross-attention windows
# in patches (`CROSS_ATTENTION_WINDOW_FIELDS`, null: each patch its own).
MODEL_SIZE_FIELDS = (
    "dim_global", "n_layers_global", "n_heads_global", "dim_local_encoder", "dim_local_decoder",
    "n_layers_local_encoder", "n_layers_local_decoder", "n_heads_local_encoder",
    "n_heads_local_decoder")
CROSS_ATTENTION_WINDOW_FIELDS = ("cross_attn_window_encoder", "cross_attn_window_decoder")


def _check_model_sizes(a: dict) -> None:
    """Each model size of `MODEL_SIZE_FIELDS` a positive integer, each cross-attention window null
    or at least one patch (whole numbers or null already: `_read_whole_numbers`); refused naming
    the reference's field, not the `LSTConfig` field it would become."""
    for key in MODEL_SIZE_FIELDS:
        if a[key] is None or a[key] < 1:
            raise ReferenceImportError(
                f"reference {key}={a[key]!r} is not supported: each model here needs a positive "
                "number of units, layers and heads; give the value the checkpoint was trained "
                "with (its params.json)")
    for key in CROSS_ATTENTION_WINDOW_FIELDS:
        if a[key] is not None and a[key] < 1:
            raise ReferenceImportError(
                f"reference {key}={a[key]!r} is not supported: a window of no patches, in which "
                "the reference's cross-attention sees no key, and LSTModel's windows hold at "
                "least one patch; give the window the checkpoint was trained with (null: each "
                "patch its own)")


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
    (and the same function as without) when either is empty. The reference reads a string of
    sizes as its comma-separated integers, empty pieces skipped (so "," is no sizes). Tables are
    refused: they have no counterpart here."""
    given, functions = a["encoder_hash_byte_group_size"], a["encoder_hash_byte_group_nb_functions"]
    sizes = _comma_separated_sizes(given) if isinstance(given, str) else given
    if not isinstance(functions, int) or isinstance(functions, bool):
        raise ReferenceImportError(
            f"reference encoder_hash_byte_group_nb_functions={functions!r} is not a number of "
            "hash functions; the reference builds no model from it")
    if sizes and functions > 0:
        raise ReferenceImportError(
            f"reference encoder_hash_byte_group_size={given!r} is not supported: with "
            f"encoder_hash_byte_group_nb_functions={functions} it adds hash n-gram embeddings, "
            "which have no counterpart here (need [] or None, or 0 hash functions)")


def _comma_separated_sizes(text: str) -> list[int]:
    """The hash n-gram sizes the reference reads from a string `text`: its comma-separated
    pieces as integers, empty pieces skipped. ReferenceImportError for a piece that is no
    integer (the reference's args fail to validate)."""
    pieces = [piece for piece in text.split(",") if piece]
    try:
        return [int(piece) for piece in pieces]
    except ValueError:
        raise ReferenceImportError(
            f"reference encoder_hash_byte_group_size={text!r} is not a comma-separated list of "
            "integers; the reference builds no model from it") from None


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
