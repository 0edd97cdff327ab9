"""`dist_checkpointing.load` of a dist checkpoint, whichever megatron.core release wrote it.

megatron.core moved a checkpoint's common (non-sharded) state, which holds the optimizer's step
count and parameter groups, between releases:

    0.16   `common.pt` next to the `.distcp` files (metadata.json names a "torch" common backend)
    0.19   a byte item `common_state/shard_0_1` inside the `.distcp` files, and no `common.pt`

megatron.core 0.19 reads both forms. 0.16 reads only `common.pt`, and on a checkpoint without one
fails inside its own error path (`AttributeError: 'str' object has no attribute 'iterdir'`). Where
megatron.core's `load` still takes the `common_strategy` of those releases and the checkpoint has
no `common.pt`, `load_sharded` hands it a strategy that reads the byte item instead, under torch's
`weights_only` unpickler. Every other load is megatron.core's own, unchanged.
"""

from __future__ import annotations

import inspect
import io
import os
from pathlib import Path
from typing import Any

import torch

from . import safe_pickle
from .errors import CheckpointIntegrityError

COMMON_STATE_ITEM = "common_state/shard_0_1"
"""The byte item (`ShardedObject("common_state", ..., global_shape=(1,), global_offset=(0,))`)
in which megatron.core 0.19 saves the common state, as `[state]`."""


def load_sharded(sharded_state_dict: dict[str, Any], checkpoint: str | os.PathLike) -> Any:
    """Collective: `megatron.core.dist_checkpointing.load(sharded_state_dict, checkpoint)`, able to
    read the common state of a checkpoint saved by another megatron.core release (module
    docstring). Run `integrity.verify_checkpoint` on `checkpoint` first, as for any load."""
    from megatron.core import dist_checkpointing

    path = Path(checkpoint)
    extra = {}
    if _reads_common_pt_only(dist_checkpointing.load) and not (
            path / safe_pickle.COMMON_STATE_FILENAME).is_file():
        extra["common_strategy"] = _common_state_item_strategy()
    return dist_checkpointing.load(sharded_state_dict, str(path), **extra)


def _reads_common_pt_only(load: Any) -> bool:
    """Whether megatron.core's `load` is one of the releases that read the common state from
    `common.pt` through a `common_strategy` (0.16); later ones read both forms themselves."""
    return "common_strategy" in inspect.signature(load).parameters


def read_common_state_item(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The common state that megatron.core 0.19 saved inside `checkpoint`'s `.distcp` files,
    read under torch's `weights_only` unpickler. Raises CheckpointIntegrityError naming the file
    when the checkpoint holds neither that item nor `common.pt`, or when the item is damaged."""
    directory = Path(checkpoint)
    metadata = safe_pickle.read_dcp_metadata(directory)
    info = next((info for index, info in metadata.storage_data.items()
                 if index.fqn == COMMON_STATE_ITEM), None)
    if info is None:
        raise CheckpointIntegrityError(
            f"{directory} holds no common state: neither {safe_pickle.COMMON_STATE_FILENAME} "
            f"(megatron.core 0.16) nor the item {COMMON_STATE_ITEM!r} in its .distcp files "
            f"(megatron.core 0.19), one of which every megatron.core save writes; restore the "
            f"checkpoint from a copy or load another one")
    where = f"{directory / info.relative_path} (object {COMMON_STATE_ITEM!r})"
    payload = safe_pickle.read_byte_item(directory, info, where)
    try:
        wrapped = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointIntegrityError(
            f"{where} is damaged: {type(err).__name__}: {err}") from None
    if not (isinstance(wrapped, list) and len(wrapped) == 1 and isinstance(wrapped[0], dict)):
        raise CheckpointIntegrityError(
            f"{where} holds a {type(wrapped).__name__}, not the one-element list of a state "
            f"dict that megatron.core saves there; the checkpoint was altered")
    return wrapped[0]


def _common_state_item_strategy() -> Any:
    """megatron.core 0.16's torch common-load strategy, reading the 0.19 byte item instead of
    `common.pt` (built here: the base class exists only in those releases)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateItemLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
            return read_common_state_item(checkpoint_dir)

    return CommonStateItemLoadStrategy()
