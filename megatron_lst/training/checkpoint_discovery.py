"""Finding the checkpoints of a save directory (its layout: `checkpointing`): the newest complete
one, the one `--load` and `--ckpt-step` name, those of an iteration on, and the pointer file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from megatron_lst.checkpoint import integrity
from megatron_lst.checkpoint.errors import CheckpointError, CheckpointIntegrityError
from megatron_lst.checkpoint.record_files import MAX_POINTER_FILE_BYTES, read_record_file
from megatron_lst.training.checkpointing import (
    COMPLETE_NAME,
    METADATA_FILENAME,
    TEMPORARY_NAME,
    TRACKER_FILENAME,
    checkpoint_name,
)

logger = logging.getLogger(__name__)


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
    if COMPLETE_NAME.match(root.name) and _is_complete(root):
        return root
    complete = complete_checkpoints(root)
    if COMPLETE_NAME.match(root.name) and not complete:
        raise CheckpointError(_incomplete_checkpoint_message(root))
    pointed = read_tracker(root)
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
    if COMPLETE_NAME.match(root.name) and _is_complete(root):
        raise CheckpointError(f"--load {root} is one checkpoint; --ckpt-step {ckpt_step} picks "
                              f"one under a save directory: give one or the other")
    complete = complete_checkpoints(root) if root.is_dir() else {}
    if ckpt_step not in complete:
        raise CheckpointError(
            f"--ckpt-step {ckpt_step}: {root} holds no complete checkpoint of iteration "
            f"{ckpt_step}; complete ones: {sorted(complete) or 'none'}")
    return complete[ckpt_step]


def complete_checkpoints(root: Path) -> dict[int, Path]:
    """Complete checkpoints under `root` by iteration; reports interrupted saves."""
    complete: dict[int, Path] = {}
    leftovers: list[str] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if TEMPORARY_NAME.match(entry.name):
            leftovers.append(entry.name)
        elif (match := COMPLETE_NAME.match(entry.name)) and _is_complete(entry):
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
             if (match := COMPLETE_NAME.match(entry.name))}
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
    others = other_complete_checkpoints(path) if path.parent.is_dir() else []
    return (f"{path} is an incomplete checkpoint (no {' or '.join(_missing_markers(path))}): a "
            f"save that did not finish, or a damaged copy. Load a complete one of {path.parent} "
            f"({others or 'none found'}) with --load {path.parent} [--ckpt-step N]")


def other_complete_checkpoints(path: Path) -> list[int]:
    """The iterations of the complete checkpoints next to `path` (itself excluded), oldest first."""
    return sorted(i for i in complete_checkpoints(path.parent) if checkpoint_name(i) != path.name)


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


_MAX_ITERATION_DIGITS = 19


def read_tracker(root: Path) -> int | None:
    check_tracker_is_a_file(root)
    tracker = root / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    text = read_record_file(tracker, CheckpointError, "checkpoint pointer file",
                            MAX_POINTER_FILE_BYTES).decode("utf-8", errors="replace").strip()
    # At most 19 digits: int() of more than Python's digit limit was a raw ValueError, and no
    # run reaches an iteration past int64 (the iter_XXXXXXX names' and megatron's counters).
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_ITERATION_DIGITS):
        raise CheckpointError(
            f"{tracker} should hold an iteration number, found {text[:40]!r}; the save directory "
            f"is corrupt. Write the iteration of a complete iter_XXXXXXX directory into it"
        )
    return int(text)
