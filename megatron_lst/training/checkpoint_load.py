"""Loading a training checkpoint (a save directory's layout: `checkpointing`) into this run's
model, optimizer and scheduler, refusing one that does not fit the run.

Loading verifies the checkpoint's files first (digests, truncation) and reads its pickled parts
with a restricted unpickler (`megatron_lst.checkpoint.safe_pickle`), so a crafted checkpoint is
refused before any code of it can run. `--load` names a save directory (its newest complete
checkpoint, or `--ckpt-step N`'s) or one `iter_XXXXXXX` directory.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lst.checkpoint import integrity, mcore_load, safe_pickle
from megatron_lst.checkpoint.errors import CheckpointError, CheckpointIntegrityError
from megatron_lst.rank_failures import share_or_stop
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training import optimizer_state
from megatron_lst.training.checkpoint_advice import move_aside_advice
from megatron_lst.training.checkpoint_discovery import other_complete_checkpoints, select_checkpoint
from megatron_lst.training.checkpoint_metadata import holds_weights_only, read_checkpoint_metadata
from megatron_lst.training.checkpoint_state import (
    model_keys,
    model_sharded_state_dict,
    parallel_layout,
    unwrap,
)
from megatron_lst.training.checkpointing import METADATA_FILENAME, checkpoint_name
from megatron_lst.training.data_fingerprint import FINGERPRINT_KEY, check_same_training_data
from megatron_lst.training.resume_check import (
    ResumeConfigError,
    ResumePosition,
    check_resume_flags,
)
from megatron_lst.training.rng_state import restore_rng_state, rng_sharded_object

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored, for the training loop to continue from."""

    path: Path
    iteration: int
    """Iterations done when the checkpoint was saved (0 with --finetune)."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """The `extra_state` given to `save_checkpoint` (empty with --finetune)."""
    saved_args: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(
    load_dir: str | os.PathLike,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    args: argparse.Namespace,
    vocab: JointVocab | None = None,
    data_fingerprints: list[dict[str, Any]] | None = None,
) -> LoadedCheckpoint | None:
    """Collective: restore the latest complete checkpoint under `load_dir` in place.

    `data_fingerprints`: this rank's `data_fingerprint.training_data_fingerprints`; a resume
    (optimizer given, no --finetune) is refused on every rank with ResumeConfigError when they
    differ from those in the checkpoint's extra state on any rank (None: not compared).
    Returns None when `load_dir` holds no checkpoint yet (start from scratch). Honours
    `args.no_load_optim`, `args.no_load_rng` and `args.finetune` (weights only, iteration 0).
    Model and optimizer reshard to the current tensor/pipeline layout; RNG states are skipped,
    with a warning, when the layout differs. Raises VocabularyError when the checkpoint's
    vocabulary differs from `vocab` (layout or tokenizer), CheckpointError naming the tensor when a model shape differs.
    """
    path = select_checkpoint(load_dir, getattr(args, "ckpt_step", None))
    if path is None:
        return None
    metadata = read_checkpoint_metadata(path)
    if vocab is not None and metadata["vocab"] is not None:
        vocab.check_same(JointVocab.from_dict(metadata["vocab"]), f"checkpoint {path}")

    finetune = bool(getattr(args, "finetune", False))
    load_optim = optimizer is not None and not finetune and not getattr(args, "no_load_optim", False)
    if load_optim and holds_weights_only(metadata):
        raise CheckpointError(
            f"checkpoint {path} holds model weights only (no optimizer state, learning-rate "
            f"schedule or data position: what lst-convert portable-to-dist writes), so a run "
            f"cannot resume from it; start training from these weights with --finetune "
            f"(iteration 0, a new optimizer)")
    if optimizer is not None and not finetune:  # a training run that continues this one
        position = ResumePosition(metadata["iteration"], int(
            metadata["extra_state"].get("consumed_samples", 0)))
        notes = check_resume_flags(metadata["args"], args, position, str(path))
        if notes and dist.get_rank() == 0:
            logger.warning("resuming from %s with other flags: %s", path, "; ".join(notes))
        if data_fingerprints is not None:
            data_notes = _check_training_data(metadata["extra_state"].get(FINGERPRINT_KEY),
                                              data_fingerprints, position, path)
            if data_notes and dist.get_rank() == 0:
                logger.warning("%s", "; ".join(data_notes))
    verify_or_point_elsewhere(path)
    load_rng = not finetune and not getattr(args, "no_load_rng", False)
    if load_rng and metadata["parallel_layout"] != parallel_layout():
        logger.warning(
            "checkpoint %s was saved with parallel layout %s, this run uses %s: RNG states are not "
            "restored (dropout streams start fresh)", path, metadata["parallel_layout"],
            parallel_layout())
        load_rng = False

    state = model_sharded_state_dict(model_chunks)
    saved_tensors = safe_pickle.saved_tensors_metadata(path)
    _check_model_shapes(state, saved_tensors, path)
    if load_optim:
        state["optimizer"] = optimizer_state.sharded_state_to_load(
            optimizer, state, metadata["sharded_state_metadata"])
        _check_optimizer_tensors(state["optimizer"], saved_tensors, path, metadata["args"], args)
    if load_rng:
        state["rng_state"] = rng_sharded_object()
    loaded = mcore_load.load_sharded(state, path)

    for key, chunk in zip(model_keys(model_chunks), unwrap(model_chunks), strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
    if load_optim:
        optimizer_state.load_state(optimizer, loaded["optimizer"], keep_run_schedule=bool(
            getattr(args, "override_opt_param_scheduler", False)))
        if scheduler is not None and metadata["scheduler"] is not None:
            scheduler.load_state_dict(metadata["scheduler"])
    elif optimizer is not None:
        # Optimizers that keep their own main copy of the weights (mixed precision, distributed)
        # refresh it from the weights just loaded; the plain fp32 optimizer has none.
        optimizer.reload_model_params()
    if load_rng:
        restore_rng_state(loaded["rng_state"])
    dist.barrier()

    if finetune:
        return LoadedCheckpoint(path=path, iteration=0, saved_args=metadata["args"])
    return LoadedCheckpoint(path=path, iteration=metadata["iteration"],
                            extra_state=metadata["extra_state"], saved_args=metadata["args"])


def _check_training_data(saved: Any, current: list[dict[str, Any]], position: ResumePosition,
                         path: Path) -> list[str]:
    """Collective: `check_same_training_data` on every rank (node-local copies of the data may
    differ), its refusal raised on every rank when any rank refuses."""
    refusal = None
    try:
        notes = check_same_training_data(saved, current, position, str(path))
    except ResumeConfigError as error:
        refusal, notes = str(error), []

    def refused(failed: list[tuple[int, str]]) -> ResumeConfigError:
        rank, message = failed[0]
        return ResumeConfigError(message if dist.get_world_size() == 1
                                 else f"{message} (on rank {rank})")

    share_or_stop(None, refusal, refused)
    return notes


def verify_or_point_elsewhere(path: Path) -> None:
    """Collective: `integrity.verify_checkpoint(path)`, its error saying how to load another
    complete checkpoint of the same save directory instead (or restore its files), after
    loading the same one again where the check could not read it (the fault may pass)."""
    try:
        integrity.verify_checkpoint(path)
    except CheckpointIntegrityError as err:
        unreadable = isinstance(err, integrity.CheckpointUnreadableError)
        others = other_complete_checkpoints(path)[::-1]  # newest first
        if not others:
            raise CheckpointIntegrityError(f"{err}\n" + _instead_of_loading(unreadable, (
                "restore its files from a copy (no other complete checkpoint is next to "
                "it)."))) from None
        kind = "unreadable" if unreadable else "damaged"
        raise CheckpointIntegrityError(f"{err}\n" + _instead_of_loading(unreadable, (
            f"load another one with --load {path.parent} --ckpt-step {others[0]} (or "
            f"--load {path.parent / checkpoint_name(others[0])}); complete checkpoints there: "
            f"{others}.{move_aside_advice(path, others[0], kind)}"))) from None


def _instead_of_loading(unreadable: bool, instead: str) -> str:
    """`instead` (what to do rather than load a checkpoint its check refused, in lower case), as
    a sentence; led, where the check could not read the checkpoint (`unreadable`: EIO, a fault
    that may pass), by loading the same checkpoint again."""
    if unreadable:
        return (f"If the read error was transient (a storage or network fault), load the same "
                f"checkpoint again; if it persists, {instead}")
    return instead[0].upper() + instead[1:]


def _check_optimizer_tensors(optimizer_state_to_load: Any, saved: dict[str, Any], path: Path,
                             saved_args: dict[str, Any], args: argparse.Namespace) -> None:
    """Name the first optimizer state tensor this run's optimizer loads that the checkpoint
    lacks (megatron.core fails with a KeyError listing every key of the checkpoint): the
    checkpoint's optimizer was another one (--optimizer, SGD without momentum), or it was saved
    before the optimizer's first step by a version that then saved no moments."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    missing = next((sharded.key for sharded in nested_values(optimizer_state_to_load)
                    if isinstance(sharded, ShardedTensor) and sharded.key not in saved), None)
    if missing is None:
        return
    before, now = _optimizer_flags(saved_args), _optimizer_flags(vars(args))
    why = (f"it was saved with {before} and this run uses {now}" if before != now else
           f"it was saved with {now}, as this run is, but before the optimizer's first step "
           f"(fp16 skips its first steps) by a version that then saved no optimizer moments")
    raise CheckpointError(
        f"checkpoint {path} holds no optimizer state {missing!r}, which this run's optimizer "
        f"loads: {why}. Resume with the checkpoint's optimizer flags, or add --no-load-optim to "
        f"go on from its weights with a fresh optimizer state and learning-rate schedule")


def _optimizer_flags(values: dict[str, Any]) -> str:
    """The optimizer flags of a run's `args` (as a dict) that decide its state's tensors."""
    name = values.get("optimizer", "adam")
    if name == "sgd":
        return f"--optimizer sgd --sgd-momentum {values.get('sgd_momentum')}"
    return f"--optimizer {name}"


def _check_model_shapes(state: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    """Collective: refuse, alike on every rank, a model that does not fit the checkpoint
    (`saved`: its tensors' metadata): the first model tensor of any rank that the checkpoint
    lacks or holds with another global shape, and the checkpoint's model tensors that no rank's
    model has (a model of fewer layers or parts, which loading would leave out silently)."""
    from megatron_lst.checkpoint.dist import NON_MODEL_PREFIXES

    try:
        keys, failure = _fitting_model_keys(state, saved, path), None
    except CheckpointError as error:
        keys, failure = [], str(error)

    def refused(failed: list[tuple[int, str]]) -> CheckpointError:
        rank, message = failed[0]
        return CheckpointError(message if dist.get_world_size() == 1
                               else f"{message} (on rank {rank})")

    expected = set().union(*share_or_stop(keys, failure, refused))
    unexpected = sorted(key for key in saved
                        if key not in expected and not key.startswith(NON_MODEL_PREFIXES))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint {path} holds model tensor(s) this model does not have: "
            f"{unexpected[:5]}{more}; it was saved from a model with more layers or parts. Build "
            f"the model with the sizes it was saved with (see 'args' in its {METADATA_FILENAME}; "
            f"--use-checkpoint-args does)")


def _fitting_model_keys(state: dict[str, Any], saved: dict[str, Any], path: Path) -> list[str]:
    """The checkpoint keys of this rank's model tensors (`state`: its sharded state dict),
    refusing, naming it, the first that the checkpoint lacks or holds with another global
    shape."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    keys = []
    for sharded in nested_values(state):
        if isinstance(sharded, ShardedTensorFactory):  # fused SwiGLU fc1: saved under its key
            keys.append(sharded.key)
        if not isinstance(sharded, ShardedTensor):
            continue
        keys.append(sharded.key)
        if sharded.key not in saved:
            raise CheckpointError(
                f"model tensor {sharded.key!r} is not in checkpoint {path}: the model has "
                f"parts the checkpoint lacks (another --patching-mode or architecture?)"
            )
        saved_shape = tuple(saved[sharded.key].global_shape)
        if saved_shape != tuple(sharded.global_shape):
            raise CheckpointError(
                f"model tensor {sharded.key!r} has shape {tuple(sharded.global_shape)} but "
                f"checkpoint {path} holds {saved_shape}; build the model with the sizes it was "
                f"saved with (see 'args' in its {METADATA_FILENAME})"
            )
    return keys
