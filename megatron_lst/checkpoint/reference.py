"""The reference implementation's checkpoints (`neillu23/lst`, a BLT fork) <-> full state dicts.

Import reads the reference's consolidated state dict and model arguments and maps them with
`megatron_lst.models.reference_import` (names and layouts are documented there). Export is its
exact inverse, tensor by tensor:

- `linear_qkv = [wq; wk; wv]` (local) or megatron's grouped layout (global: per KV group the rows
  of its query heads, then its key head, then its value head) -> `wq`, `wk`, `wv`;
- SwiGLU `linear_fc1 = [w1; w3]` -> `w1`, `w3`; cross-attention `linear_kv = [wk; wv]` -> `wk`, `wv`;
- norms, projections, the embedding and the (untied) output head are renamed only.

RoPE needs no weight permutation: both sides rotate interleaved pairs. Every tensor is
accounted for: a reference tensor the import does not map, or a model tensor the export does
not, is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_lst.models.config import LSTConfig, swiglu_ffn_size
from megatron_lst.models.reference_import import (
    ReferenceImportError,
    canonical_state_dict,
    lst_config_from_reference,
)

# The reference options `lst_config_from_reference` requires, for exports without base args.
_FIXED_REFERENCE_ARGS = {
    "use_rope": True, "cross_attn_encoder": True, "cross_attn_decoder": True,
    "cross_attn_init_by_pooling": True, "use_local_encoder_transformer": True,
    "non_linearity": "swiglu", "norm_type": "rmsnorm", "pre_norm": True,
    "weight_tying": False, "tie_local_encoder_decoder_logits": False,
    "encoder_hash_byte_group_size": [], "head_dim": None, "n_kv_heads": None,
    "ffn_dim_multiplier": 1.0,
}
_MULTIPLE_OF_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def read_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A reference state dict from `.safetensors`, or from a `.pth`/`.pt` holding either the
    state dict itself or BLT's consolidated `{"model": state dict, "optim": ...}`."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError(f"reference checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ReferenceImportError(f"cannot read reference checkpoint {path}: {error}") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ReferenceImportError(
            f"{path} holds neither a state dict nor BLT's consolidated {{'model': state dict}}")
    return loaded


def read_reference_model_args(path: str | Path) -> dict[str, Any]:
    """The reference's model arguments from a JSON file: its `model_args` (the fixtures'
    `config_A.json`), its `model` (BLT's `params.json`), or the arguments themselves."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReferenceImportError(f"cannot read reference model args {path}: {error}") from None
    for key in ("model_args", "model"):
        if isinstance(data.get(key), dict):
            return data[key]
    if "dim_global" not in data:
        raise ReferenceImportError(
            f"{path} has no 'model_args' or 'model' section and is not model arguments itself "
            "(no 'dim_global')")
    return data


def import_reference(
    reference: dict[str, torch.Tensor], model_args: dict[str, Any]
) -> tuple[LSTConfig, dict[str, torch.Tensor]]:
    """`(LSTConfig, full state dict)` of a reference checkpoint."""
    config = lst_config_from_reference(model_args)
    return config, canonical_state_dict(reference, config)


def export_reference(state: dict[str, torch.Tensor], config: LSTConfig) -> dict[str, torch.Tensor]:
    """A full state dict -> the reference's state dict (inverse of `import_reference`)."""
    ours = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in ours:
            raise ReferenceImportError(f"state dict has no tensor {name!r} to export")
        return ours.pop(name)

    def split_rows(name: str, parts: int) -> tuple[torch.Tensor, ...]:
        return take(name).chunk(parts, dim=0)

    def local_layers(src: str, dst: str, count: int) -> None:
        for i in range(count):
            s, d = f"{src}.layers.{i}", f"{dst}.layers.{i}"
            wq, wk, wv = split_rows(f"{s}.self_attention.linear_qkv.weight", 3)
            out.update({f"{d}.attention.wq.weight": wq, f"{d}.attention.wk.weight": wk,
                        f"{d}.attention.wv.weight": wv})
            out[f"{d}.attention.wo.weight"] = take(f"{s}.self_attention.linear_proj.weight")
            w1, w3 = split_rows(f"{s}.mlp.linear_fc1.weight", 2)
            out.update({f"{d}.feed_forward.w1.weight": w1, f"{d}.feed_forward.w3.weight": w3})
            out[f"{d}.feed_forward.w2.weight"] = take(f"{s}.mlp.linear_fc2.weight")
            out[f"{d}.attention_norm.weight"] = take(f"{s}.input_norm.weight")
            out[f"{d}.ffn_norm.weight"] = take(f"{s}.pre_mlp_norm.weight")

    def cross_layers(src: str, dst: str, count: int) -> None:
        for i in range(count):
            s, d = f"{src}.cross_attn_layers.{i}", f"{dst}.cross_attn_layers.{i}"
            out[f"{d}.cross_attn_norm_q.weight"] = take(f"{s}.norm_q.weight")
            out[f"{d}.cross_attn_norm_kv.weight"] = take(f"{s}.norm_kv.weight")
            out[f"{d}.wq.weight"] = take(f"{s}.linear_q.weight")
            out[f"{d}.wk.weight"], out[f"{d}.wv.weight"] = split_rows(f"{s}.linear_kv.weight", 2)
            out[f"{d}.wo.weight"] = take(f"{s}.linear_proj.weight")

    xattn, g = config.cross_attention, config.global_model
    out["local_encoder.tok_embeddings.weight"] = take("token_encoder.embedding.weight")
    local_layers("token_encoder", "local_encoder", config.encoder.num_layers)
    out["local_encoder.patch_embedding_projection.weight"] = take("patch_encoder.patch_projection.weight")
    cross_layers("patch_encoder", "local_encoder",
                 config.encoder.num_layers if xattn.all_encoder_layers else 1)
    if config.patch_width != g.hidden_size:
        out["global_transformer.token_embedding_projection.weight"] = take("global_input_projection.weight")

    head_dim = g.hidden_size // g.num_heads
    groups = g.num_query_groups or g.num_heads
    queries_per_group = g.num_heads // groups
    for i in range(g.num_layers):
        s, d = f"global_transformer.block.layers.{i}", f"global_transformer.layers.{i}"
        qkv = take(f"{s}.self_attention.linear_qkv.weight").view(groups, -1, g.hidden_size)
        wq, wk, wv = qkv.split([queries_per_group * head_dim, head_dim, head_dim], dim=1)
        out[f"{d}.attention.wq.weight"] = wq.reshape(-1, g.hidden_size)  # [H*d, D]
        out[f"{d}.attention.wk.weight"] = wk.reshape(-1, g.hidden_size)  # [G*d, D]
        out[f"{d}.attention.wv.weight"] = wv.reshape(-1, g.hidden_size)
        out[f"{d}.attention.wo.weight"] = take(f"{s}.self_attention.linear_proj.weight")
        w1, w3 = split_rows(f"{s}.mlp.linear_fc1.weight", 2)
        out.update({f"{d}.feed_forward.w1.weight": w1, f"{d}.feed_forward.w3.weight": w3})
        out[f"{d}.feed_forward.w2.weight"] = take(f"{s}.mlp.linear_fc2.weight")
        out[f"{d}.attention_norm.weight"] = take(f"{s}.input_layernorm.weight")
        out[f"{d}.ffn_norm.weight"] = take(f"{s}.pre_mlp_layernorm.weight")

    out["local_decoder.patch_embedding_projection.weight"] = take("local_decoder.patch_projection.weight")
    cross_layers("local_decoder", "local_decoder",
                 config.decoder.num_layers if xattn.all_decoder_layers else 1)
    local_layers("local_decoder", "local_decoder", config.decoder.num_layers)
    out["local_decoder.norm.weight"] = take("local_decoder.final_norm.weight")
    out["local_decoder.output.weight"] = take("output_layer.weight")
    if ours:
        raise ReferenceImportError(
            f"tensors with no place in the reference checkpoint: {sorted(ours)}")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def reference_model_args(config: LSTConfig, base_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference's model arguments for `config`.

    `base_args` (the arguments an imported checkpoint came with) keeps the reference options
    this package does not model (data, tokenizer, init, ...); the architecture fields are
    overwritten from `config`. Raises when `config` is not expressible in the reference's args
    (e.g. different encoder and decoder windows, or FFN widths no `multiple_of` produces).
    """
    g, enc, dec, xattn = config.global_model, config.encoder, config.decoder, config.cross_attention
    if enc.window != dec.window:
        raise ReferenceImportError(
            f"the reference has one local window; this model has encoder {enc.window} and "
            f"decoder {dec.window}")
    args = dict(base_args or {})
    for key, value in _FIXED_REFERENCE_ARGS.items():
        args.setdefault(key, value)
    args.update(
        vocab_size=config.vocab_size,
        dim_global=g.hidden_size, n_layers_global=g.num_layers, n_heads_global=g.num_heads,
        n_kv_heads_global=g.num_query_groups,
        dim_token=enc.hidden_size,
        dim_local_encoder=enc.hidden_size, n_layers_local_encoder=enc.num_layers,
        n_heads_local_encoder=enc.num_heads,
        dim_local_decoder=dec.hidden_size, n_layers_local_decoder=dec.num_layers,
        n_heads_local_decoder=dec.num_heads,
        multiple_of=_multiple_of(config, args.get("multiple_of"), args["ffn_dim_multiplier"] or 1.0),
        local_attention_window_len=enc.window,
        cross_attn_k=xattn.slots_per_patch, cross_attn_nheads=xattn.num_heads,
        cross_attn_window_encoder=xattn.encoder_window,
        cross_attn_window_decoder=xattn.decoder_window,
        cross_attn_all_layers_encoder=xattn.all_encoder_layers,
        cross_attn_all_layers_decoder=xattn.all_decoder_layers,
        downsampling_by_pooling={"max": "max", "mean": "avg"}[xattn.pooling],
        norm_eps=config.norm_eps, rope_theta=config.rope_theta,
    )
    reimported = lst_config_from_reference(args)
    # The reference has no fields for these two; they do not change the function.
    reimported = dataclasses.replace(reimported, max_sequence_length=config.max_sequence_length,
                                     init_std=config.init_std)
    if reimported != config:
        raise ReferenceImportError(
            f"this model cannot be written as reference arguments: they describe {reimported}, "
            f"the model is {config}")
    return args


def _multiple_of(config: LSTConfig, preferred: int | None, multiplier: float) -> int:
    widths = {(config.global_model.hidden_size, config.global_model.ffn_hidden_size),
              (config.encoder.hidden_size, config.encoder.ffn_hidden_size),
              (config.decoder.hidden_size, config.decoder.ffn_hidden_size)}
    for multiple_of in ((preferred,) if preferred else ()) + _MULTIPLE_OF_CANDIDATES:
        if all(swiglu_ffn_size(dim, multiple_of, multiplier) == ffn for dim, ffn in widths):
            return multiple_of
    raise ReferenceImportError(
        f"no reference multiple_of gives the FFN widths (hidden, ffn) {sorted(widths)}; the "
        "reference computes them as multiple_of * ceil(int(ffn_dim_multiplier * int(8 * hidden / "
        f"3)) / multiple_of) (ffn_dim_multiplier {multiplier})")
