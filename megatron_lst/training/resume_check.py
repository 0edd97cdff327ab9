"""What a resumed run may change of the data and patching flags its checkpoint was trained with.

A checkpoint keeps the run's flags (`args` in its `lst_checkpoint.json`) and its position in the
training data (`consumed_samples`). That position only means something under the flags that
built the training rows: row r of the training order is cut (`--seq-length` patches within a
`--max-tokens` budget) and patched (`--patching-mode` and its parameters) from the documents the
`--seed` orders and lays out (`--speech-only-fraction`; `--task` makes other rows altogether;
`--split` cuts the training documents of each `--data-path` dataset), and under curriculum
patching its training step is `r // --global-batch-size`.
A resume that changes any of these would continue at row `consumed_samples` of another row
sequence (rows repeated or skipped, the curriculum moved), so it is refused with the flag's
saved value; a patching parameter counts only under the modes that read it
(`PATCHING_MODES_READING`: the curriculum's steps do not patch a static run). Changes that keep
the rows (the data paths of moved datasets, the micro-batch size) are allowed with a note, as is
raising the global batch size without a curriculum.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training.args_json import args_to_dict
from megatron_lst.training.flag_checks import flag_name

# Flags that decide the training rows and their patching, and why.
ROW_FLAGS = {
    "patching_mode": "patches every row",
    "patch_size": "patches every row",
    "silence_patching": "patches every row",
    "curriculum_tau1": "sets the curriculum",
    "curriculum_tau2": "sets the curriculum",
    "mixed_static_prob": "patches every row",
    "seq_length": "cuts the documents into rows",
    "max_tokens": "cuts the documents into rows",
    "seed": "orders the documents",
    "speech_only_fraction": "lays out the speech documents",
    "task": "makes the rows",
}
# The patching flags of ROW_FLAGS and the --patching-mode values that read them (`Patcher`:
# static runs of --patch-size, aligned words and --silence-patching, mixed and curriculum draw
# one of the two); under the other modes they build no row, and a resume may change them.
PATCHING_MODES_READING = {
    "patch_size": ("static", "mixed", "curriculum"),
    "silence_patching": ("aligned", "mixed", "curriculum"),
    "curriculum_tau1": ("curriculum",),
    "curriculum_tau2": ("curriculum",),
    "mixed_static_prob": ("mixed",),
}
# Flags of the learning-rate and weight-decay schedule a checkpoint continues.
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_iters",
                  "lr_warmup_init", "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay")
# Flags that may name the same data otherwise, or regroup the same rows: a note.
NOTED_FLAGS = ("data_path", "train_data_path", "split", "tokenizer_model", "micro_batch_size")


class ResumeConfigError(CheckpointError):
    """A resume whose flags would continue at the wrong place of the training data."""


@dataclass(frozen=True)
class ResumePosition:
    """Where the checkpoint stands in the training data."""

    iteration: int
    consumed_samples: int


def check_resume_flags(saved: Mapping[str, Any], args: argparse.Namespace,
                       position: ResumePosition, checkpoint: str) -> list[str]:
    """Notes on the allowed changes of the data flags of `args` against `saved` (the
    checkpoint's flags); raises ResumeConfigError for a change that breaks the data position.
    Flags the checkpoint does not record (saved by older code) are not compared."""
    current = args_to_dict(args)  # the values as the checkpoint's JSON holds them

    def changed(name: str) -> bool:
        return name in saved and saved[name] != current.get(name)

    refused = [f"{flag_name(name)} {saved[name]} -> {current.get(name)} (it {why})"
               for name, why in ROW_FLAGS.items()
               if changed(name) and _builds_rows(name, saved.get("patching_mode"))]
    refused += _training_split_change(saved, current)
    if refused:
        raise ResumeConfigError(
            f"checkpoint {checkpoint} stands at sample {position.consumed_samples} of the "
            f"training rows built by its flags; this run changes {'; '.join(refused)}, so it "
            f"would continue at that sample of other rows (data repeated or skipped). Resume "
            f"with the checkpoint's values, or start a new schedule from its weights with "
            f"--finetune")
    _check_optimizer_precision(saved, args, checkpoint)
    _check_optimizer_kind(saved, args, checkpoint)
    _check_optimizer_algorithm(saved, args, checkpoint)
    batch_notes = _check_global_batch_size(saved, args, position, checkpoint)
    notes = [f"{flag_name(name)} changed from {saved[name]} to {current.get(name)}"
             for name in NOTED_FLAGS if changed(name)]
    notes += _check_schedule_flags(saved, current, args, checkpoint)
    if any(changed(name) for name in ("data_path", "train_data_path")):
        notes.append(f"the run continues at sample {position.consumed_samples} of the data "
                     f"these flags name; if it is not the data the checkpoint was trained on, "
                     f"samples are repeated or skipped")
    return notes + batch_notes


def _training_split_change(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The refusal of a `--split` change that moves the training part of the `--data-path`
    datasets (the first share, `data_provider.split_shares`), none otherwise: a change of the
    validation and test parts alone, or a run that takes its training data whole
    (`--train-data-path`), keeps the training rows."""
    from megatron_lst.training.data_provider import split_shares

    if "split" not in saved or saved.get("data_path") is None or current.get("data_path") is None:
        return []
    before, after = split_shares(saved["split"])[0], split_shares(current["split"])[0]
    if before == after:
        return []
    return [f"--split {saved['split']} -> {current['split']} (it cuts the training documents "
            f"of each --data-path dataset: the first {before:.4g} of them -> {after:.4g})"]


def _builds_rows(name: str, patching_mode: str | None) -> bool:
    """Whether row flag `name` builds the rows of a run patched by `patching_mode` (None: not
    recorded, every flag counts). A change of the mode itself is refused on its own."""
    modes = PATCHING_MODES_READING.get(name)
    return modes is None or patching_mode is None or patching_mode in modes


# The precision flags of each parameter dtype `validate_args` derives.
_PRECISION_FLAGS = {"float32": "neither --bf16 nor --fp16", "bfloat16": "--bf16",
                    "float16": "--fp16"}


def _check_optimizer_precision(saved: Mapping[str, Any], args: argparse.Namespace,
                               checkpoint: str) -> None:
    """Mixed precision (--bf16, --fp16) keeps fp32 main weights in the optimizer state and fp32
    training does not, so the optimizer state of one does not load into the other (megatron.core
    fails with a KeyError on a missing state key)."""
    old, new = saved.get("params_dtype_name"), getattr(args, "params_dtype_name", None)
    if old is None or new is None or getattr(args, "no_load_optim", False):
        return
    if (old == "float32") != (new == "float32"):
        raise ResumeConfigError(
            f"checkpoint {checkpoint} was trained in {old} ({_PRECISION_FLAGS[old]}) and this "
            f"run trains in {new} ({_PRECISION_FLAGS[new]}): their optimizer states differ (mixed "
            f"precision keeps fp32 main weights). Resume with {_PRECISION_FLAGS[old]}, or add "
            f"--no-load-optim to go on with a fresh optimizer state and learning-rate schedule")


def _check_optimizer_kind(saved: Mapping[str, Any], args: argparse.Namespace,
                          checkpoint: str) -> None:
    """The plain and the distributed optimizer lay their states out differently in a checkpoint,
    so neither loads the other's (megatron.core fails with a KeyError: on a missing state key,
    or on 'pre_wd_mult' of a parameter group)."""
    old = saved.get("use_distributed_optimizer")
    new = getattr(args, "use_distributed_optimizer", None)
    if old is None or new is None or old == new or getattr(args, "no_load_optim", False):
        return
    raise ResumeConfigError(
        f"checkpoint {checkpoint} was trained {_with(old)} --use-distributed-optimizer and this "
        f"run is started {_with(new)} it: the plain and the distributed optimizer store their "
        f"states differently and neither loads the other's. Resume {_with(old)} "
        f"--use-distributed-optimizer (the data-parallel size may change), or add "
        f"--no-load-optim to go on with a fresh optimizer state and learning-rate schedule")


def _check_optimizer_algorithm(saved: Mapping[str, Any], args: argparse.Namespace,
                               checkpoint: str) -> None:
    """Adam keeps two moments per weight and SGD a momentum buffer, so neither loads the other's
    state (it used to be refused only once the datasets and the model were built)."""
    old, new = saved.get("optimizer"), getattr(args, "optimizer", None)
    if old is None or new is None or old == new or getattr(args, "no_load_optim", False):
        return
    raise ResumeConfigError(
        f"checkpoint {checkpoint} was trained with --optimizer {old} and this run uses "
        f"--optimizer {new}: their optimizer states hold other tensors. Resume with --optimizer "
        f"{old}, or add --no-load-optim to go on from its weights with a fresh optimizer state "
        f"and learning-rate schedule")


def _check_schedule_flags(saved: Mapping[str, Any], current: Mapping[str, Any],
                          args: argparse.Namespace, checkpoint: str) -> list[str]:
    """A resume continues the checkpoint's learning-rate and weight-decay schedule; one whose
    schedule flags or --global-batch-size (the schedule counts samples) differ must say which
    schedule it wants, as in Megatron-LM:
    --use-checkpoint-opt_param-scheduler keeps the checkpoint's (a note),
    --override-opt_param-scheduler takes the flags' (a note); without either it is refused.
    `current`: `args` as the checkpoint's JSON holds them. Not compared with --no-load-optim,
    which loads no schedule."""
    if getattr(args, "no_load_optim", False):
        return []
    changes = [f"{flag_name(name)} {saved[name]} -> {current.get(name)}" for name in SCHEDULE_FLAGS
               if name in saved and saved[name] != current.get(name)]
    changes += _schedule_batch_size_change(saved, args)
    if not changes:
        return []
    if getattr(args, "use_checkpoint_opt_param_scheduler", False):
        return [f"the checkpoint's learning-rate schedule is kept "
                f"(--use-checkpoint-opt_param-scheduler), not this run's {'; '.join(changes)}"]
    if getattr(args, "override_opt_param_scheduler", False):
        return [f"this run's learning-rate schedule replaces the checkpoint's "
                f"(--override-opt_param-scheduler): {'; '.join(changes)}"]
    raise ResumeConfigError(
        f"checkpoint {checkpoint} continues a learning-rate schedule that this run's flags "
        f"change: {'; '.join(changes)} (--lr-decay-iters defaults to --train-iters). Resume "
        f"with the checkpoint's values, add --override-opt_param-scheduler to follow this "
        f"run's flags from the checkpoint's position, or --use-checkpoint-opt_param-scheduler "
        f"to keep the checkpoint's schedule")


def _schedule_batch_size_change(saved: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    """The schedule counts samples (`schedule.scheduler_from_args`): its warm-up and decay end at
    their iterations times --global-batch-size, so another batch size moves them (the
    checkpoint's decay, kept, ended early). Compared where the checkpoint records its schedule."""
    old, new = saved.get("global_batch_size"), getattr(args, "global_batch_size", None)
    if old is None or old == new or not any(name in saved for name in SCHEDULE_FLAGS):
        return []
    return [f"--global-batch-size {old} -> {new} (the schedule counts samples: warm-up and decay "
            f"end at their iterations x --global-batch-size)"]


def _with(flag_given: bool) -> str:
    return "with" if flag_given else "without"


def _check_global_batch_size(saved: Mapping[str, Any], args: argparse.Namespace,
                             position: ResumePosition, checkpoint: str) -> list[str]:
    old = saved.get("global_batch_size")
    if old is None:  # not recorded by the run that saved it
        return []
    new = args.global_batch_size
    if old == new:
        return []
    consumed, done, total = position.consumed_samples, position.iteration, args.train_iters
    if args.patching_mode == "curriculum":
        raise ResumeConfigError(
            f"--global-batch-size {old} -> {new}: under curriculum patching the training step "
            f"of row r is r // --global-batch-size, so row {consumed}, where the run continues, "
            f"would be patched as step {consumed // new} instead of {done}. Resume checkpoint "
            f"{checkpoint} with --global-batch-size {old}, or start a new schedule from its "
            f"weights with --finetune")
    if consumed > done * new:
        # The training data holds train_iters x global_batch_size rows, as if every iteration
        # had taken the new batch size; the remaining iterations start at row `consumed`.
        needed = consumed + (total - done) * new
        raise ResumeConfigError(
            f"--global-batch-size {old} -> {new}: checkpoint {checkpoint} consumed {consumed} "
            f"samples in {done} iterations of {old}. The training data holds --train-iters x "
            f"--global-batch-size = {total} x {new} = {total * new} rows, and the {total - done} "
            f"iterations left would read rows {consumed}..{needed - 1}: {needed - total * new} "
            f"rows short, and short by {consumed - done * new} rows whatever --train-iters is, "
            f"so raising it does not help. Resume with --global-batch-size {old} (or larger), or "
            f"start a new schedule from the weights with --finetune")
    return [f"--global-batch-size changed from {old} to {new}: the run continues at sample "
            f"{consumed}, {new} samples per iteration"]
