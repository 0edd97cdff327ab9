"""Training checkpoints with megatron.core dist_checkpointing (docs/architecture.md#checkpoint-formats).

Layout of a save directory (`--save`), Megatron-LM's names where Megatron has them:

    latest_checkpointed_iteration.txt    "<iteration>": the newest complete checkpoint
    iter_0000100/                        one complete checkpoint
        <dist_checkpointing files>       model, optimizer, per-rank RNG states (sharded)
        lst_manifest.json                size and SHA-256 of each of those files
        lst_checkpoint.json              iteration, scheduler, extra state (consumed samples,
                                         curriculum step, ...), parallel layout, args, vocabulary,
                                         the model's kind and full configuration
    iter_0000200.tmp-<nonce>/            a save that was interrupted: never loaded, never deleted
    lst_train.lock                       held by the run writing here (`save_directory`)

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

Loading verifies the checkpoint's files first (digests, truncation) and reads its pickled parts
with a restricted unpickler (`megatron_lst.checkpoint.safe_pickle`), so a crafted checkpoint is
refused before any code of it can run. `--load` names a save directory (its newest complete
checkpoint, or `--ckpt-step N`'s) or one `iter_XXXXXXX` directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lst.checkpoint import durable_files, integrity, mcore_load, safe_pickle
from megatron_lst.checkpoint.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    mistyped_fields,
)
from megatron_lst.parallel import collective_device
from megatron_lst.rank_failures import (
    RankStepError,
    one_line,
    outcome,
    share_or_stop,
    step_failed,
)
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training import optimizer_state
from megatron_lst.training.args_json import args_to_dict
from megatron_lst.training.data_fingerprint import FINGERPRINT_KEY, check_same_training_data
from megatron_lst.training.resume_check import (
    ResumeConfigError,
    ResumePosition,
    check_resume_flags,
)
from megatron_lst.training.rng_state import restore_rng_state, rng_sharded_object
from megatron_lst.training.writer_processes import writers_die_with_parent

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "lst_checkpoint.json"
FORMAT_VERSION = 1
# The fields of lst_checkpoint.json that loading reads, and their JSON types.
_TRAINING_METADATA_FIELDS = {
    "iteration": int, "extra_state": dict, "scheduler": (dict, type(None)),
    "sharded_state_metadata": dict, "parallel_layout": dict, "vocab": (dict, type(None)),
    "args": dict,
}
_COMPLETE_NAME = re.compile(r"^iter_(\d{7,})$")
_TEMPORARY_NAME = re.compile(r"^iter_(\d{7,})\.tmp-[0-9a-f]+$")


class NonFiniteWeightsError(CheckpointError):
    """The weights to save hold NaN or infinity: the run diverged."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored, for the training loop to continue from."""

    path: Path
    iteration: int
    """Iterations done when the checkpoint was saved (0 with --finetune)."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """The `extra_state` given to `save_checkpoint` (empty with --finetune)."""
    saved_args: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --- finding checkpoints ----------------------------------------------------------------

def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none yet; `root`
    itself when it is one complete checkpoint (`--load DIR/iter_0000100`).

    Interrupted saves (`iter_*.tmp-*`) are reported and skipped, never deleted. Raises
    CheckpointError when the pointer file is unreadable or names a checkpoint that is missing or
    incomplete: that is corruption, which starting from scratch would hide.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    if _COMPLETE_NAME.match(root.name) and _is_complete(root):
        return root
    complete = _complete_checkpoints(root)
    if _COMPLETE_NAME.match(root.name) and not complete:
        raise CheckpointError(_incomplete_checkpoint_message(root))
    pointed = _read_tracker(root)
    if pointed is not None and pointed not in complete:
        raise CheckpointError(
            f"{root / TRACKER_FILENAME} names iteration {pointed}, but "
            f"{_what_is_wrong_with(root / checkpoint_name(pointed))}; the save directory is corrupt. "
            f"Restore that checkpoint, or write the iteration of a complete one "
            f"({sorted(complete) or 'none found'}) into {TRACKER_FILENAME}, or pick one with "
            f"--ckpt-step N"
        )
    if not complete:
        return None
    newest = max(complete)
    if pointed is not None and newest > pointed:
        logger.warning(
            "%s names iteration %d but the complete checkpoint %s is newer (a save ended between "
            "its rename and the pointer update); loading the newer one", root / TRACKER_FILENAME,
            pointed, complete[newest].name)
    return complete[newest]


def select_checkpoint(load: str | os.PathLike, ckpt_step: int | None = None) -> Path | None:
    """The checkpoint `--load` (and `--ckpt-step`, Megatron-LM's flag) name: with a step, the
    complete `iter_XXXXXXX` of that iteration under `load`, whatever the pointer file says;
    without, `find_latest_checkpoint(load)`."""
    if ckpt_step is None:
        return find_latest_checkpoint(load)
    root = Path(load)
    if _COMPLETE_NAME.match(root.name) and _is_complete(root):
        raise CheckpointError(f"--load {root} is one checkpoint; --ckpt-step {ckpt_step} picks "
                              f"one under a save directory: give one or the other")
    complete = _complete_checkpoints(root) if root.is_dir() else {}
    if ckpt_step not in complete:
        raise CheckpointError(
            f"--ckpt-step {ckpt_step}: {root} holds no complete checkpoint of iteration "
            f"{ckpt_step}; complete ones: {sorted(complete) or 'none'}")
    return complete[ckpt_step]


def _complete_checkpoints(root: Path) -> dict[int, Path]:
    """Complete checkpoints under `root` by iteration; reports interrupted saves."""
    complete: dict[int, Path] = {}
    leftovers: list[str] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if _TEMPORARY_NAME.match(entry.name):
            leftovers.append(entry.name)
        elif (match := _COMPLETE_NAME.match(entry.name)) and _is_complete(entry):
            complete[int(match.group(1))] = entry
    report = (str(root), tuple(leftovers))
    if leftovers and report not in _reported_leftovers:  # a run looks in --load several times
        _reported_leftovers.add(report)
        logger.warning(
            "%s holds %d interrupted save(s) that will not be loaded: %s; remove them once no "
            "save is running", root, len(leftovers), ", ".join(leftovers))
    return complete


# (save directory, its interrupted saves) this process has reported.
_reported_leftovers: set[tuple[str, tuple[str, ...]]] = set()


def checkpoints_from(root: str | os.PathLike, first_iteration: int) -> list[Path]:
    """The `iter_XXXXXXX` directories under `root`, complete or not, of iteration
    `first_iteration` or later, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {int(match.group(1)): entry for entry in root.iterdir()
             if (match := _COMPLETE_NAME.match(entry.name))}
    return [found[i] for i in sorted(found) if i >= first_iteration]


def checkpoints_of_another_run(save_dir: str | os.PathLike, resumed: Path) -> list[Path]:
    """The `iter_XXXXXXX` directories under `save_dir` (complete or not, oldest first) that a
    run resuming checkpoint `resumed` of another directory cannot tell for its own: all of them,
    unless `save_dir` holds a copy of `resumed` (the same name, both with a manifest of the same
    files and digests: the same model, optimizer and RNG states), which makes them the earlier
    checkpoints of the run it continues."""
    found = checkpoints_from(save_dir, 0)
    copy = Path(save_dir) / resumed.name
    if copy in found and _same_recorded_files(copy, resumed):
        return []
    return found


def _same_recorded_files(one: Path, other: Path) -> bool:
    """Whether the complete checkpoints `one` and `other` have manifests recording the same
    files with the same digests (False for one without a manifest, or unreadable)."""
    try:
        manifests = [integrity.read_manifest(path) if _is_complete(path) else None
                     for path in (one, other)]
    except CheckpointIntegrityError:
        return False
    return manifests[0] is not None and manifests[0] == manifests[1]


def _what_is_wrong_with(path: Path) -> str:
    """Why the checkpoint directory `path` is not a complete checkpoint: "<path> is missing" or
    "<path> is incomplete (no <the files it lacks>)"."""
    if not path.is_dir():
        return f"{path} is missing"
    return f"{path} is incomplete (no {' or '.join(_missing_markers(path))})"


def _missing_markers(path: Path) -> list[str]:
    """The files that make a checkpoint complete which `path` lacks."""
    return [name for name in _COMPLETE_MARKERS if not (path / name).is_file()]


def _incomplete_checkpoint_message(path: Path) -> str:
    others = _other_complete_checkpoints(path) if path.parent.is_dir() else []
    return (f"{path} is an incomplete checkpoint (no {' or '.join(_missing_markers(path))}): a "
            f"save that did not finish, or a damaged copy. Load a complete one of {path.parent} "
            f"({others or 'none found'}) with --load {path.parent} [--ckpt-step N]")


def _other_complete_checkpoints(path: Path) -> list[int]:
    """The iterations of the complete checkpoints next to `path` (itself excluded), oldest first."""
    return sorted(i for i in _complete_checkpoints(path.parent) if checkpoint_name(i) != path.name)


# A save writes ours last, after megatron's: a directory with both is a complete checkpoint.
_COMPLETE_MARKERS = (METADATA_FILENAME, integrity.MEGATRON_CONFIG_FILENAME)


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE_MARKERS)


def check_tracker_is_a_file(root: str | os.PathLike) -> None:
    """CheckpointError unless the pointer file of the save directory `root` is a regular file or
    absent: a directory (or a pipe, a dangling link) in its place used to be taken for no
    pointer at all, and the first save then failed to replace it, after training up to it."""
    tracker = Path(root) / TRACKER_FILENAME
    if tracker.is_file() or not (tracker.exists() or tracker.is_symlink()):
        return
    what = "a directory" if tracker.is_dir() else "not a regular file"
    raise CheckpointError(
        f"{tracker} is {what}: lst-train writes the iteration of the newest checkpoint into a "
        f"file of that name, replacing it at each save. Move it out of the way (without it, "
        f"--load finds the newest complete iter_XXXXXXX directory by itself)")


def _read_tracker(root: Path) -> int | None:
    check_tracker_is_a_file(root)
    tracker = root / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_bytes().decode("utf-8", errors="replace").strip()
    except OSError as error:
        raise CheckpointError(f"{tracker} cannot be read ({error}); make it readable") from None
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"{tracker} should hold an iteration number, found {text[:40]!r}; the save directory "
            f"is corrupt. Write the iteration of a complete iter_XXXXXXX directory into it"
        )
    return int(text)


def read_checkpoint_metadata(path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """The `lst_checkpoint.json` of one checkpoint directory: a JSON object of this format
    version and, when `strict`, with every field a save writes (`check_training_metadata`)."""
    metadata_path = Path(path) / METADATA_FILENAME
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON, UTF-8
        raise CheckpointError(f"cannot read {metadata_path}: {err}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{metadata_path} holds a JSON {type(metadata).__name__}, not the "
                              f"checkpoint's metadata object; the checkpoint is corrupt")
    version = metadata.get("format_version")  # true and 1.0 equal 1, yet no save writes them
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{metadata_path} has format version {version!r}; this "
            f"code reads version {FORMAT_VERSION}"
        )
    if strict:
        check_training_metadata(metadata, Path(path))
    return metadata


# --- saving -----------------------------------------------------------------------------

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
    state = _model_sharded_state_dict(model_chunks)
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
        "parallel_layout": _parallel_layout(),
        "vocab": vocab.to_dict() if vocab is not None else None,
        "args": args_to_dict(args),
        MODEL_KEY: model_record(_unwrap(model_chunks)[0]),
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
        pointed = _read_tracker(root)
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
    named = [(name, param) for chunk in _unwrap(model_chunks)
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


def describe_good_checkpoint(save_dir: str | os.PathLike | None,
                             started_from: str | os.PathLike | None = None,
                             finetune: bool = False, nonfinite_loss_at: int | None = None,
                             passed_over_because: str | None = None) -> str:
    """A sentence naming the checkpoint to go back to after a divergence: the newest under
    `save_dir` (every saved checkpoint had finite weights: `save_checkpoint` checks), or the one
    the run started from (`started_from`, `args.resume_from`; with `finetune`, the weights it
    fine-tuned from) when `save_dir` holds none as new: a run resumed from another directory that
    diverged before its first save has its good checkpoint there.

    `nonfinite_loss_at`: the iteration whose loss was NaN or infinite. That loss came from the
    weights of the iteration before, on its own batch, and resuming from their checkpoint
    replays that forward pass (the data order and the random state come back with it) whatever
    --lr or --clip-grad say: such a checkpoint is passed over, for the newest one before it.
    `passed_over_because`: why the advice says it is passed over, where the weights went wrong
    in another way from that iteration on (fp16 gradients that overflow, no update made since)."""
    try:
        newest = find_latest_checkpoint(save_dir) if save_dir is not None else None
    except CheckpointError as err:
        return f"No checkpoint to resume from could be found: {err}"
    start = Path(started_from) if started_from is not None else None
    if nonfinite_loss_at is None:
        return _good_checkpoint_sentence(newest, start, finetune)
    replayed = nonfinite_loss_at - 1
    suspects = [checkpoint for checkpoint in (newest, None if finetune else start)
                if checkpoint is not None and _iteration_of(checkpoint) >= replayed]
    if not suspects:
        return _good_checkpoint_sentence(newest, start, finetune)
    older = [_newest_before(suspect.parent, replayed) for suspect in suspects]
    left = [checkpoint for checkpoint in (newest, *older)
            if checkpoint is not None and checkpoint not in suspects]
    newest = max(left, key=_iteration_of, default=None)
    start = None if start in suspects else start
    passed_over = max(suspects, key=_iteration_of)
    because = passed_over_because or (f"its weights gave this loss on iteration "
                                      f"{nonfinite_loss_at}'s batch, which resuming from it "
                                      f"replays")
    passed = f"{passed_over} (iteration {_iteration_of(passed_over)}) is passed over: {because}. "
    if newest is None and start is None:
        return passed + "No checkpoint before it was found: start again."
    good = _good_checkpoint_sentence(newest, start, finetune, passed_over=True)
    point = _resume_point(newest, start, finetune)
    first_iteration = 0 if finetune and point is start else _iteration_of(point)
    return passed + good + _move_aside_advice(passed_over, first_iteration, "diverging")


def _good_checkpoint_sentence(newest: Path | None, start: Path | None, finetune: bool,
                              passed_over: bool = False) -> str:
    """`describe_good_checkpoint`'s advice for the checkpoints left to go back to: `newest` under
    --save and `start`, the run's own. `passed_over`: a newer checkpoint was passed over, which
    the pointer file names, so the advice picks `newest` with --ckpt-step."""
    if newest is not None and _resume_point(newest, start, finetune) is newest:
        iteration = _iteration_of(newest)
        label, step = (("The newest checkpoint before it", f" --ckpt-step {iteration}")
                       if passed_over else ("The newest checkpoint", f" (or --ckpt-step "
                                                                     f"{iteration})"))
        return (f"{label}, {newest} (iteration {iteration}), held finite weights when it was "
                f"saved: resume from it with --load {newest.parent}{step}, after changing what "
                f"made the run diverge.")
    if start is not None and finetune:
        saved = "before it" if passed_over else "yet"
        return (f"No checkpoint of this fine-tuning run was saved {saved}: fine-tune again from "
                f"{start} (--load {start} --finetune), after changing what made the run diverge.")
    if start is not None:
        return (f"No checkpoint was saved after {start} (iteration {_iteration_of(start)}), "
                f"which this run resumed from: resume from it again with --load {start}, after "
                f"changing what made the run diverge.")
    return "No checkpoint was saved before (none under --save): start again."


def _resume_point(newest: Path | None, start: Path | None, finetune: bool) -> Path | None:
    """The checkpoint `_good_checkpoint_sentence` advises: `newest` unless the checkpoint the
    run resumed from (`start`) is newer, or none of this fine-tuning run was saved."""
    if newest is not None and (start is None or finetune
                               or _iteration_of(newest) >= _iteration_of(start)):
        return newest
    return start


def _newest_before(root: Path, iteration: int) -> Path | None:
    """The newest complete checkpoint under `root` of an iteration before `iteration`, if any."""
    older = {i: path for i, path in _complete_checkpoints(root).items() if i < iteration}
    return older[max(older)] if older else None


def _iteration_of(checkpoint: Path) -> int:
    """The iteration of a checkpoint directory `iter_XXXXXXX`."""
    return int(_COMPLETE_NAME.match(checkpoint.name).group(1))


def _broadcast_from_rank0(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- loading ----------------------------------------------------------------------------

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
    if load_rng and metadata["parallel_layout"] != _parallel_layout():
        logger.warning(
            "checkpoint %s was saved with parallel layout %s, this run uses %s: RNG states are not "
            "restored (dropout streams start fresh)", path, metadata["parallel_layout"],
            _parallel_layout())
        load_rng = False

    state = _model_sharded_state_dict(model_chunks)
    saved_tensors = safe_pickle.saved_tensors_metadata(path)
    _check_model_shapes(state, saved_tensors, path)
    if load_optim:
        state["optimizer"] = optimizer_state.sharded_state_to_load(
            optimizer, state, metadata["sharded_state_metadata"])
        _check_optimizer_tensors(state["optimizer"], saved_tensors, path, metadata["args"], args)
    if load_rng:
        state["rng_state"] = rng_sharded_object()
    loaded = mcore_load.load_sharded(state, path)

    for key, chunk in zip(_model_keys(model_chunks), _unwrap(model_chunks), strict=True):
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


def holds_weights_only(metadata: dict[str, Any]) -> bool:
    """Whether the checkpoint of `metadata` (its `lst_checkpoint.json`) was saved without an
    optimizer, as `lst-convert portable-to-dist` saves: no schedule and no training position.
    A training run saves both with every checkpoint."""
    return metadata["scheduler"] is None and "consumed_samples" not in metadata["extra_state"]


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


def check_training_metadata(metadata: dict[str, Any], path: Path) -> None:
    """Refuse, naming the field, a `lst_checkpoint.json` without a field `save_checkpoint`
    writes, or with one of another type, a vocabulary that is not a joint vocabulary layout, or
    a model record that is not an object (the file is written after the manifest, so no digest
    covers it)."""
    from megatron_lst.checkpoint.model_config import MODEL_KEY

    wrong = mistyped_fields(metadata, _TRAINING_METADATA_FIELDS)
    if isinstance(metadata.get("vocab"), dict):
        try:
            JointVocab.from_dict(metadata["vocab"])
        except VocabularyError as error:
            wrong.append(f"'vocab' ({error})")
    if metadata.get(MODEL_KEY) is not None and not isinstance(metadata[MODEL_KEY], dict):
        wrong.append(f"{MODEL_KEY!r} ({type(metadata[MODEL_KEY]).__name__})")
    if wrong:
        others = _other_complete_checkpoints(path)
        raise CheckpointError(
            f"{path / METADATA_FILENAME} is damaged: field(s) {', '.join(wrong)} are not what a "
            f"save writes. Restore the file from a copy, or load another checkpoint of "
            f"{path.parent} (complete ones: {others or 'none'}) with --ckpt-step N")


def verify_or_point_elsewhere(path: Path) -> None:
    """Collective: `integrity.verify_checkpoint(path)`, its error saying how to load another
    complete checkpoint of the same save directory instead (or restore its files), after
    loading the same one again where the check could not read it (the fault may pass)."""
    try:
        integrity.verify_checkpoint(path)
    except CheckpointIntegrityError as err:
        unreadable = isinstance(err, integrity.CheckpointUnreadableError)
        others = _other_complete_checkpoints(path)[::-1]  # newest first
        if not others:
            raise CheckpointIntegrityError(f"{err}\n" + _instead_of_loading(unreadable, (
                "restore its files from a copy (no other complete checkpoint is next to "
                "it)."))) from None
        kind = "unreadable" if unreadable else "damaged"
        raise CheckpointIntegrityError(f"{err}\n" + _instead_of_loading(unreadable, (
            f"load another one with --load {path.parent} --ckpt-step {others[0]} (or "
            f"--load {path.parent / checkpoint_name(others[0])}); complete checkpoints there: "
            f"{others}.{_move_aside_advice(path, others[0], kind)}"))) from None


def _instead_of_loading(unreadable: bool, instead: str) -> str:
    """`instead` (what to do rather than load a checkpoint its check refused, in lower case), as
    a sentence; led, where the check could not read the checkpoint (`unreadable`: EIO, a fault
    that may pass), by loading the same checkpoint again."""
    if unreadable:
        return (f"If the read error was transient (a storage or network fault), load the same "
                f"checkpoint again; if it persists, {instead}")
    return instead[0].upper() + instead[1:]


def _move_aside_advice(newer: Path, older: int, kind: str = "damaged") -> str:
    """How to resume from `older` into the save directory that still holds `newer` (a `kind`
    checkpoint): lst-train refuses a --save holding checkpoints newer than where the run starts
    (`checkpoint_flags._check_no_newer_checkpoints`). Empty when `newer` is not newer."""
    match = _COMPLETE_NAME.match(newer.name)
    if match is None or int(match.group(1)) < older:
        return ""
    aside = newer.parent / f"{kind}_{newer.name}"
    return (f" To resume from it with --save {newer.parent} again, first move the {kind} "
            f"checkpoint out of the way (nothing is deleted; lst-train refuses a --save holding "
            f"a newer checkpoint than where the run starts): mv {newer} {aside}")


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


# --- model and layout state ------------------------------------------------------------

def _unwrap(model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def _model_keys(model_chunks: list[torch.nn.Module]) -> list[str]:
    # Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... for virtual stages.
    if len(model_chunks) == 1:
        return ["model"]
    return [f"model{i}" for i in range(len(model_chunks))]


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if not model_chunks:
        raise ValueError("model_chunks is empty; pass this rank's model chunks")
    return {key: chunk.sharded_state_dict()
            for key, chunk in zip(_model_keys(model_chunks), _unwrap(model_chunks), strict=True)}


def _parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(with_context_parallel=True),
    }


