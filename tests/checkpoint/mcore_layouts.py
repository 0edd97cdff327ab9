"""The dist-checkpoint layout of megatron.core 0.19, written with megatron.core 0.16.

0.16 saves a checkpoint's common (non-sharded) state in `common.pt` and names the "torch" common
backend in metadata.json; 0.19 saves it as the ShardedObject "common_state" (global shape (1,),
replica = rank) through the same torch_dist strategy, writes no common.pt and no common backend
(0.19's `dist_checkpointing.serialization.save`). `mcore_019_save` does the same with 0.16's
functions, so that loading that layout is tested where only 0.16 is installed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def writes_common_pt() -> bool:
    """Whether the installed megatron.core saves the common state in common.pt (0.16)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return "common_backend" in {field.name for field in dataclasses.fields(CheckpointingConfig)}


def mcore_019_save(real_save):
    """`dist_checkpointing.save` writing the 0.19 layout, given 0.16's `real_save`."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    def save(state, directory, *args, **kwargs):
        sharded, common = save_preprocess(state, True)
        sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,),
                                                replica_id=dist.get_rank())
        real_save(sharded, directory, *args, **kwargs)  # its own common.pt holds {}
        dist.barrier()
        if dist.get_rank() == 0:
            Path(directory, "common.pt").unlink()
            Path(directory, "metadata.json").write_text(json.dumps(
                {"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
        dist.barrier()

    return save
