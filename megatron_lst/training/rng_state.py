"""The random-number generators' state of one rank in a checkpoint: Python's, NumPy's, torch's
CPU and CUDA generators and megatron.core's CUDA RNG tracker (the tensor-parallel dropout streams).

Each rank saves its own, as one cell of a (pipeline, tensor, data) grid; a checkpoint restores
them only under the layout that saved them (`checkpoint_load.load_checkpoint`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_sharded_object():
    """This rank's RNG states as one cell of a (pipeline, tensor, data) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    grid = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size(with_context_parallel=True))
    cell = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", _capture_rng_state(), grid, cell, replica_id=0)


def _capture_rng_state() -> dict[str, Any]:
    """This rank's generator states, NumPy's key array as a tensor (loading reads them with
    torch's `weights_only` unpickler first, see `megatron_lst.checkpoint.safe_pickle`)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this rank's generators to `state`, as `rng_sharded_object` saved it."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
