"""This rank's model as a checkpoint holds it: the chunks unwrapped, their sharded state under
Megatron-LM's keys, and the parallel layout a checkpoint records."""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def model_keys(model_chunks: list[torch.nn.Module]) -> list[str]:
    # Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... for virtual stages.
    if len(model_chunks) == 1:
        return ["model"]
    return [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if not model_chunks:
        raise ValueError("model_chunks is empty; pass this rank's model chunks")
    return {key: chunk.sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), unwrap(model_chunks), strict=True)}


def parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(with_context_parallel=True),
    }
