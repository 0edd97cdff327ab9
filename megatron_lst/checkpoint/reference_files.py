"""Finding and reading the checkpoint files the reference implementation (`neillu23/lst`) writes.

Its training (FSDP) saves every `checkpoint.dump.every` steps, under `dump_dir/checkpoints/`:

    0000001000/                 one directory per step (10 digits)
        .metadata               torch.distributed.checkpoint (DCP) index of the state
        __0_0.distcp, ...       {"model": model state, "optim": optimizer state}, fp32
        params.json             the whole run config (TrainArgs): model args under "model"
        train_state_00000.json  data-loader and step state, one per data-parallel rank
        consolidated/           written by `python -m lst.checkpoint consolidate 0000001000`
            consolidated.pth    torch.save of the same {"model": ..., "optim": ...}
            params.json         copied from the step directory

`--reference-ckpt` takes any of these: a step directory (read as DCP without its optimizer
state; the index is read with the restricted unpickler of `safe_pickle`, every tensor with
torch's `weights_only` loader), its `.metadata` or a `.distcp` file in it, a `consolidated/`
directory, a `consolidated.pth` (or any `.pth`/`.pt` holding a state dict or `{"model": ...}`),
or a `.safetensors` state dict. Names keep no wrapper prefix (`_orig_mod.` of torch.compile,
`module.` of DDP, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`). The tensors must be
floating point, of one dtype and finite; a file that breaks any of this is refused naming it.
"""

from __future__ import annotations

import collections
import math
import pickle
import re
import warnings
from pathlib import Path

import torch

from megatron_lst.models.reference_config import ReferenceImportError

from .errors import CheckpointError
from .model_state import WEIGHT_DTYPES
from .safe_pickle import DCP_METADATA_FILENAME, check_file_bounds, read_dcp_metadata

CONSOLIDATED_FILENAME = "consolidated.pth"
CONSOLIDATED_FOLDER = "consolidated"
PARAMS_FILENAME = "params.json"
_STEP_FOLDER = re.compile(r"^\d{10}$")
_DISTCP_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
# Module names wrappers insert into parameter names: torch.compile, FSDP1, activation checkpointing.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Prefixes of a whole state dict: DDP's module, and a flat dump of the reference's {"model": ...}.
_WHOLE_PREFIXES = ("module.", "model.")
CONSOLIDATE_HINT = ("the reference consolidates a step directory with `python -m lst.checkpoint "
                    "consolidate STEP_DIR` (writes STEP_DIR/consolidated/consolidated.pth)")


def locate_reference_checkpoint(path: str | Path) -> Path:
    """The reference checkpoint `path` names: a weights file, or a DCP directory (see the module
    docstring for what a directory may hold). Refuses, naming what it found, a path that holds
    none or several."""
    path = Path(path)
    if path.is_file():
        if path.name == DCP_METADATA_FILENAME or _DISTCP_FILE.match(path.name):
            return path.parent  # a part of a DCP checkpoint: the checkpoint is its directory
        return path
    if not path.is_dir():
        raise ReferenceImportError(f"reference checkpoint {path} does not exist")
    weights = sorted(p.name for p in path.iterdir()
                     if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if (path / DCP_METADATA_FILENAME).is_file():
        if weights:
            raise ReferenceImportError(
                f"{path} holds two checkpoints, a torch.distributed.checkpoint ({DCP_METADATA_FILENAME}"
                f" + .distcp files) and {weights}; pass the one to import: {path / DCP_METADATA_FILENAME}"
                f" or {path / weights[0]}")
        return path
    if any(_DISTCP_FILE.match(p.name) for p in path.iterdir()):
        raise ReferenceImportError(
            f"{path} holds .distcp files but no {DCP_METADATA_FILENAME}, which "
            "torch.distributed.checkpoint writes last: the save did not finish; import an earlier "
            "step's checkpoint")
    if len(weights) == 1:
        return path / weights[0]
    if weights:
        chosen = CONSOLIDATED_FILENAME if CONSOLIDATED_FILENAME in weights else weights[0]
        raise ReferenceImportError(
            f"{path} holds {len(weights)} checkpoint files {weights}; pass the one to import, "
            f"e.g. --reference-ckpt {path / chosen}")
    steps = sorted(p.name for p in path.iterdir() if p.is_dir() and _STEP_FOLDER.match(p.name))
    if steps:
        raise ReferenceImportError(
            f"{path} holds the reference's checkpoints of steps {[int(s) for s in steps]}; pass "
            f"one step's directory, e.g. --reference-ckpt {path / steps[-1]} (the latest)")
    if (path / CONSOLIDATED_FOLDER).is_dir():
        return locate_reference_checkpoint(path / CONSOLIDATED_FOLDER)
    raise ReferenceImportError(
        f"{path} holds no reference checkpoint: neither a torch.distributed.checkpoint "
        f"({DCP_METADATA_FILENAME} + __*_*.distcp, as its training saves each step) nor a "
        f"{CONSOLIDATED_FILENAME}, .pt or .safetensors file")


def reference_params_beside(checkpoint: str | Path) -> Path:
    """The `params.json` the reference writes next to a checkpoint (`locate_reference_checkpoint`'s
    result): in a DCP step directory (or any directory given), or beside consolidated.pth."""
    checkpoint = Path(checkpoint)
    params = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / PARAMS_FILENAME
    if not params.is_file():
        raise ReferenceImportError(
            f"no {PARAMS_FILENAME} beside reference checkpoint {checkpoint} (the reference writes "
            f"one there); pass the run's model args with --reference-args (its params.json, "
            f"training YAML, or a JSON with 'model_args')")
    return params


def read_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The reference model's state dict from any checkpoint `locate_reference_checkpoint` finds
    at `path`, wrapper prefixes removed, its tensors checked (`check_reference_tensors`)."""
    checkpoint = locate_reference_checkpoint(path)
    if checkpoint.is_dir():
        state = _read_dcp_model_state(checkpoint)
    elif checkpoint.suffix == ".safetensors":
        state = _read_safetensors(checkpoint)
    else:
        state = _read_torch_file(checkpoint)
    state = _strip_wrapper_prefixes(state, checkpoint)
    check_reference_tensors(state, checkpoint)
    return state


def check_reference_tensors(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse, naming the tensor, a state dict with a tensor that is not floating point or of a
    float dtype the import does not read (the 8-bit floats: `model_state.WEIGHT_DTYPES`), with
    tensors of several dtypes (the reference stores every weight in one), or with a NaN or inf
    (its run diverged before this checkpoint)."""
    if not state:
        raise ReferenceImportError(f"reference checkpoint {source} holds no tensors")
    by_dtype: dict[torch.dtype, list[str]] = collections.defaultdict(list)
    for name, tensor in sorted(state.items()):
        if not tensor.is_floating_point():
            raise ReferenceImportError(
                f"reference checkpoint {source}: tensor {name!r} holds {tensor.dtype}, not "
                "floating-point weights; the file is damaged or is not a model state dict")
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ReferenceImportError(
                f"reference checkpoint {source}: tensor {name!r} holds {tensor.dtype}, which "
                "the reference does not run (its distributed.model_dtype: fp32, bf16 or fp16) "
                "and the import does not read; import the checkpoint its training saved")
        by_dtype[tensor.dtype].append(name)
    if len(by_dtype) > 1:
        kinds = ", ".join(f"{len(names)} {dtype} (e.g. {names[0]!r})"
                          for dtype, names in sorted(by_dtype.items(), key=lambda kv: str(kv[0])))
        raise ReferenceImportError(
            f"reference checkpoint {source} mixes tensor dtypes: {kinds}; the reference saves "
            "every weight in one dtype, so the file was altered: cast all of them to one dtype")
    for name, tensor in sorted(state.items()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ReferenceImportError(
                f"reference checkpoint {source}: tensor {name!r} holds {bad} NaN or inf "
                f"value(s) of {tensor.numel()}; the run had diverged when it was saved: import "
                "an earlier step's checkpoint")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ReferenceImportError(f"cannot read reference checkpoint {path}: {error}") from None


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` holding a state dict, or the reference's consolidated `{"model": ..., ...}`."""
    if path.stat().st_size == 0:
        raise ReferenceImportError(f"cannot read reference checkpoint {path}: the file is empty")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged zip fails in many ways (RuntimeError, KeyError, ...)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line]
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise ReferenceImportError(
                f"cannot read reference checkpoint {path}: it holds objects beyond tensors and "
                f"plain data ({' '.join(refused)}), and unpickling them could run code, so it is "
                f"refused; import the reference's own checkpoint instead (its step directory, or "
                f"its consolidated.pth: {CONSOLIDATE_HINT})") from None
        # torch's weights_only failures open with advice to load unrestricted: keep the cause
        cause = next((line for line in lines if line.startswith("Unsupported")), None) \
            or (lines[0].split(". ")[0] if lines else "")
        raise ReferenceImportError(
            f"cannot read reference checkpoint {path}: it is truncated, damaged or not written "
            f"by torch.save ({type(error).__name__}: {cause}); copy it again, or consolidate "
            f"the step directory again ({CONSOLIDATE_HINT})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in loaded.items()):
        raise ReferenceImportError(
            f"{path} holds neither a state dict (names -> tensors) nor the reference's "
            f"consolidated {{'model': state dict, 'optim': ...}}")
    return loaded


def _read_dcp_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The `model` part of a reference DCP checkpoint (its optimizer state is never read)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = read_dcp_metadata(directory)
    except CheckpointError as error:
        raise ReferenceImportError(f"cannot read reference checkpoint {directory}: {error}") from None
    problems = check_file_bounds(directory, metadata)
    if problems:
        raise ReferenceImportError(f"reference checkpoint {directory} is incomplete: "
                                   f"{'; '.join(problems)}")
    model = {key: item for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    _check_stored_sizes(directory, metadata, model)  # before allocating what the index says
    tensors = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in model.items()}
    if not tensors:
        top = sorted({key.split(".")[0] for key in metadata.state_dict_metadata})
        raise ReferenceImportError(
            f"{directory} is a torch.distributed.checkpoint without model tensors (its state "
            f"holds {top}); the reference saves its weights under 'model'")

    class _RestrictedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the index read above, never pickle.load
            return metadata

    try:
        with warnings.catch_warnings():  # "no process group: loading in one process"
            warnings.simplefilter("ignore", UserWarning)
            load({"model": tensors}, storage_reader=_RestrictedReader(directory), no_dist=True)
    except Exception as error:  # DCP wraps a reader's failure in its own CheckpointException
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise ReferenceImportError(
            f"cannot read reference checkpoint {directory}: its .distcp files are damaged "
            f"({type(error).__name__}: {reason})") from None
    return tensors


def _check_stored_sizes(directory: Path, metadata, model: dict) -> None:
    """Refuse an index that gives a model tensor a shape its chunks do not fill, or more elements
    than its stored bytes hold (each chunk is saved whole, a torch.save no smaller than its
    data): a damaged or crafted index, which would otherwise make loading allocate that shape (a
    4 TB `torch.empty` failed with a bare allocator error) or return the elements no chunk holds
    as uninitialised memory."""
    stored: dict[str, int] = collections.defaultdict(int)
    transformed: set[str] = set()
    for index, info in metadata.storage_data.items():
        stored[index.fqn] += info.length
        if info.transform_descriptors:  # compressed: no lower bound on the bytes
            transformed.add(index.fqn)
    for key, item in sorted(model.items()):
        numel = math.prod(item.size)
        covered = sum(math.prod(chunk.sizes) for chunk in item.chunks)
        if covered != numel:  # the elements no chunk holds would load as uninitialised memory
            raise ReferenceImportError(
                f"reference checkpoint {directory}: its {DCP_METADATA_FILENAME} gives tensor "
                f"{key!r} the shape {tuple(item.size)} ({numel} elements), but its stored chunks "
                f"hold {covered}; the index is damaged or crafted: import another copy of the "
                "checkpoint")
        needed = numel * item.properties.dtype.itemsize
        if key not in transformed and stored[key] < needed:
            raise ReferenceImportError(
                f"reference checkpoint {directory}: its {DCP_METADATA_FILENAME} gives tensor "
                f"{key!r} the shape {tuple(item.size)} ({needed} bytes of "
                f"{item.properties.dtype}), but stores {stored[key]} bytes for it; the index is "
                "damaged or crafted: import another copy of the checkpoint")


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    names = {key: ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)
             for key in state}
    for prefix in _WHOLE_PREFIXES:
        if all(name.startswith(prefix) for name in names.values()):
            names = {key: name.removeprefix(prefix) for key, name in names.items()}
    if len(set(names.values())) != len(names):
        seen: dict[str, str] = {}
        for key, name in names.items():
            if name in seen:
                raise ReferenceImportError(
                    f"reference checkpoint {source} holds {seen[name]!r} and {key!r}, the same "
                    f"tensor {name!r} under two wrapper prefixes; keep one of them")
            seen[name] = key
    return {names[key]: tensor for key, tensor in state.items()}

