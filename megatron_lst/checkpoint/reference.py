"""The reference implementation's checkpoints (`neillu23/lst`, a BLT fork) <-> full state dicts.

Import reads the reference's consolidated state dict and model arguments and maps them with
`megatron_lst.models.reference_config` (the args) and `megatron_lst.models.reference_tensors`
(the tensors). Export is its exact inverse: each entry of the same table,
`reference_tensor_map`, split back into the reference tensors it was combined from (names and
layouts are documented there).

RoPE needs no weight permutation: both sides rotate interleaved pairs. Every tensor is
accounted for: a reference tensor the import does not map, or a model tensor the export does
not, is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_lst.data.input_files import read_bounded_bytes
from megatron_lst.models.config import DocumentMaskingConfig, LSTConfig, swiglu_ffn_size
from megatron_lst.models.reference_config import (
    CAUSAL_ATTN_IMPLS,
    REFERENCE_EOS_ID,
    ReferenceImportError,
    lst_config_from_reference,
    require_reference_value,
)
from megatron_lst.models.reference_fields import (
    REFERENCE_FIELDS_ITS_MODEL_IGNORES,
    REQUIRED_REFERENCE_OPTIONS,
)
from megatron_lst.models.reference_tensors import (
    canonical_state_dict,
    reference_identity_tensors,
    reference_tensor_map,
)

from .reference_yaml import load_reference_yaml

# The reference options `lst_config_from_reference` requires, and the reference's defaults for
# the fields its model ignores, for exports without base args.
FIXED_REFERENCE_ARGS = {**REQUIRED_REFERENCE_OPTIONS, **REFERENCE_FIELDS_ITS_MODEL_IGNORES,
                        "encoder_hash_byte_group_size": [],
                        "ffn_dim_multiplier": 1.0, "head_dim": None, "n_kv_heads": None}
_MULTIPLE_OF_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def _read_reference_document(path: str | Path, what: str) -> Any:
    """The JSON (BLT's `params.json`, the fixtures' `config_A.json`) or YAML (the reference's
    training config, e.g. its `lst/configs/*.yaml`; by the `.yaml`/`.yml` suffix) in `path`.
    Only a regular file of no more than `MAX_SMALL_FILE_BYTES` is read (`read_bounded_bytes`): a
    FIFO blocked the import forever, a file of many GB was read whole."""
    path = Path(path)
    data = read_bounded_bytes(path, ReferenceImportError, f"reference {what} file")
    try:
        text = data.decode("utf-8")
        if _is_yaml(path):
            return load_reference_yaml(text)
        return json.loads(text)
    # ValueError: JSON and UTF-8 decoding; RecursionError: nested deeper than the parsers recurse
    except (ValueError, yaml.YAMLError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ReferenceImportError(f"cannot read reference {what} {path}: {reason}") from None


def _is_yaml(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


# The reference's `data.seq_len` where a training config leaves it out (its `DataloaderArgs`).
REFERENCE_DATA_SEQ_LEN = 2048


def _launched_model_args(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The model args a reference run launched with the training YAML `config` (in `path`) ran
    with: its train.py (`validate_train_args`) sets `model.max_seqlen`, the global model's RoPE
    table in patches, to `data.seq_len` (default `REFERENCE_DATA_SEQ_LEN`) before it builds the
    model, and saves that in params.json, whatever the YAML's model section says (the same
    value in the config.yaml it dumps). Refuses a `data.seq_len` that is no positive integer."""
    data = config.get("data")
    seq_len = data.get("seq_len", REFERENCE_DATA_SEQ_LEN) if isinstance(data, dict) \
        else REFERENCE_DATA_SEQ_LEN
    if type(seq_len) is not int or seq_len < 1:
        raise ReferenceImportError(
            f"{path}: data.seq_len={seq_len!r} is not a positive integer; the reference's "
            "training sets the model's max_seqlen to it, so it ran no model from this config "
            "(give the sequence length the run trained with)")
    return {**config["model"], "max_seqlen": seq_len}


def read_reference_model_args(path: str | Path) -> dict[str, Any]:
    """The reference's model arguments from a JSON or YAML file: its `model_args` (the fixtures'
    `config_A.json`), its `model` (BLT's `params.json`, or the training YAML it was launched
    with, its `max_seqlen` the run's as `_launched_model_args` gives it), or the arguments
    themselves."""
    data = _read_reference_document(path, "model args")
    if not isinstance(data, dict):
        raise ReferenceImportError(
            f"{path} holds a {type(data).__name__}, not the reference's model arguments")
    if data.get("train_entropy_model") is True:
        raise ReferenceImportError(
            f"{path} is the config of a reference run that trained its entropy model "
            "(train_entropy_model: true), a plain transformer that scores bytes for entropy "
            "patching, not an LST model; import the checkpoint of an LST run")
    if isinstance(data.get("model_args"), dict):
        return data["model_args"]
    if isinstance(data.get("model"), dict):
        return _launched_model_args(data, path) if _is_yaml(path) else data["model"]
    if "dim_global" not in data:
        raise ReferenceImportError(
            f"{path} has no 'model_args' or 'model' section and is not model arguments itself "
            "(no 'dim_global')")
    return data


def read_reference_patcher_args(path: str | Path) -> dict[str, Any] | None:
    """The patcher the reference run's data used (`data.patcher_args` of BLT's params.json or of
    its training YAML), or None when the file does not hold it (e.g. model args alone). Call after
    `read_reference_model_args` has read the file. Refuses a patcher the reference cannot build
    or whose patches no patching here gives (`_check_reference_patcher`)."""
    patcher_args = _reference_data_entry(path, "patcher_args")
    if patcher_args is not None:
        _check_reference_patcher(patcher_args, path)
    return patcher_args


def read_reference_tokenizer_args(path: str | Path) -> dict[str, Any] | None:
    """The tokenizer the reference run's data used (`data.tokenizer_args` of its params.json or
    training YAML: `{"name": ..., "init_kwargs": {...}}`), or None when the file does not hold
    it. Call after `read_reference_model_args` has read the file."""
    return _reference_data_entry(path, "tokenizer_args")


# The reference's LST patchers (its data's `patcher_args.patching_mode`) -> ours as evaluated:
# its curriculum ends static (`evaluation.scoring.inference_patcher` scores ours so too).
# "lst_static" makes patches of at most `patch_size` units, the aligned ones ("lst_align", and
# "lst_curriculum" in its aligned steps) one patch of a word's units, however many.
REFERENCE_LST_PATCHERS = {"lst_static": "static", "lst_curriculum": "static", "lst_align": "aligned"}
# Every value of its `PatcherArgs.patching_mode` (its `PatchingModeEnum`); its loader refuses others.
REFERENCE_PATCHING_MODES = ("entropy", "bpe", "bpe_patcher", "space", "static", "byte",
                            *REFERENCE_LST_PATCHERS)
# Its `PatcherArgs.patch_size` when the args leave it out.
REFERENCE_PATCHER_PATCH_SIZE = 4.5


def _check_reference_patcher(patcher_args: dict[str, Any], path: str | Path) -> None:
    """Refuse, naming the field, a data patcher the reference cannot build or whose patches no
    patching here gives (the import would patch by the model args instead, or uncut):

    - a `patching_mode` the reference does not have (`REFERENCE_PATCHING_MODES`; a misspelt
      "lst_statc"), which its loader refuses;
    - a `patch_size` (left out: 4.5) that is no whole number of units under "lst_static" and
      "lst_curriculum": the former asserts a whole one, the latter's static steps then make one
      patch of a whole run of units;
    - a `max_patch_length`, which cuts every longer patch after the LST patcher drew them, where
      it cuts any: any value but null under the aligned ones, one below `patch_size` under
      "lst_static". No `--patching-mode` here cuts patches."""
    mode = patcher_args.get("patching_mode", "entropy")
    require_reference_value(mode, REFERENCE_PATCHING_MODES, f"{path}: data.patcher_args patching_mode")
    if mode not in REFERENCE_LST_PATCHERS:
        return
    size = patcher_args.get("patch_size", REFERENCE_PATCHER_PATCH_SIZE)
    whole = isinstance(size, int | float) and not isinstance(size, bool) \
        and float(size).is_integer() and size >= 1
    if mode != "lst_align" and not whole:
        raise ReferenceImportError(
            f"{path}: data.patcher_args patching_mode {mode!r} with patch_size {size!r}"
            f"{' (the reference default, left out)' if 'patch_size' not in patcher_args else ''}:"
            " the reference patches speech in whole patch sizes only (its lst_static asserts "
            "one); give the patch_size the run's data was patched with")
    limit = patcher_args.get("max_patch_length")
    if limit is None or (mode == "lst_static" and isinstance(limit, int | float)
                         and not isinstance(limit, bool) and limit >= size):
        return
    raise ReferenceImportError(
        f"{path}: data.patcher_args max_patch_length={limit!r} with patching_mode {mode!r}"
        f"{f' and patch_size {size!r}' if mode == 'lst_static' else ''}: the reference's "
        "patcher cuts every longer patch into patches of at most that many units, which no "
        "--patching-mode here does, so the model would be evaluated on other patches than it "
        "was trained on; not supported (to import the weights all the same, evaluated on "
        "uncut patches, remove max_patch_length from a copy of the args)")


def _reference_data_entry(path: str | Path, key: str) -> dict[str, Any] | None:
    """`data[key]` of a reference run config when it is a mapping, else None."""
    data = _read_reference_document(path, "model args")
    section = data.get("data") if isinstance(data, dict) else None
    entry = section.get(key) if isinstance(section, dict) else None
    return entry if isinstance(entry, dict) else None


def import_reference(
    reference: dict[str, torch.Tensor], model_args: dict[str, Any]
) -> tuple[LSTConfig, dict[str, torch.Tensor]]:
    """`(LSTConfig, full state dict)` of a reference checkpoint."""
    config = lst_config_from_reference(model_args)
    return config, canonical_state_dict(reference, config)


def check_reference_shapes(reference: dict[str, torch.Tensor], config: LSTConfig,
                           model_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, naming it, a reference tensor whose shape is not the one the model args give:
    `model_shapes` (our full state dict's name -> shape for `config`) split back into the
    reference's tensors (`reference_tensor_map`). Tensors the args do not describe are left to
    the import, which names them."""
    for mapping in reference_tensor_map(config):
        wanted = _split_shapes(mapping, model_shapes[mapping.ours])
        for name, want in zip(mapping.reference, wanted, strict=True):
            if name in reference and tuple(reference[name].shape) != tuple(want.shape):
                raise ReferenceImportError(
                    f"reference tensor {name!r} has shape {tuple(reference[name].shape)}, but the "
                    f"model args give {tuple(want.shape)}: the checkpoint and the args are of "
                    "different models; pass the params.json saved with this checkpoint")


def _split_shapes(mapping, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """`mapping.split` of a tensor of `shape` (on the meta device: no data), refused where the
    model args make that impossible: a width beyond any tensor's (1e30, an overflow in torch), or
    a count of heads torch takes for no number (true)."""
    try:
        return mapping.split(torch.empty(shape, device="meta"))
    except (RuntimeError, TypeError, OverflowError) as error:
        reason = str(error).splitlines()[0]
        raise ReferenceImportError(
            f"the model args give tensor {mapping.ours!r} the shape {shape}, which cannot be "
            f"split into the reference's {list(mapping.reference)} ({reason}); the args are "
            "damaged: pass the params.json saved with this checkpoint") from None


def export_reference(state: dict[str, torch.Tensor], config: LSTConfig) -> dict[str, torch.Tensor]:
    """A full state dict -> the reference's state dict (inverse of `import_reference`)."""
    ours = dict(state)
    out: dict[str, torch.Tensor] = {}
    for mapping in reference_tensor_map(config):
        if mapping.ours not in ours:
            raise ReferenceImportError(f"state dict has no tensor {mapping.ours!r} to export")
        for name, tensor in zip(mapping.reference, mapping.split(ours.pop(mapping.ours)), strict=True):
            out[name] = tensor.contiguous()
    for name, size in reference_identity_tensors(config).items():
        if name not in ours:
            raise ReferenceImportError(f"state dict has no tensor {name!r} to export")
        tensor = ours.pop(name)
        if not torch.equal(tensor, torch.eye(size, dtype=tensor.dtype, device=tensor.device)):
            raise ReferenceImportError(
                f"tensor {name!r} is not the identity matrix, but the reference has no such "
                f"layer for this model (global hidden_size {size} equal to the decoder's, one slot "
                "per patch): a model whose decoder projection was trained has no reference "
                "checkpoint")
    if ours:
        raise ReferenceImportError(
            f"tensors with no place in the reference checkpoint: {sorted(ours)}")
    return out


def reference_model_args(config: LSTConfig, base_args: dict[str, Any] | None = None,
                         max_tokens: int | None = None,
                         patch_size: int | None = None) -> dict[str, Any]:
    """The reference's model arguments for `config`.

    `base_args` (the arguments an imported checkpoint came with) keeps the reference options
    this package does not model (data, tokenizer, init, ...); the architecture fields are
    overwritten from `config`. `max_tokens`: the longest row in tokens the model trained on
    (`--max-tokens`), for the reference's `max_encoder_seq_length` where `base_args` has none.
    `patching_mode` and `patch_size`, which the reference's local models require (its
    `LocalModelArgs` refuses null there, so it loads no model without them; its forward reads
    the mode only to test for ""), are the base's, else "static" with `patch_size` (the run's
    `--patch-size`; None: 4).
    Raises when `config` is not expressible in the reference's args (e.g. different encoder and
    decoder windows, or FFN widths the reference's rule does not produce).
    """
    g, enc, dec, xattn = config.global_model, config.encoder, config.decoder, config.cross_attention
    if enc.window != dec.window:
        raise ReferenceImportError(
            f"the reference has one local window; this model has encoder {enc.window} and "
            f"decoder {dec.window}")
    for name, model in (("global", g), ("local encoder", enc), ("local decoder", dec)):
        if model.hidden_size % model.num_heads:
            raise ReferenceImportError(
                f"the {name} model's hidden_size {model.hidden_size} is not divisible by its "
                f"{model.num_heads} heads: the reference's blocks assert dim % n_heads == 0 even "
                "with a head_dim, so no reference arguments describe this model")
    args = dict(base_args or {})
    for key, value in FIXED_REFERENCE_ARGS.items():
        args.setdefault(key, value)
    args.update(
        vocab_size=config.vocab_size,
        dim_global=g.hidden_size, n_layers_global=g.num_layers, n_heads_global=g.num_heads,
        # None and a count equal to the heads both mean one key/value head per query head: keep
        # the base's spelling when it says the same.
        n_kv_heads_global=(args.get("n_kv_heads_global")
                           if (args.get("n_kv_heads_global") or g.num_heads)
                           == (g.num_query_groups or g.num_heads) else g.num_query_groups),
        head_dim=_shared_reference_size(
            "head_dim", args.get("head_dim"),
            {"global": (g.head_dim, g.hidden_size // g.num_heads, g.kv_channels),
             "local encoder": (enc.head_dim, enc.hidden_size // enc.num_heads, enc.kv_channels),
             "local decoder": (dec.head_dim, dec.hidden_size // dec.num_heads, dec.kv_channels)}),
        n_kv_heads=_shared_reference_size(
            "n_kv_heads", args.get("n_kv_heads"),
            {"local encoder": (enc.kv_groups, enc.num_heads, enc.num_query_groups),
             "local decoder": (dec.kv_groups, dec.num_heads, dec.num_query_groups)}),
        dim_token=enc.hidden_size,
        dim_local_encoder=enc.hidden_size, n_layers_local_encoder=enc.num_layers,
        n_heads_local_encoder=enc.num_heads,
        dim_local_decoder=dec.hidden_size, n_layers_local_decoder=dec.num_layers,
        n_heads_local_decoder=dec.num_heads,
        cross_attn_k=xattn.slots_per_patch, cross_attn_nheads=xattn.num_heads,
        cross_attn_window_encoder=xattn.encoder_window,
        cross_attn_window_decoder=xattn.decoder_window,
        cross_attn_all_layers_encoder=xattn.all_encoder_layers,
        cross_attn_all_layers_decoder=xattn.all_decoder_layers,
        downsampling_by_pooling={"max": "max", "mean": "avg", "min": "min"}[xattn.pooling],
        norm_eps=config.norm_eps, rope_theta=config.rope_theta,
    )
    args["max_seqlen"] = config.max_sequence_length  # the global RoPE table, in patches
    for key, value in (("patching_mode", "static"), ("patch_size", float(patch_size or 4))):
        if args.get(key) is None:
            args[key] = value
    multiple_of, multiplier = _ffn_rule(config, args.get("multiple_of"), args["ffn_dim_multiplier"])
    args["multiple_of"] = multiple_of
    if multiplier != (1.0 if args["ffn_dim_multiplier"] is None else args["ffn_dim_multiplier"]):
        args["ffn_dim_multiplier"] = multiplier  # else the base's spelling (None is 1.0) stays
    _set_attention_rule(args, config, max_tokens)
    reimported = lst_config_from_reference(args)
    # The reference has no field for the init std; it does not change the function.
    reimported = dataclasses.replace(reimported, init_std=config.init_std)
    if _approximates(reimported.documents, config.documents):
        reimported = dataclasses.replace(reimported, documents=config.documents)
    if reimported != config:
        raise ReferenceImportError(
            "this model cannot be written as reference arguments, which have no counterpart of "
            f"its {'; '.join(_differences(reimported, config))}: keep the checkpoint in this "
            "package's formats")
    return args


def _differences(written: Any, model: Any, prefix: str = "") -> list[str]:
    """Each field, dotted (`cross_attention.double_residual`), where the config `written` (of the
    reference arguments written for a model) differs from the model's config `model`: its value
    in the model, and in the arguments."""
    found = []
    for field in dataclasses.fields(model):
        theirs, ours = getattr(written, field.name), getattr(model, field.name)
        if theirs == ours:
            continue
        if dataclasses.is_dataclass(ours) and type(theirs) is type(ours):
            found += _differences(theirs, ours, f"{prefix}{field.name}.")
        else:
            found.append(f"{prefix}{field.name} {ours!r} (the arguments give {theirs!r})")
    return found


def _shared_reference_size(field: str, kept: Any, models: dict[str, tuple[int, int, int | None]]) -> Any:
    """The value of a reference size field that several of its models share (`head_dim`: the
    global and both local models; `n_kv_heads`: both local models), each of which reads it as
    `value or derived`. `models`: name -> (the model's size, the size derived without the field,
    the size the model spells out or None). The kept (base args') spelling when it gives every
    size; else null when no model spells one out; else the one size they all have. Models of
    different spelt-out sizes have no reference arguments: refused, naming the sizes."""
    if all((kept or derived) == size for size, derived, _ in models.values()):
        return kept
    if all(explicit is None for _, _, explicit in models.values()):
        return None
    sizes = {size for size, _, _ in models.values()}
    if len(sizes) == 1:
        return sizes.pop()
    described = ", ".join(f"{name} {size}" for name, (size, _, _) in models.items())
    raise ReferenceImportError(
        f"the reference has one {field} for the {' and '.join(models)} models; this model's "
        f"differ ({described}), so no reference arguments describe it (give them the same size, "
        "or keep the checkpoint in this package's formats)")


def _approximates(reference: DocumentMaskingConfig | None,
                  ours: DocumentMaskingConfig | None) -> bool:
    """Whether the reference's document rule `reference` (of the args written for a model) is the
    one `_set_attention_rule` writes for our rule `ours` where the reference has no exact
    counterpart: the same function on rows of one document, another on packed rows."""
    if reference is None or reference.reset_cross_attention:
        return False
    if ours is None:  # xformers "causal": its local attention stops at EOS all the same
        return not reference.reset_global_attention
    return ours.reset_cross_attention and reference == dataclasses.replace(
        ours, reset_cross_attention=False)


def _set_attention_rule(args: dict[str, Any], config: LSTConfig, max_tokens: int | None) -> None:
    """Write the model's self-attention rule in the reference's terms (the inverse of
    `reference_attention`), with `max_encoder_seq_length` (the longest row the reference can run,
    in tokens) from the base args, else `max_tokens`, else the local window:

    - document masking: `attn_impl` "xformers" with the block-causal bias at `eos_id` (the
      global attention unreset: the "causal" bias). The reference's cross-attention never stops
      at documents: a model whose does differs from it on packed rows (`_approximates`);
    - no document rule, no row longer than the window: the reference's causal `attn_impl`
      ("sdpa", or the base's "flex_attention"), the same function on every row it can run;
    - no document rule, longer rows: "xformers" with the "causal" bias: the same function on
      rows of one document (the reference's local attention also stops at EOS on packed rows).
    """
    window, documents = config.encoder.window, config.documents
    kept = args.get("max_encoder_seq_length")
    if kept is not None and (not isinstance(kept, int | float) or isinstance(kept, bool)
                             or not float(kept).is_integer() or kept < 0):
        raise ReferenceImportError(
            f"the reference model args kept with the checkpoint give max_encoder_seq_length "
            f"{kept!r}; it must be a whole number of tokens (or null)")
    longest = int(kept or 0) or max_tokens or window
    if documents is not None:
        if documents.reset_position_ids or not documents.reset_attention_mask:
            raise ReferenceImportError(
                "the reference restarts no RoPE positions per document and masks documents "
                f"whenever it knows them; this model's rule ({documents}) has no reference "
                "counterpart")
        if not documents.reset_global_attention:
            args.update(attn_impl="xformers", attn_bias_type="causal", eos_id=documents.eos_id,
                        local_attention_window_len=window, max_encoder_seq_length=longest)
            return
        if documents.eos_id != REFERENCE_EOS_ID:
            raise ReferenceImportError(
                f"this model ends documents at its vocabulary's EOS id {documents.eos_id}; the "
                f"reference's block-causal global attention ends them at its fixed EOS id "
                f"{REFERENCE_EOS_ID}, so no reference arguments describe it: keep the checkpoint "
                "in this package's formats (or train with a tokenizer whose EOS id is "
                f"{REFERENCE_EOS_ID}, or with --no-reset-attention-mask)")
        args.update(attn_impl="xformers", attn_bias_type="block_causal", eos_id=documents.eos_id,
                    local_attention_window_len=window, max_encoder_seq_length=longest)
    elif window >= longest:
        if args.get("attn_impl") not in CAUSAL_ATTN_IMPLS:
            args["attn_impl"] = "sdpa"
        args.setdefault("local_attention_window_len", window)
        args["max_encoder_seq_length"] = window
    else:
        args.update(attn_impl="xformers", attn_bias_type="causal",
                    local_attention_window_len=window, max_encoder_seq_length=longest)


def _ffn_rule(config: LSTConfig, preferred: int | None,
              preferred_multiplier: float | None) -> tuple[int, float]:
    """`(multiple_of, ffn_dim_multiplier)` with which the reference's rule gives every FFN width of
    `config`: the preferred ones (the base args') where they do, else multiplier 1.0 with the
    first `multiple_of` that does (powers of two from 256 down, then the other divisors of the
    widths), else the shortest decimal multiplier that does. So a model imported with another
    rule keeps its widths when the checkpoint no longer carries the reference's args (e.g. after
    a training checkpoint)."""
    multiplier = 1.0 if preferred_multiplier is None else preferred_multiplier
    if not isinstance(preferred, int | None) or not isinstance(multiplier, int | float) \
            or isinstance(multiplier, bool):
        raise ReferenceImportError(
            f"the reference model args kept with the checkpoint give multiple_of {preferred!r} "
            f"and ffn_dim_multiplier {preferred_multiplier!r}; both must be numbers")
    widths = sorted({(config.global_model.hidden_size, config.global_model.ffn_hidden_size),
                     (config.encoder.hidden_size, config.encoder.ffn_hidden_size),
                     (config.decoder.hidden_size, config.decoder.ffn_hidden_size)})
    # every width is a multiple of multiple_of: the usual powers of two, then the other divisors
    # of the widths' greatest common divisor (e.g. 48)
    common = math.gcd(*(ffn for _, ffn in widths))
    divisors = sorted({d for small in range(1, math.isqrt(common) + 1) if common % small == 0
                       for d in (small, common // small)}, reverse=True)
    candidates = tuple(dict.fromkeys(((preferred,) if preferred else ()) + _MULTIPLE_OF_CANDIDATES
                                     + tuple(divisors)))

    def gives_widths(multiple_of: int, m: float) -> bool:
        return all(swiglu_ffn_size(dim, multiple_of, m) == ffn for dim, ffn in widths)

    for m in dict.fromkeys((multiplier, 1.0)):
        for multiple_of in candidates:
            if gives_widths(multiple_of, m):
                return multiple_of, m
    for multiple_of in candidates:
        # int(m * int(8 * dim / 3)) must fall in (ffn - multiple_of, ffn] for every width
        base = [(int(8 * dim / 3), ffn) for dim, ffn in widths]
        low = max((ffn - multiple_of + 1) / width for width, ffn in base)
        high = min((ffn + 1) / width for width, ffn in base)
        for digits in range(1, 9):
            m = math.ceil(low * 10 ** digits) / 10 ** digits
            if m < high and gives_widths(multiple_of, m):
                return multiple_of, m
    raise ReferenceImportError(
        f"no reference multiple_of and ffn_dim_multiplier give the FFN widths (hidden, ffn) "
        f"{widths}; the reference computes them as multiple_of * ceil(int(ffn_dim_multiplier * "
        "int(8 * hidden / 3)) / multiple_of)")
