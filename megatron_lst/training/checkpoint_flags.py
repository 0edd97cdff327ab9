"""The checks of `arguments.validate_args` for the flags that name checkpoints and directories.

`--load` (with `--ckpt-step`, `--finetune`, `--use-checkpoint-args`) must name a complete
checkpoint, whose model configuration then fills in the model flags not given; `--save` must be a
directory that can be written and holds no checkpoint newer than where the run starts, nor, for
a run resuming a checkpoint of another directory, one of another run;
`--tensorboard-dir` must be writable. Each raises ArgumentError naming the flag and the fix. The
checkpoint modules are imported inside the functions: they import megatron.core, which parsing
flags must not need.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training import model_flags
from megatron_lst.training.flag_checks import ArgumentError, require_positive
from megatron_lst.training.foreign_checkpoints import foreign_checkpoint_advice
from megatron_lst.training.resume_check import ResumeConfigError

logger = logging.getLogger(__name__)


class DamagedCheckpointFlagError(ArgumentError, CheckpointError):
    """A flag check's refusal of the checkpoint a flag names, not of the flags: a damaged save
    directory or checkpoint record. lst-train exits with its checkpoint status (3) for it, as
    for the same damage found while loading; the flag checks' other refusals exit 2."""


class UnresumableFlagsError(ArgumentError, ResumeConfigError):
    """A resume that the flags of the `--load` checkpoint refuse
    (`resume_check.check_resume_flags`), found by the flag checks: lst-train exits with its
    checkpoint status (3), as when loading finds it."""


def adopt_model_from_load(args: argparse.Namespace) -> None:
    """`--use-checkpoint-args`: the model of the checkpoint `--load` resumes or fine-tunes.

    A missing or broken `--load` (no checkpoint, a damaged pointer or `lst_checkpoint.json`) is
    left to `validate_checkpointing` and the loading to report; a model record that cannot be
    built from, or checked against the checkpoint's index, is refused here: building the model
    comes first.
    """
    if args.load is None or not args.use_checkpoint_args or not os.path.isdir(args.load):
        return
    from megatron_lst.checkpoint.model_config import read_model_config
    from megatron_lst.checkpoint.model_state import CheckpointContentError
    from megatron_lst.training.checkpoint_discovery import select_checkpoint
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    try:
        path = select_checkpoint(args.load, args.ckpt_step)
        # Lenient: a record lacking a field loading needs is named when loading starts.
        metadata = None if path is None else read_checkpoint_metadata(path, strict=False)
    except CheckpointError:
        return
    if path is None:
        return
    try:
        saved = read_model_config(metadata, path)
    except (CheckpointContentError, CheckpointError) as err:  # CheckpointError: the index
        raise DamagedCheckpointFlagError(f"--load {args.load}: {err}") from None
    if saved is None:
        return  # not an LST or baseline checkpoint: the model's shapes are checked on load
    if saved.baseline != (args.patching_mode == "none"):
        raise ArgumentError(
            f"checkpoint {path} holds {'a token baseline' if saved.baseline else 'an LST model'} "
            f"but --patching-mode {args.patching_mode} builds "
            f"{'the token baseline' if args.patching_mode == 'none' else 'an LST model'}; "
            + ("drop --patching-mode" if saved.baseline else
               f"give the --patching-mode it was trained with ({saved.patching_mode})"))
    try:
        model_flags.adopt_checkpoint_model(
            args, model_flags.flag_values(saved.config, saved.baseline), f"checkpoint {path}")
    except model_flags.CheckpointArgsConflict as err:
        raise ArgumentError(str(err)) from None


def choose_pretrained_or_own_checkpoint(args: argparse.Namespace) -> None:
    """`--pretrained-checkpoint` (Megatron-LM's): while `--load` holds no complete checkpoint,
    load the pretrained one instead, with `--finetune` (weights only, iteration 0); once it holds
    one (this run's own, saved before it was stopped), leave `--load` to resume it. Sets
    `args.load` and `args.finetune` accordingly."""
    from megatron_lst.training.checkpoint_discovery import select_checkpoint

    pretrained = args.pretrained_checkpoint
    if pretrained is None:
        return
    if args.load is None:
        raise ArgumentError(
            f"--pretrained-checkpoint {pretrained} is loaded only while --load holds no "
            f"checkpoint of this run: give --load, the run's own save directory (usually the "
            f"same as --save)")
    if args.finetune:
        raise ArgumentError(
            "--pretrained-checkpoint fine-tunes from it (weights only, iteration 0) by itself, "
            "and only until --load holds a checkpoint; with --finetune every resume would start "
            "again at iteration 0. Drop --finetune")
    if args.ckpt_step is not None:
        raise ArgumentError(
            f"--ckpt-step {args.ckpt_step} with --pretrained-checkpoint: a resumed run would "
            f"look for that step in --load {args.load}. To fine-tune from one pretrained step, "
            f"name its directory: --pretrained-checkpoint DIR/iter_XXXXXXX")
    _check_no_file_in_the_way("--load", args.load)
    _check_load_is_not_the_pretrained_run(args.load, pretrained)
    try:
        own = select_checkpoint(args.load) if os.path.isdir(args.load) else None
    except CheckpointError as err:
        raise DamagedCheckpointFlagError(f"--load {args.load}: {err}") from None
    if own is not None:
        logger.info("--load %s holds %s: resuming it (--pretrained-checkpoint %s is not loaded)",
                    args.load, own.name, pretrained)
        return
    _check_no_file_in_the_way("--pretrained-checkpoint", pretrained)
    try:
        found = select_checkpoint(pretrained) if os.path.isdir(pretrained) else None
    except CheckpointError as err:
        raise DamagedCheckpointFlagError(f"--pretrained-checkpoint {pretrained}: {err}") from None
    if found is None:
        other = foreign_checkpoint_advice(pretrained)
        raise ArgumentError(
            f"--pretrained-checkpoint {pretrained} holds no complete checkpoint (or does not "
            f"exist); name a directory written by lst-train --save, or one iter_XXXXXXX "
            f"directory in it" + (f". {other}" if other else ""))
    logger.info("--load %s holds no checkpoint yet: fine-tuning from --pretrained-checkpoint %s",
                args.load, found)
    if args.save is None:
        logger.warning("--pretrained-checkpoint %s without --save: this run saves no checkpoint "
                       "in --load %s, so a requeued run fine-tunes from the pretrained weights "
                       "again; give --save %s to resume instead", pretrained, args.load, args.load)
    args.load, args.finetune = pretrained, True


def _check_load_is_not_the_pretrained_run(load: str, pretrained: str) -> None:
    """Refuse a --load in the pretrained run's save directory (that directory, or one checkpoint
    in it): it holds a checkpoint, so the run resumed the pretraining run (its iteration,
    optimizer and data order, under the fine-tuning flags) and the pretrained weights were never
    fine-tuned from."""
    from megatron_lst.training.checkpointing import METADATA_FILENAME

    def run_directory(path: str) -> Path:
        resolved = Path(path).resolve()
        return resolved.parent if (resolved / METADATA_FILENAME).is_file() else resolved

    if run_directory(load) == run_directory(pretrained):
        raise ArgumentError(
            f"--load {load} is the directory of --pretrained-checkpoint {pretrained}, so the run "
            f"would resume the pretraining run instead of fine-tuning from it; give --load (and "
            f"--save) the fine-tuning run's own directory, e.g. --load FT_DIR --save FT_DIR")


def validate_checkpointing(args: argparse.Namespace) -> None:
    """--save-interval, --save and --load (directories or to be made ones), what needs --load
    (--finetune, --ckpt-step), and the checkpoint to load; sets `args.resume_from`."""
    require_positive(args, "save_interval")
    for flag, path in (("--save", args.save), ("--load", args.load)):
        if path is not None:
            _check_no_file_in_the_way(flag, path)
    if args.save_interval is not None and args.save is None:
        # Configs ship a save interval and leave the directory to the command line.
        logger.warning("--save-interval %d without --save: no checkpoints will be written",
                       args.save_interval)
    if args.finetune and args.load is None:
        raise ArgumentError("--finetune loads weights from --load DIR; give --load")
    if args.ckpt_step is not None and args.load is None:
        raise ArgumentError("--ckpt-step picks a checkpoint of --load DIR; give --load")
    latest = _checkpoint_to_load(args)
    args.resume_from = None if latest is None else str(latest)
    _check_no_newer_checkpoints(args, latest)
    _check_no_other_runs_checkpoints(args, latest)
    _check_save_pointer(args)


def check_resume_flags_before_loading(args: argparse.Namespace) -> None:
    """Refuse, before the datasets' row indices and the model are built (minutes on a large
    corpus), a resume of `args.resume_from` whose flags its checkpoint's refuse: the row, batch,
    precision, optimizer and schedule flags `resume_check.check_resume_flags` compares. Loading
    compares them again and logs its notes on the changes it allows; a checkpoint record it
    cannot read, or one of weights only, is left to loading to name."""
    from megatron_lst.training.checkpoint_metadata import (
        holds_weights_only,
        read_checkpoint_metadata,
    )
    from megatron_lst.training.resume_check import ResumePosition, check_resume_flags

    if args.resume_from is None or args.finetune:
        return
    try:
        metadata = read_checkpoint_metadata(args.resume_from)
    except CheckpointError:
        return
    if holds_weights_only(metadata):
        return
    position = ResumePosition(metadata["iteration"],
                              int(metadata["extra_state"].get("consumed_samples", 0)))
    try:
        check_resume_flags(metadata["args"], args, position, args.resume_from)
    except ResumeConfigError as err:
        raise UnresumableFlagsError(str(err)) from None


def _checkpoint_to_load(args: argparse.Namespace) -> Path | None:
    """The checkpoint --load (and --ckpt-step) name, or None: no --load, or the first run of an
    auto-resuming job (--save and --load the same directory, nothing saved yet)."""
    from megatron_lst.training.checkpoint_discovery import checkpoints_from, select_checkpoint
    from megatron_lst.training.checkpointing import METADATA_FILENAME

    if args.load is None:
        return None
    auto_resume = args.save is not None and os.path.abspath(args.save) == os.path.abspath(args.load)
    if not os.path.isdir(args.load):
        if auto_resume:
            return None
        raise ArgumentError(
            f"--load {args.load} does not exist; check the path, or pass the same directory "
            f"to --save and --load to resume automatically once a checkpoint exists"
        )
    try:
        latest = select_checkpoint(args.load, args.ckpt_step)
    except CheckpointError as err:
        # With a step, the checkpoint of that step is looked up and any refusal is of the flags
        # (--ckpt-step naming none); without, the save directory's pointer is read and any
        # refusal is of its damage (`find_latest_checkpoint`).
        refusal = ArgumentError if args.ckpt_step is not None else DamagedCheckpointFlagError
        raise refusal(f"--load {args.load}: {err}") from None
    if latest is None and not auto_resume:
        incomplete = [entry.name for entry in checkpoints_from(args.load, 0)]
        found = (f"its {', '.join(incomplete)} lack(s) {METADATA_FILENAME}, which every "
                 f"lst-train save writes last: a save that did not finish, or a checkpoint of "
                 f"another program (Megatron-LM's own have none)" if incomplete else
                 "no iter_XXXXXXX directory")
        other = foreign_checkpoint_advice(args.load)
        raise ArgumentError(
            f"--load {args.load} holds no complete checkpoint ({found}); point --load at a "
            f"directory written by lst-train --save" + (f". {other}" if other else "")
        )
    return latest


def _check_no_newer_checkpoints(args: argparse.Namespace, loaded: Path | None) -> None:
    """Refuse a --save directory holding checkpoints newer than the iteration the run starts
    from (`loaded`'s, 0 with --finetune or without one): its first save would collide with one
    of them only after training up to it, and one it does write would lie behind them (resuming
    loads the newest)."""
    from megatron_lst.training.checkpoint_discovery import checkpoints_from

    if args.save is None:
        return
    start = 0 if loaded is None or args.finetune else int(loaded.name.removeprefix("iter_"))
    newer = checkpoints_from(args.save, start + 1)
    if newer:
        if args.pretrained_checkpoint is not None:  # --load (not --save) is looked in to resume
            resume = (f"--pretrained-checkpoint resumes from --load only: give --load "
                      f"{args.save}, the same directory as --save")
        elif args.finetune:  # --finetune would start from iteration 0 again
            resume = (f"Resume from the newest with --load {args.save} and without --finetune "
                      f"(or fine-tune with --pretrained-checkpoint {args.load} --load "
                      f"{args.save} --save {args.save}, which resumes by itself when requeued)")
        else:
            resume = f"Resume from the newest with --load {args.save}"
        raise ArgumentError(
            f"--save {args.save} already holds {[entry.name for entry in newer]}, newer than "
            f"iteration {start} where this run starts: its checkpoints would collide with them or "
            f"lie behind them (resuming loads the newest). {resume}, or move those checkpoints "
            f"away, or pass another --save")


def _check_no_other_runs_checkpoints(args: argparse.Namespace, loaded: Path | None) -> None:
    """Refuse a --save directory holding checkpoints of another run than the one `loaded` (a
    checkpoint of another directory) continues (`checkpoint_discovery.checkpoints_of_another_run`):
    once this run saves there, --load of that directory, --ckpt-step and the advice after a
    divergence (the checkpoint before the one that diverged) could pick one of them."""
    from megatron_lst.training.checkpoint_discovery import checkpoints_of_another_run

    if args.save is None or loaded is None or loaded.parent.resolve() == Path(args.save).resolve():
        return
    others = checkpoints_of_another_run(args.save, loaded)
    if others:
        raise ArgumentError(
            f"--save {args.save} already holds {[entry.name for entry in others]}, and this run "
            f"resumes from {loaded}, outside it: nothing shows them to be of this run ({args.save} "
            f"holds no copy of {loaded.name}), yet once this run saves there, --load "
            f"{args.save} [--ckpt-step N] and the advice after a divergence could pick one of "
            f"them. Pass an empty --save, or --save {loaded.parent} to go on in the directory "
            f"of the checkpoint it resumes from, or move those checkpoints away")


def _check_save_pointer(args: argparse.Namespace) -> None:
    """Refuse a --save whose pointer file (`latest_checkpointed_iteration.txt`) is not a file
    (`checkpoint_discovery.check_tracker_is_a_file`): every save replaces it, and the first would
    fail after training up to it."""
    from megatron_lst.training.checkpoint_discovery import check_tracker_is_a_file

    if args.save is None:
        return
    try:
        check_tracker_is_a_file(args.save)
    except CheckpointError as err:
        raise DamagedCheckpointFlagError(f"--save {args.save}: {err}") from None


def _check_no_file_in_the_way(flag: str, path: str) -> None:
    """`path` is a directory or can be made one: neither it nor an ancestor is a file (saving
    would otherwise fail at the first write, after the datasets and the model are built)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        advice = ("give a directory (created if missing)" if flag == "--save" else
                  f"point {flag} at a --save directory, or one iter_XXXXXXX directory in it")
        if flag != "--save" and (other := foreign_checkpoint_advice(existing)) is not None:
            advice = f"{advice}. {other}"
        raise ArgumentError(f"{flag} {path}: {existing} is a file, not a directory; {advice}")


def check_save_writable(args: argparse.Namespace) -> None:
    """--save and --tensorboard-dir can be written (a read-only or full filesystem used to fail
    with a traceback: while the row-index cache was written to --save, or only at the first save;
    on the logging rank alone, the others waiting for it, when TensorBoard opened its directory)."""
    from megatron_lst.training.save_directory import SaveDirectoryError, check_writable

    try:
        if args.save is not None:
            check_writable(args.save)
        if args.tensorboard_dir is not None:
            check_writable(args.tensorboard_dir, "--tensorboard-dir", "the TensorBoard events")
    except SaveDirectoryError as err:
        raise ArgumentError(str(err)) from None
