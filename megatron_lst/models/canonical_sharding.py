"""Canonical (unsharded, TP=1/PP=1 local-spec) `LSTModel` tensors <-> one rank's state dict.

`canonical_name` names a model state-dict key canonically with its tensor-parallel split;
`shard_for_model` / `gather_canonical` cut canonical tensors into one rank's state dict and
gather them back, whatever its tensor-parallel rank, pipeline stage or global-block spec.
"""

from __future__ import annotations

import re

import torch

from .reference_config import ReferenceImportError

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
