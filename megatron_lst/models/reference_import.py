"""Import the reference implementation's checkpoints (`neillu23/lst`, a BLT fork) into `LSTModel`.

Two steps:
1. `canonical_state_dict`: reference names and layouts -> this package's names for an unsharded
   model (TP=1, PP=1, megatron's local spec), e.g. `wq/wk/wv` -> a fused `linear_qkv`.
2. `shard_for_model`: canonical tensors -> the state dict of one rank's `LSTModel`, whatever its
   tensor-parallel rank, pipeline stage or global-block spec (local or Transformer Engine names).

Layouts (reference -> ours):
- local attention `wq, wk, wv` -> `linear_qkv = [wq; wk; wv]`; `wo` -> `linear_proj`;
- global attention -> megatron's grouped `linear_qkv`: for each KV group g, the rows of its query
  heads, then its key head, then its value head (reference GQA repeats each KV head for
  consecutive query heads, which is megatron's grouping);
- SwiGLU `w1, w3` -> `linear_fc1 = [w1; w3]` (gate first, megatron's `glu` chunk order); `w2` ->
  `linear_fc2`. Under TP each rank holds `[w1_r; w3_r]`, so fc1 is sharded per half;
- cross-attention `wk, wv` -> `linear_kv = [wk; wv]`; `cross_attn_norm_q/kv` -> `norm_q/kv`;
- `attention_norm` / `ffn_norm` -> `input_norm` / `pre_mlp_norm` (local) or megatron's
  `input_layernorm` / `pre_mlp_layernorm`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import (
    CrossAttentionConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    swiglu_ffn_size,
)


class ReferenceImportError(ValueError):
    """A reference checkpoint or config cannot be mapped onto `LSTModel`."""


def lst_config_from_reference(model_args: dict) -> LSTConfig:
    """`LSTConfig` from the reference's `ByteLatentTransformerArgs` (as a dict, e.g. `model_args`
    of a reference config). Raises for reference options this package does not implement."""
    a = model_args
    required = {
        "use_rope": True, "cross_attn_encoder": True, "cross_attn_decoder": True,
        "cross_attn_init_by_pooling": True, "use_local_encoder_transformer": True,
        "non_linearity": "swiglu", "norm_type": "rmsnorm", "pre_norm": True,
        "weight_tying": False, "tie_local_encoder_decoder_logits": False,
    }
    for key, value in required.items():
        if a.get(key, value) != value:
            raise ReferenceImportError(f"reference option {key}={a[key]!r} is not supported (need {value!r})")
    if a.get("encoder_hash_byte_group_size"):
        raise ReferenceImportError("reference hash n-gram embeddings are not supported")
    if a.get("head_dim") is not None or a.get("n_kv_heads") is not None:
        raise ReferenceImportError("reference head_dim / local n_kv_heads overrides are not supported")
    dim_token = a.get("dim_token") or a["dim_local_encoder"]
    if dim_token != a["dim_local_encoder"]:
        raise ReferenceImportError(
            f"reference dim_token {dim_token} != dim_local_encoder {a['dim_local_encoder']}: "
            "token-embedding projections are not supported"
        )
    pooling = {"max": "max", "avg": "mean"}.get(a["downsampling_by_pooling"])
    if pooling is None:
        raise ReferenceImportError(f"reference pooling {a['downsampling_by_pooling']!r} is not supported")

    multiple_of, multiplier = a["multiple_of"], a.get("ffn_dim_multiplier") or 1.0

    def local(dim: int, layers: int, heads: int) -> LocalModelConfig:
        return LocalModelConfig(dim, layers, heads, swiglu_ffn_size(dim, multiple_of, multiplier),
                                window=a["local_attention_window_len"])

    return LSTConfig(
        vocab_size=a["vocab_size"],
        global_model=GlobalModelConfig(
            hidden_size=a["dim_global"], num_layers=a["n_layers_global"],
            num_heads=a["n_heads_global"],
            ffn_hidden_size=swiglu_ffn_size(a["dim_global"], multiple_of, multiplier),
            num_query_groups=a.get("n_kv_heads_global"),
        ),
        encoder=local(a["dim_local_encoder"], a["n_layers_local_encoder"], a["n_heads_local_encoder"]),
        decoder=local(a["dim_local_decoder"], a["n_layers_local_decoder"], a["n_heads_local_decoder"]),
        cross_attention=CrossAttentionConfig(
            slots_per_patch=a["cross_attn_k"], num_heads=a["cross_attn_nheads"],
            encoder_window=a["cross_attn_window_encoder"], decoder_window=a["cross_attn_window_decoder"],
            all_encoder_layers=a["cross_attn_all_layers_encoder"],
            all_decoder_layers=a["cross_attn_all_layers_decoder"],
            pooling=pooling, double_residual=True,
        ),
        norm_eps=a["norm_eps"],
        rope_theta=a["rope_theta"],
    )


GLOBAL_LAYER_TENSORS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
    "attention_norm.weight", "ffn_norm.weight",
)


def global_layer_to_megatron(layer: dict[str, torch.Tensor], g: GlobalModelConfig) -> dict[str, torch.Tensor]:
    """One reference global layer (keys `GLOBAL_LAYER_TENSORS`) -> megatron layer tensors (keys
    relative to `layers.{i}.`, local-spec names, unsharded)."""
    head_dim = g.hidden_size // g.num_heads
    groups = g.num_query_groups or g.num_heads
    wq = layer["attention.wq.weight"].view(groups, -1, g.hidden_size)  # [G, (H/G)*d, D]
    wk = layer["attention.wk.weight"].view(groups, head_dim, g.hidden_size)  # [G, d, D]
    wv = layer["attention.wv.weight"].view(groups, head_dim, g.hidden_size)
    return {
        "self_attention.linear_qkv.weight": torch.cat([wq, wk, wv], dim=1).flatten(0, 1),
        "self_attention.linear_proj.weight": layer["attention.wo.weight"],
        "mlp.linear_fc1.weight": torch.cat(
            [layer["feed_forward.w1.weight"], layer["feed_forward.w3.weight"]]),
        "mlp.linear_fc2.weight": layer["feed_forward.w2.weight"],
        "input_layernorm.weight": layer["attention_norm.weight"],
        "pre_mlp_layernorm.weight": layer["ffn_norm.weight"],
    }


def canonical_state_dict(reference: dict[str, torch.Tensor], config: LSTConfig) -> dict[str, torch.Tensor]:
    """Reference state dict -> unsharded `LSTModel` names and layouts (see module docstring)."""
    ref = dict(reference)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in ref:
            raise ReferenceImportError(f"reference checkpoint has no tensor {name!r}")
        return ref.pop(name)

    def local_layers(src: str, dst: str, count: int) -> None:
        for i in range(count):
            s, d = f"{src}.layers.{i}", f"{dst}.layers.{i}"
            out[f"{d}.self_attention.linear_qkv.weight"] = torch.cat(
                [take(f"{s}.attention.{w}.weight") for w in ("wq", "wk", "wv")])
            out[f"{d}.self_attention.linear_proj.weight"] = take(f"{s}.attention.wo.weight")
            out[f"{d}.mlp.linear_fc1.weight"] = torch.cat(
                [take(f"{s}.feed_forward.w1.weight"), take(f"{s}.feed_forward.w3.weight")])
            out[f"{d}.mlp.linear_fc2.weight"] = take(f"{s}.feed_forward.w2.weight")
            out[f"{d}.input_norm.weight"] = take(f"{s}.attention_norm.weight")
            out[f"{d}.pre_mlp_norm.weight"] = take(f"{s}.ffn_norm.weight")

    def cross_layers(src: str, dst: str, count: int) -> None:
        for i in range(count):
            s, d = f"{src}.cross_attn_layers.{i}", f"{dst}.cross_attn_layers.{i}"
            out[f"{d}.norm_q.weight"] = take(f"{s}.cross_attn_norm_q.weight")
            out[f"{d}.norm_kv.weight"] = take(f"{s}.cross_attn_norm_kv.weight")
            out[f"{d}.linear_q.weight"] = take(f"{s}.wq.weight")
            out[f"{d}.linear_kv.weight"] = torch.cat([take(f"{s}.wk.weight"), take(f"{s}.wv.weight")])
            out[f"{d}.linear_proj.weight"] = take(f"{s}.wo.weight")

    xattn = config.cross_attention
    out["token_encoder.embedding.weight"] = take("local_encoder.tok_embeddings.weight")
    local_layers("local_encoder", "token_encoder", config.encoder.num_layers)
    out["patch_encoder.patch_projection.weight"] = take("local_encoder.patch_embedding_projection.weight")
    cross_layers("local_encoder", "patch_encoder",
                 config.encoder.num_layers if xattn.all_encoder_layers else 1)
    if config.patch_width != config.global_model.hidden_size:
        out["global_input_projection.weight"] = take("global_transformer.token_embedding_projection.weight")

    for i in range(config.global_model.num_layers):
        prefix = f"global_transformer.layers.{i}."
        layer = {name: take(prefix + name) for name in GLOBAL_LAYER_TENSORS}
        for suffix, tensor in global_layer_to_megatron(layer, config.global_model).items():
            out[f"global_transformer.block.layers.{i}.{suffix}"] = tensor

    out["local_decoder.patch_projection.weight"] = take("local_decoder.patch_embedding_projection.weight")
    cross_layers("local_decoder", "local_decoder",
                 config.decoder.num_layers if xattn.all_decoder_layers else 1)
    local_layers("local_decoder", "local_decoder", config.decoder.num_layers)
    out["local_decoder.final_norm.weight"] = take("local_decoder.norm.weight")
    out["output_layer.weight"] = take("local_decoder.output.weight")
    if ref:
        raise ReferenceImportError(f"reference tensors left unmapped: {sorted(ref)}")
    return out


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
