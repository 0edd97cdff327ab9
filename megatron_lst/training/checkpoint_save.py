"""Saving a training checkpoint into a save directory (its layout: `checkpointing`).

A save first checks that the weights are finite (a diverged model is never saved as the newest
checkpoint), writes everything into `iter_XXXXXXX.tmp-<nonce>`, waits for every rank, records
the files' digests (`megatron_lst.checkpoint.integrity`), writes `lst_checkpoint.json` last,
renames the directory to `iter_XXXXXXX` and only then replaces the pointer file (temp file +
os.replace). A process killed at any point leaves the previous
checkpoint complete and named by the pointer (or, killed between the rename and the pointer, a
complete newer checkpoint that loading finds). Model and optimizer are saved as sharded tensors in
model space (the optimizer's state: `optimizer_state`), so a checkpoint loads under another
tensor/pipeline-parallel layout; RNG states (`rng_state`) are restored only under the layout that
saved them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lst.checkpoint import durable_files, integrity
from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.parallel import collective_device
from megatron_lst.rank_failures import (
    RankStepError,
    one_line,
    outcome,
    share_or_stop,
    step_failed,
)
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training import optimizer_state
from megatron_lst.training.args_json import args_to_dict
from megatron_lst.training.checkpoint_advice import describe_good_checkpoint
from megatron_lst.training.checkpoint_discovery import checkpoints_from, read_tracker
from megatron_lst.training.checkpoint_state import model_sharded_state_dict, parallel_layout, unwrap
from megatron_lst.training.checkpointing import (
    FORMAT_VERSION,
    METADATA_FILENAME,
    TRACKER_FILENAME,
    checkpoint_name,
)
from megatron_lst.training.rng_state import rng_sharded_object
from megatron_lst.training.writer_processes import writers_die_with_parent


class NonFiniteWeightsError(CheckpointError):
    """The weights to save hold NaN or infinity: the run diverged."""


def save_checkpoint(
    iteration: int,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    args: argparse.Namespace,
    extra_state: dict[str, Any],
    save_dir: str | os.PathLike,
    vocab: JointVocab | None = None,
) -> Path:
    """Collective: write checkpoint `iteration` under `save_dir` atomically; returns its path.

    `model_chunks`: this rank's model chunks (DDP/Float16Module wrappers allowed), one per
    virtual pipeline stage. `optimizer`: a megatron.core optimizer or None. `scheduler`: an
    `OptimizerParamScheduler` or None. `extra_state`: JSON-able training position (consumed
    samples, curriculum step, data seed, FLOP counters ...), returned as is by `load_checkpoint`.
    Raises NonFiniteWeightsError, saving nothing, when a weight is NaN or infinite, and
    CheckpointSaveError when writing fails (the checkpoints saved before stay as they were).
    """
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    _check_weights_finite(model_chunks, iteration, root, args)
    final = root / checkpoint_name(iteration)
    # Rank 0's listing, which every rank follows: a node whose view of the directory differs
    # (a stale cache of a network filesystem) refused alone while the others went on into the
    # next collective, waiting for it up to the process-group timeout.
    on_rank0(lambda: _refuse_to_save_behind_later(root, iteration), CheckpointError)
    extra_json = json.dumps(extra_state)  # fail before any writing if it is not JSON-able
    nonce = _broadcast_from_rank0(secrets.token_hex(6))
    temporary = root / f"{final.name}.tmp-{nonce}"
    with _save_failure_explained(iteration, root, temporary):
        _on_rank0(lambda: temporary.mkdir(parents=True), iteration, root)

        state, failure = outcome(lambda: _state_to_save(model_chunks, optimizer))
        share_or_stop(None, failure, step_failed("gather its state to save"))
        with writers_die_with_parent():
            dist_checkpointing.save(state, str(temporary))
        dist.barrier()
        files = integrity.record_checkpoint_files(temporary)

        _on_rank0(lambda: _finish_on_rank0(temporary, final, files, _checkpoint_metadata(
            iteration, extra_json, scheduler, args, vocab, model_chunks)), iteration, root)
    on_rank0(lambda: _point_tracker_to(final, iteration), CheckpointSaveError)
    dist.barrier()
    return final


def _refuse_to_save_behind_later(root: Path, iteration: int) -> None:
    """CheckpointError when `root` holds a checkpoint of `iteration` or later, which a save of
    `iteration` would overwrite or lie behind."""
    if later := checkpoints_from(root, iteration):
        raise CheckpointError(
            f"{root} already holds {[entry.name for entry in later]}; refusing to save iteration "
            f"{iteration} there: it would overwrite a checkpoint or lie behind a newer one that "
            f"resuming loads instead. Save into another --save directory or move those "
            f"checkpoints away"
        )


def _state_to_save(model_chunks: list[torch.nn.Module], optimizer: Any) -> dict[str, Any]:
    """This rank's sharded state dict of a checkpoint: model, optimizer (unless None), RNG."""
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer_state.sharded_state_to_save(optimizer, state)
    state["rng_state"] = rng_sharded_object()
    return state


def _checkpoint_metadata(iteration: int, extra_json: str, scheduler: Any,
                         args: argparse.Namespace, vocab: JointVocab | None,
                         model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The `lst_checkpoint.json` of checkpoint `iteration` (`extra_json`: its extra state)."""
    from megatron_lst.checkpoint.model_config import MODEL_KEY, model_record

    return {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "extra_state": json.loads(extra_json),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "sharded_state_metadata": optimizer_state.SHARDED_STATE_METADATA,
        "parallel_layout": parallel_layout(),
        "vocab": vocab.to_dict() if vocab is not None else None,
        "args": args_to_dict(args),
        MODEL_KEY: model_record(unwrap(model_chunks)[0]),
    }


def on_rank0(action: Callable[[], object], error_elsewhere: Callable[[str], Exception]) -> None:
    """Collective: run `action` on rank 0 alone, every rank learning whether it failed. Any
    exception of `action` is raised on rank 0 and `error_elsewhere(reason)` on the others, which
    used to wait for rank 0 in a collective that broke with a gloo traceback ('Connection closed
    by peer') once rank 0 stopped (a full disk, a --save made read-only during the run).
    `reason`: rank 0's message for a CheckpointError (a refusal of ours, complete), else one
    naming rank 0's error and its type. A step every rank takes: `rank_failures.share_or_stop`."""
    failure = None
    if dist.get_rank() == 0:
        try:
            action()
        except Exception as error:  # whatever it is, the other ranks must not wait for rank 0
            failure = error
    reason = _broadcast_from_rank0("" if failure is None else _failure_reason(failure))
    if failure is not None:
        raise failure
    if reason:
        raise error_elsewhere(reason)


def _failure_reason(error: Exception) -> str:
    """What the other ranks say of rank 0's `error` (`on_rank0`)."""
    if isinstance(error, CheckpointError):
        return str(error)
    return f"rank 0 stopped with {one_line(error)} (its output says where); this rank stops with it"


def _on_rank0(action: Callable[[], None], iteration: int, root: Path) -> None:
    """Collective: `on_rank0` for a step of saving checkpoint `iteration` into `root`; the other
    ranks raise CheckpointSaveError with rank 0's reason."""
    on_rank0(action, lambda reason: CheckpointSaveError(
        f"saving the checkpoint of iteration {iteration} into {root} failed: {reason}; "
        f"checkpoints saved before are untouched"))


def _finish_on_rank0(temporary: Path, final: Path, files: Any, metadata: dict[str, Any]) -> None:
    """Rank 0's part of a save, once every rank wrote its shards: the manifest, our metadata
    last, then the rename to the final name (`_point_tracker_to` follows)."""
    integrity.write_manifest(temporary, files)
    durable_files.write_file_durably(temporary / METADATA_FILENAME, json.dumps(metadata, indent=1))
    os.rename(temporary, final)
    durable_files.fsync_directory(final.parent)


def _point_tracker_to(final: Path, iteration: int) -> None:
    """Rank 0's last step of a save: name the complete checkpoint `final` in the pointer file.
    When that fails, raises CheckpointSaveError saying that the checkpoint is complete, what the
    pointer file still names and how to resume from the checkpoint regardless."""
    root = final.parent
    tracker = root / TRACKER_FILENAME
    try:
        durable_files.replace_file_durably(tracker, str(iteration))
    except OSError as error:
        raise CheckpointSaveError(
            f"the checkpoint of iteration {iteration} is complete at {final}, but updating "
            f"{tracker} failed ({one_line(error)}; {_free_space(root)}): {_tracker_now(root)}. "
            f"--load {root} finds the newest complete checkpoint by itself (warning that the "
            f"pointer names an older one), or write {iteration} into {tracker}") from None


def _tracker_now(root: Path) -> str:
    """What the pointer file of `root` names, for a message saying it was not updated."""
    try:
        pointed = read_tracker(root)
    except CheckpointError as error:
        return str(error)
    if pointed is None:
        return f"{TRACKER_FILENAME} is not there yet"
    return f"{TRACKER_FILENAME} still names iteration {pointed}"


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a directory that cannot be written)."""


@contextlib.contextmanager
def _save_failure_explained(iteration: int, root: Path, temporary: Path):
    """Within the block, a failed write (OSError, or torch.distributed.checkpoint's
    CheckpointException wrapping the writers' errors, a collective: every rank raises it) or a
    step that failed on some rank (RankStepError, raised alike on every rank: building the state
    to save, hashing the files) raises CheckpointSaveError naming it (on every rank: rank 0's
    account of the writers'), the free space left, and that the checkpoints saved before are
    untouched."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, CheckpointException, RankStepError) as error:
        if isinstance(error, OSError):  # this rank's own (rank 0 creating the save's directory)
            reason, free_space = one_line(error), _free_space(root)
        else:  # raised alike on every rank, in step: one line, the same on every rank
            free_space = _least_free_space(root)
            if isinstance(error, RankStepError):  # naming the rank(s)
                reason = str(error)
            else:
                # Only rank 0, which gathers the writers' results, hears why: the others' log
                # (another node's, on a multi-node run) said no more than that.
                reason = _broadcast_from_rank0("; ".join(
                    f"rank {rank}: {one_line(exc)}" for rank, (exc, _) in sorted(
                        error.failures.items()))) or (
                    "another rank's checkpoint writers failed; its message says why")
        raise CheckpointSaveError(
            f"saving the checkpoint of iteration {iteration} into {root} failed ({reason}); "
            f"{free_space}. Checkpoints saved before are untouched ({TRACKER_FILENAME} "
            f"is replaced only after a complete save). Remove the interrupted save "
            f"{temporary.name} if it is there, make room or fix the directory, and resume with "
            f"--load {root}") from None


def _free_space(path: Path) -> str:
    """The free space this rank measures on the filesystem of `path`, for a message of its own."""
    free = _free_bytes(path)
    return free if isinstance(free, str) else _free_phrase(free, path)


def _least_free_space(path: Path) -> str:
    """Collective: the least free space a rank measures on the filesystem of `path`, naming
    that rank, or the first rank that cannot measure it: one phrase, the same on every rank.
    Each rank measures its own filesystem (a node-local --save is full on one node alone), and
    ranks measuring one shared filesystem a moment apart got figures that differed by a few
    KiB, so their otherwise identical lines were each printed."""
    measured: list[int | str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(measured, _free_bytes(path))
    failed = next((rank for rank, free in enumerate(measured) if isinstance(free, str)), None)
    if failed is not None:
        return f"rank {failed}: {measured[failed]}"
    least = min(range(len(measured)), key=measured.__getitem__)
    whose = f" (the least that a rank measured: rank {least}'s)" if len(measured) > 1 else ""
    return _free_phrase(measured[least], path) + whose


def _free_phrase(free: int, path: Path) -> str:
    return f"{free / 2**20:.1f} MiB free on the filesystem of {path}"


def _free_bytes(path: Path) -> int | str:
    """The free bytes on the filesystem of `path`, or why they cannot be measured."""
    try:
        return shutil.disk_usage(path).free
    except OSError as error:
        return f"{path} cannot be inspected ({error})"


def _check_weights_finite(model_chunks: list[torch.nn.Module], iteration: int,
                          save_dir: Path, args: argparse.Namespace) -> None:
    """Collective: raise NonFiniteWeightsError, naming a NaN/inf weight and the checkpoint to go
    back to (`describe_good_checkpoint` of `save_dir` and the run's `args`), unless every weight
    of every rank is finite."""
    named = [(name, param) for chunk in unwrap(model_chunks)
             for name, param in chunk.named_parameters()]
    device = collective_device()
    # One device sync: a finite flag per parameter [num_params].
    finite = torch.stack([torch.isfinite(param.detach()).all() for _, param in named]) \
        if named else torch.ones(0, dtype=torch.bool, device=device)
    flag = (~finite).any().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    bad = next((name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok),
               None)
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, bad)
    good = describe_good_checkpoint(save_dir, getattr(args, "resume_from", None),
                                    getattr(args, "finetune", False))
    raise NonFiniteWeightsError(
        f"iteration {iteration}: weight {next(n for n in names if n is not None)} holds NaN or "
        f"infinity; the run diverged and this checkpoint is not saved. {good}")


def _broadcast_from_rank0(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
