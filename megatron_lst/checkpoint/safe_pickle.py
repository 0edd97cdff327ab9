"""Reading the pickled parts of a dist checkpoint without running code from it.

A megatron.core `torch_dist` checkpoint holds three kinds of pickled data:

    .metadata        the index torch.distributed.checkpoint writes with `pickle.dump`, and that
                     its FileSystemReader reads back with a plain `pickle.load`
    byte items       ShardedObjects (RNG states, module `_extra_state`) inside the `.distcp`
                     files, which torch's DefaultLoadPlanner reads with `torch.load(...,
                     weights_only=False)`
    common.pt        megatron's non-sharded state (`torch.load`)

A crafted file of any of these runs arbitrary code the moment it is read. The loaders here read
each of them before megatron.core does, with a restricted unpickler: `.metadata` may name only
the classes torch's checkpoint index is made of (`DCP_METADATA_GLOBALS`, plus torch dtypes), and
byte items and common.pt must load under torch's `weights_only` unpickler (tensors, containers,
numbers, strings). Anything else is refused, naming the file and the object it asked for, before
a single object of it is built. A file that passes holds only those objects, so megatron's own
unrestricted read of the same bytes builds the same harmless objects. (The files must not change
between the two reads: whoever can write into a checkpoint while a job loads it can change the
job's code as well.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointIntegrityError, UnsafeCheckpointError
from .record_files import read_record_file

DCP_METADATA_FILENAME = ".metadata"
MAX_DCP_INDEX_BYTES = 1 << 30
"""1 GiB: more than any checkpoint index torch.distributed.checkpoint writes (an entry of ~100
bytes per shard of each tensor: some MB for a model of billions of parameters on hundreds of
ranks). A larger `.metadata`, or one that is no regular file (a FIFO blocked the load forever),
is refused unread (`record_files.read_record_file`)."""
COMMON_STATE_FILENAME = "common.pt"
# (resolved path, bytes, Metadata) of the last index `read_dcp_metadata` read.
_last_index: tuple[Path, bytes, Any] | None = None

_DCP = "torch.distributed.checkpoint"
# Every class torch.distributed.checkpoint's `Metadata` (with megatron's saved plans) is built
# from; calling any of them builds plain data.
DCP_METADATA_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    (f"{_DCP}.planner", "BytesIOWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id: the path torch's FileSystemWriter saved to (the reference
    # implementation's checkpoints hold it); building one is pure string handling
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "PurePosixPath")),
})


class _DcpMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._path} asks to build {module}.{name}, which a checkpoint index never holds: "
            f"unpickling it could run code, so it is refused. This checkpoint was not written by "
            f"torch.distributed.checkpoint (or was altered); only load checkpoints from sources "
            f"you trust, or ask for the portable form (model.safetensors + lst_config.json)")


def read_dcp_metadata(checkpoint: str | Path):
    """The `torch.distributed.checkpoint.Metadata` of `checkpoint`, read with the restricted
    unpickler. Raises UnsafeCheckpointError for anything but a checkpoint index, and
    CheckpointIntegrityError for a missing or damaged file.

    A load asks for the index several times (the model record's weight count, the verification,
    the saved tensor shapes): the file is read each time, but bytes unpickled before (the last
    index read, by content) are not unpickled again; the same objects come back, so callers must
    not change them."""
    global _last_index
    path = Path(checkpoint) / DCP_METADATA_FILENAME
    try:
        data = read_record_file(path, CheckpointIntegrityError, "checkpoint index",
                                MAX_DCP_INDEX_BYTES)
    except CheckpointIntegrityError as err:  # missing, no regular file, unreadable, too large
        raise CheckpointIntegrityError(
            f"{err}; a dist checkpoint's index of its shards, without which none of its tensors "
            f"can be found: load an earlier checkpoint of the run, or restore this one from a "
            f"copy") from None
    resolved = path.resolve()
    if _last_index is not None and _last_index[0] == resolved and _last_index[1] == data:
        return _last_index[2]
    try:
        metadata = _DcpMetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a truncated or garbled pickle fails in many ways
        raise CheckpointIntegrityError(
            f"{path} ({len(data)} bytes) is damaged or truncated: {type(err).__name__}: {err}"
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not a "
                                    f"torch.distributed.checkpoint index")
    _last_index = (resolved, data, metadata)
    return metadata


def saved_tensors_metadata(checkpoint: str | Path) -> dict[str, Any]:
    """megatron.core's `dist_checkpointing.load_tensors_metadata` of `checkpoint` (its tensors
    by key, shapes and dtypes without data), built from the index `read_dcp_metadata` reads
    instead of megatron's own unrestricted unpickling of it."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return TorchDistLoadShardedStrategy().load_tensors_metadata(
        Path(checkpoint), read_dcp_metadata(checkpoint))


def check_file_bounds(checkpoint: str | Path, metadata) -> list[str]:
    """Problems (empty: none) with the `.distcp` files `metadata` points into: a path outside
    the checkpoint directory, a missing file, or one shorter than the index says (truncated)."""
    directory = Path(checkpoint)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    problems = []
    for name, end in sorted(needed.items()):
        file = directory / name
        if Path(name).name != name or name in (".", ".."):
            problems.append(f"{directory / DCP_METADATA_FILENAME} points outside the checkpoint "
                            f"directory ({name!r}); the checkpoint was crafted or altered")
        elif not file.is_file():
            problems.append(f"{file} is missing; the checkpoint index stores data in it")
        elif (size := file.stat().st_size) < end:
            problems.append(f"{file} is truncated: {size} bytes, but the checkpoint index "
                            f"places data up to byte {end}")
    return problems


def byte_items(metadata) -> list[str]:
    """The keys of the byte items (ShardedObjects) of `metadata`, sorted."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return sorted(key for key, kind in metadata.state_dict_metadata.items()
                  if isinstance(kind, BytesStorageMetadata))


def check_byte_items(checkpoint: str | Path, metadata, keys: list[str]) -> dict[str, str]:
    """Problems by key of the byte items `keys` (see `byte_items`) that do not load under
    torch's `weights_only` unpickler; call after `check_file_bounds` found no problem."""
    directory = Path(checkpoint)
    wanted = set(keys)
    problems = {}
    for index, info in metadata.storage_data.items():
        if index.fqn not in wanted:
            continue
        where = f"{directory / info.relative_path} (object {index.fqn!r})"
        try:
            payload = read_byte_item(directory, info, where)
        except CheckpointIntegrityError as err:
            problems[index.fqn] = str(err)
            continue
        problem = _weights_only_problem(payload, where)
        if problem is not None:
            problems[index.fqn] = problem
    return problems


def read_byte_item(checkpoint: str | Path, info, where: str) -> bytes:
    """The stored bytes of one byte item (`info`: its `_StorageInfo` in the checkpoint index;
    `where`: how errors name it). Raises CheckpointIntegrityError for an item stored through
    stream transforms, which this reader cannot undo, and for a file too short to hold it."""
    if info.transform_descriptors:
        raise CheckpointIntegrityError(f"{where} is stored through stream transforms "
                                       f"{list(info.transform_descriptors)}, which this loader "
                                       f"cannot check")
    with open(Path(checkpoint) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        payload = f.read(info.length)
    if len(payload) != info.length:
        raise CheckpointIntegrityError(f"{where} is truncated: {len(payload)} of its "
                                       f"{info.length} bytes are there")
    return payload


def check_common_state(checkpoint: str | Path) -> list[str]:
    """Problems with megatron's `common.pt` (absent is fine: not every strategy writes it)."""
    path = Path(checkpoint) / COMMON_STATE_FILENAME
    if not path.is_file():
        return []
    problem = _weights_only_problem(path.read_bytes(), str(path))
    return [] if problem is None else [problem]


def _weights_only_problem(payload: bytes, where: str) -> str | None:
    try:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to retry unrestricted; keep only what it refused.
        refused = [line for line in str(err).splitlines()
                   if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
        return (f"{where} holds objects beyond tensors and plain data and is refused "
                f"(unpickling it could run code): {' '.join(refused) or type(err).__name__}")
    except Exception as err:
        return f"{where} is damaged: {type(err).__name__}: {err}"
    return None
