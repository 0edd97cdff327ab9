"""Which checkpoint to resume from after a divergence (`describe_good_checkpoint`), and how to
resume from an older one into a save directory that holds a newer one (`move_aside_advice`)."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training.checkpoint_discovery import complete_checkpoints, find_latest_checkpoint
from megatron_lst.training.checkpointing import COMPLETE_NAME


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
    return passed + good + move_aside_advice(passed_over, first_iteration, "diverging")


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
    older = {i: path for i, path in complete_checkpoints(root).items() if i < iteration}
    return older[max(older)] if older else None


def _iteration_of(checkpoint: Path) -> int:
    """The iteration of a checkpoint directory `iter_XXXXXXX`."""
    return int(COMPLETE_NAME.match(checkpoint.name).group(1))


def move_aside_advice(newer: Path, older: int, kind: str = "damaged") -> str:
    """How to resume from `older` into the save directory that still holds `newer` (a `kind`
    checkpoint): lst-train refuses a --save holding checkpoints newer than where the run starts
    (`checkpoint_flags._check_no_newer_checkpoints`). Empty when `newer` is not newer."""
    match = COMPLETE_NAME.match(newer.name)
    if match is None or int(match.group(1)) < older:
        return ""
    aside = newer.parent / f"{kind}_{newer.name}"
    return (f" To resume from it with --save {newer.parent} again, first move the {kind} "
            f"checkpoint out of the way (nothing is deleted; lst-train refuses a --save holding "
            f"a newer checkpoint than where the run starts): mv {newer} {aside}")
