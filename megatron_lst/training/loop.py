"""The training loop of `pretrain_lst.py`: LST or the token baseline on megatron.core.

One iteration (Megatron-LM's `train_step`):

    zero the DDP gradient buffers
    forward_backward_func(num_micro_batches micro-batches)   megatron's schedule: no pipelining,
                                                             or 1F1B across pipeline stages
        forward_step: model(tokens, patch_lengths, labels) -> per-token CE [b, N] (last stage)
        loss_func:    (sum(CE * loss_mask), sum(loss_mask)) of the micro-batch
    finalize_lst_model_grads                                 DP reduction (sum), encoder-replica
                                                             sum under PP, divide by tokens
    optimizer.step()                                         clip, (un)scale, update; fp16 may skip
    scheduler.step(global_batch_size)

Loss reduction. The loss of an iteration is the token mean over the whole global batch:

    loss = sum over every real token of the global batch of CE / number of real tokens

(`loss_mask` marks real tokens). Each micro-batch's loss function returns its CE sum and its
token count; with `calculate_per_token_loss` megatron back-propagates the sums, sums gradients
(not averages) over data-parallel ranks, and `finalize_model_grads` divides them by the token
count summed over micro-batches and data-parallel ranks. So every real token weighs the same,
whatever micro-batch or rank it lands on, and the gradient is that of the loss above. The logged
loss is the same quotient, summed over micro-batches and all-reduced over data-parallel replicas.

The curriculum follows the global step without any state here: the dataset derives each row's
training step from its place in the training order (row // global_batch_size), and the sampler
resumes at `consumed_samples`, so a resumed run sees exactly the rows, and the patching, of an
uninterrupted one.

Evaluation, saving, metrics: every `--eval-interval` iterations and after the last one, the loss
on the validation rows (the same rows each time, see `data_provider`) and, with `--eval-data`,
story-completion accuracy (`story_eval`); a checkpoint to `--save`
every `--save-interval` iterations and after the last one; with `--save`, one JSON line per
iteration in `<save>/metrics.jsonl` (`metrics`; iteration, consumed samples, cumulative tokens and
model FLOPs, global positions, training loss, learning rate, step time, validation loss and story
accuracy where measured).

With --overlap-param-gather the optimizer step updates only this rank's shard of the weights
and the next forward pass all-gathers them bucket by bucket (megatron DDP's forward pre-hooks);
`ParamGatherHooks` (`param_gather`) finishes that gather before anything else reads the weights,
as Megatron-LM's `train` does.

Stopping early (`exit_conditions`): with --exit-signal-handler, an --exit-signal (SIGTERM by
default: preemption; SLURM's `--signal`), --exit-duration-in-mins or --exit-interval make the loop
finish the current iteration, save a checkpoint of it to `--save`, and return with `exit_reason`;
`pretrain_lst.py` then exits with status 0, as Megatron-LM does, and a batch script compares the
latest checkpoint with --train-iters to requeue (`examples/pretrain_lst_slurm.sbatch`). All ranks
agree on stopping through one all-reduce per iteration.

--profile, --manual-gc and --record-memory-history (`profiling.IterationHooks`) act before each
iteration and around validation: the profiler window of --profile-step-start ..
--profile-step-end, Python's garbage collection at the same points on every rank, and the CUDA
allocator's snapshot every --log-interval iterations and when training ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import torch

from megatron_lst.models import LSTConfig
from megatron_lst.models.loss import masked_token_sum
from megatron_lst.parallel import collective_device, destroy_parallel, initialize_parallel
from megatron_lst.rank_failures import outcome, share_or_stop
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training import checkpoint_load, checkpoint_save, save_directory, stop_together
from megatron_lst.training.data_fingerprint import FINGERPRINT_KEY, training_data_fingerprints
from megatron_lst.training.data_provider import (
    RunDatasets,
    build_datasets,
    build_loader,
    data_vocab,
    split_sources,
)
from megatron_lst.training.divergence import (
    NonFiniteGradientError,
    NonFiniteLossError,
    SkippedUpdates,
    check_grad_norm_finite,
    check_loss_finite,
    good_checkpoint,
)
from megatron_lst.training.exit_conditions import ExitConditions, ExitMonitor
from megatron_lst.training.flops import FlopBreakdown, ModelShape, flops_per_batch
from megatron_lst.training.metrics import METRICS_FILENAME, MetricsFile
from megatron_lst.training.model_provider import build_model_chunks
from megatron_lst.training.param_gather import ParamGatherHooks
from megatron_lst.training.profiling import IterationHooks
from megatron_lst.training.schedule import optimizer_config_from_args, scheduler_from_args
from megatron_lst.training.story_eval import StoryCompletionEval, format_accuracy
from megatron_lst.training.train_logging import (
    LoggingSetupError,
    build_training_logger,
)

logger = logging.getLogger(__name__)

LOSS_NAME = "lm loss"


@dataclass
class TrainingState:
    """Everything one rank trains with."""

    args: argparse.Namespace
    model: list[torch.nn.Module]
    """This rank's megatron DDP model chunks (one: no virtual pipeline stages)."""
    optimizer: Any
    scheduler: Any
    model_config: LSTConfig
    flop_shape: ModelShape
    vocab: JointVocab
    iteration: int = 0
    consumed_samples: int = 0
    flops: FlopBreakdown = field(default_factory=FlopBreakdown)
    """Cumulative model training FLOPs of the run, across resumes."""
    tokens: int = 0
    """Cumulative real tokens trained on, across resumes."""
    data_fingerprints: list[dict[str, Any]] = field(default_factory=list)
    """`data_fingerprint.training_data_fingerprints` of the training datasets."""

    def extra_state(self) -> dict[str, Any]:
        """The training position a checkpoint keeps besides model, optimizer and scheduler."""
        return {
            "consumed_samples": self.consumed_samples,
            "curriculum_step": self.iteration,
            "data_seed": self.args.seed,
            "flops": self.flops.as_dict(),
            "tokens": self.tokens,
            FINGERPRINT_KEY: self.data_fingerprints,
        }


@dataclass(frozen=True)
class StepResult:
    """One iteration, identical on every rank."""

    loss: float
    """Token mean of the CE over the global batch (see the module docstring)."""
    num_tokens: int
    """Real (loss-masked) tokens of the global batch."""
    flops: FlopBreakdown
    """Model training FLOPs of the global batch by part (`training.flops.flops_per_batch`)."""
    seconds: float
    learning_rate: float
    grad_norm: float | None
    loss_scale: float | None
    skipped: bool
    """The optimizer skipped the update (fp16 overflow)."""


@dataclass
class TrainingResult:
    """What `pretrain` did; losses are the same on every rank."""

    iteration: int
    consumed_samples: int
    resumed_from: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of every iteration this run trained, by iteration (1-based)."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by the iteration it was measured after."""
    story_accuracy: dict[int, dict[str, dict]] = field(default_factory=dict)
    """`--eval-data` story-completion results by iteration (per mode, see `evaluate_items`)."""
    flops: dict[int, float] = field(default_factory=dict)
    """Cumulative model training FLOPs after each iteration (resumed runs continue the count)."""
    tokens: int = 0
    """Real (loss-masked) tokens trained on by this run."""
    checkpoints: list[str] = field(default_factory=list)
    exit_reason: str | None = None
    """Why training stopped before --train-iters (`exit_conditions`); None when it did not."""


# --- set-up -----------------------------------------------------------------------------

def setup(args: argparse.Namespace, index_cache_dir: str | Path | None = None
          ) -> tuple[TrainingState, RunDatasets]:
    """Datasets, model, optimizer and scheduler of validated `args`; restores `--load`.

    Call after `initialize_parallel`.
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.utils import get_model_config

    if args.tensor_model_parallel_size > 1 and (args.data_path is not None
                                                or args.train_data_path is not None):
        # From the datasets' headers, before the row indices are built (minutes on a large
        # corpus); every rank reads them, and a broken dataset is named by each.
        _check_vocab_splits(data_vocab(args), args.tensor_model_parallel_size)
    datasets = build_datasets(args, index_cache_dir)
    args.num_units = datasets.vocab.num_units  # checkpoints record the vocabulary trained on
    model, model_config = build_model_chunks(args, datasets.vocab.size,
                                             eos_id=datasets.vocab.eos_id)
    optimizer = get_megatron_optimizer(optimizer_config_from_args(args), model)
    scheduler = scheduler_from_args(optimizer, args)
    # Megatron's schedules scale the loss through this before backward (fp16 loss scaling; a
    # no-op scale of 1 otherwise).
    get_model_config(model[0]).grad_scale_func = optimizer.scale_loss
    if args.save is not None:
        _check_room_for_checkpoint(args, model)
    shape = ModelShape.from_model_config(model_config)
    state = TrainingState(
        args=args, model=model, optimizer=optimizer, scheduler=scheduler,
        model_config=model_config,
        flop_shape=shape.baseline_of() if args.patching_mode == "none" else shape,
        vocab=datasets.vocab,
        # only a checkpoint keeps them (--save) or is compared with them (a resume's --load)
        data_fingerprints=(training_data_fingerprints(split_sources(args)["train"])
                           if args.save is not None or (args.load is not None
                                                        and not args.finetune) else []),
    )
    if args.load is not None:
        _restore(state)
    return state, datasets


def _check_room_for_checkpoint(args: argparse.Namespace, model: list[torch.nn.Module]) -> None:
    """Collective: every rank raises InsufficientSpaceError when --save cannot hold a
    checkpoint (rank 0 measures the free space; an error measuring it stops every rank too:
    `checkpoint_save.on_rank0`)."""
    needed = save_directory.checkpoint_bytes_lower_bound(
        model, args.optimizer, args.sgd_momentum, args.fp16 or args.bf16)
    checkpoint_save.on_rank0(lambda: save_directory.check_room_for_checkpoint(args.save, needed),
                             save_directory.InsufficientSpaceError)


def _check_vocab_splits(vocab: JointVocab, tensor_model_parallel_size: int) -> None:
    """The vocab-parallel embedding and output head split the datasets' vocabulary evenly over
    the tensor-parallel ranks: say so in terms of the flags before megatron.core builds them."""
    tp = tensor_model_parallel_size
    if vocab.size % tp:
        units = vocab.num_units + (-vocab.size) % tp
        raise VocabularyError(
            f"the datasets' joint vocabulary of {vocab.size} ids ({vocab.num_units} units) does "
            f"not split over --tensor-model-parallel-size {tp}; preprocess the datasets with "
            f"--num-units {units} (spare unit slots) or use another tensor-parallel size")


def _restore(state: TrainingState) -> None:
    args = state.args
    loaded = checkpoint_load.load_checkpoint(args.load, state.model, state.optimizer,
                                             state.scheduler, args, state.vocab,
                                             state.data_fingerprints)
    if loaded is None:
        logger.info("--load %s holds no checkpoint yet: starting from scratch", args.load)
        return
    state.iteration = loaded.iteration
    extra = loaded.extra_state
    state.consumed_samples = int(extra.get("consumed_samples", 0))
    state.tokens = int(extra.get("tokens", 0))
    if "flops" in extra:
        state.flops = FlopBreakdown(**{f.name: extra["flops"][f.name.rstrip("_")]
                                       for f in dataclasses.fields(FlopBreakdown)})
    if args.finetune:
        _print_rank0(f"fine-tuning from the weights of {loaded.path}: iteration 0, a new "
                     f"optimizer and schedule")
    else:
        _print_rank0(f"resumed from {loaded.path} at iteration {state.iteration}, "
                     f"{state.consumed_samples} samples consumed")


# --- one iteration ----------------------------------------------------------------------

def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple: (CE sum to back-propagate, token count, values to report)."""
    loss_sum, num_tokens = masked_token_sum(per_token_loss, loss_mask)
    report = torch.stack([loss_sum.detach(), num_tokens]).double()
    return loss_sum, num_tokens.int(), {LOSS_NAME: report}


class _ForwardStep:
    """Megatron's `forward_step_func`; on the last stage it also counts the micro-batch FLOPs.
    With `eod_id` (--eod-mask-loss) the loss leaves out the positions whose input is that token."""

    def __init__(self, flop_shape: ModelShape | None, eod_id: int | None = None):
        self.flop_shape = flop_shape
        self.eod_id = eod_id
        self.flops = FlopBreakdown()

    def __call__(self, data_iterator: Iterator | None, model: torch.nn.Module):
        if data_iterator is None:  # a middle stage (no documents): its input comes from the previous
            return model(None, None, None), partial(_loss_func, None)
        batch = next(data_iterator)
        if self.flop_shape is not None and _chunk_attr(model, "post_process"):
            self.flops += flops_per_batch(self.flop_shape, batch["patch_lengths"],
                                          batch["tokens"].shape[1])
        device = collective_device()
        tokens = batch["tokens"].to(device, non_blocking=True)  # [b, N]
        patch_lengths = batch["patch_lengths"].to(device, non_blocking=True)  # [b, P]
        labels = batch["labels"].to(device, non_blocking=True)  # [b, N]
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)  # [b, N]
        if self.eod_id is not None:
            loss_mask = loss_mask * (tokens != self.eod_id)
        return model(tokens, patch_lengths, labels), partial(_loss_func, loss_mask)


def _run_schedule(state: TrainingState, data_iterator: Iterator | None, forward_only: bool,
                  count_flops: bool) -> tuple[list[dict], FlopBreakdown]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = state.args
    forward_step = _ForwardStep(state.flop_shape if count_flops else None,
                                state.vocab.eos_id if args.eod_mask_loss else None)
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=args.num_micro_batches,
        seq_length=args.seq_length,  # global positions: the shape of pipeline messages
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    return losses_reduced, forward_step.flops


def _reduce_over_replicas(losses_reduced: list[dict], flops: FlopBreakdown
                          ) -> tuple[float, int, FlopBreakdown]:
    """(token-mean loss, tokens, FLOPs) of the global batch, the same on every rank.

    One rank per data-parallel replica (last pipeline stage, tensor-parallel rank 0) holds its
    micro-batches' sums; a world all-reduce adds the replicas and hands the result to every rank,
    so all of them agree on NaN checks, stopping and what they report.
    """
    from megatron.core import parallel_state

    parts = dataclasses.fields(FlopBreakdown)
    totals = torch.zeros(2 + len(parts), dtype=torch.float64, device=collective_device())
    if (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        for reduced in losses_reduced:
            totals[:2] += reduced[LOSS_NAME]
        totals[2:] = torch.tensor([getattr(flops, f.name) for f in parts], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    loss_sum, tokens, *flop_parts = totals.tolist()
    loss = loss_sum / tokens if tokens > 0 else math.nan
    return loss, int(tokens), FlopBreakdown(*flop_parts)


def train_step(state: TrainingState, data_iterator: Iterator | None) -> StepResult:
    """One iteration on `num_micro_batches` micro-batches of `data_iterator` (None on middle
    pipeline stages); advances the scheduler, not `state.iteration`."""
    args = state.args
    _synchronize()
    start = time.perf_counter()
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses_reduced, flops = _run_schedule(state, data_iterator, forward_only=False,
                                          count_flops=True)
    succeeded, grad_norm, _ = state.optimizer.step()
    if succeeded:
        state.scheduler.step(increment=args.global_batch_size)
    _synchronize()
    end = time.perf_counter()
    loss, tokens, total_flops = _reduce_over_replicas(losses_reduced, flops)
    return StepResult(
        loss=loss, num_tokens=tokens, flops=total_flops, seconds=end - start,
        learning_rate=state.optimizer.param_groups[0]["lr"],
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        loss_scale=float(state.optimizer.get_loss_scale()) if args.fp16 else None,
        skipped=not succeeded,
    )


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def evaluate(state: TrainingState, dataset: torch.utils.data.Dataset) -> float:
    """Token-mean validation loss over all of `dataset` (`eval_iters` global batches), in eval
    mode, without gradients; the same on every rank."""
    args = state.args
    iterator = _data_iterator(build_loader(dataset, args), state.model_config, state.model)
    for chunk in state.model:
        chunk.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for _ in range(args.eval_iters):
            losses_reduced, _ = _run_schedule(state, iterator, forward_only=True, count_flops=False)
            loss, batch_tokens, _ = _reduce_over_replicas(losses_reduced, FlopBreakdown())
            if batch_tokens:
                loss_sum += loss * batch_tokens
                tokens += batch_tokens
    for chunk in state.model:
        chunk.train()
    return loss_sum / tokens if tokens else math.nan


def _data_iterator(loader: torch.utils.data.DataLoader, model_config: LSTConfig,
                   model: list[torch.nn.Module]) -> Iterator | None | list[Iterator | None]:
    """What megatron's schedule reads the batches of the model chunks `model` from: one chunk's
    iterator, or with virtual pipeline stages a list of one per chunk. A chunk reads batches when
    it holds the first or the last stage, and with packed-document attention always (the stages
    in between find the documents of their global positions from the tokens); the others get
    None. The chunks of a rank that read batches share one pass over the loader (`tee`: each
    batch is loaded once, by one set of workers, and dropped once every such chunk has taken
    it; the interleaved schedule runs a chunk at most a few micro-batches ahead of another)."""
    reads = [model_config.documents is not None or _chunk_attr(chunk, "pre_process")
             or _chunk_attr(chunk, "post_process") for chunk in model]
    if not any(reads):
        return None if len(model) == 1 else [None] * len(model)
    shared = iter(itertools.tee(iter(loader), sum(reads)))
    iterators = [next(shared) if chunk_reads else None for chunk_reads in reads]
    return iterators[0] if len(iterators) == 1 else iterators


def _chunk_attr(chunk: torch.nn.Module, name: str):
    """Attribute `name` of the model inside megatron's wrappers of `chunk`."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(chunk, name)


# --- the run ----------------------------------------------------------------------------

def pretrain(args: argparse.Namespace, *, index_cache_dir: str | Path | None = None,
             stream: TextIO | None = None) -> TrainingResult:
    """Train validated `args` (see `arguments.validate_args`) in this process's torch.distributed
    world; sets up and tears down the parallel state. Returns what it did."""
    start_time = time.monotonic()  # --exit-duration-in-mins counts from here
    # The exit signals are watched from here on: one that arrives during setup (SLURM's warning
    # while a large checkpoint loads) stops the run after its first iteration, with a checkpoint.
    with ExitMonitor(ExitConditions.from_args(args), start_time) as exit_monitor:
        initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            args.virtual_pipeline_model_parallel_size,
                            seed=args.seed, timeout_minutes=args.distributed_timeout_minutes,
                            backend=args.distributed_backend)
        stop_together.arm()  # the ranks that stop on an error each print why before any exits
        try:
            with _save_directory_lock(args.save):
                state, datasets = setup(args, index_cache_dir)
                return _train(state, datasets, stream, exit_monitor)
        finally:
            destroy_parallel()


@contextlib.contextmanager
def _save_directory_lock(save_dir: str | None):
    """Collective: rank 0 holds the lock of `--save` for the block (`save_directory`); every rank
    raises SaveDirectoryLockError, before any work, when another run holds it or rank 0 cannot
    open its lock file."""
    if save_dir is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        checkpoint_save.on_rank0(
            lambda: stack.enter_context(save_directory.SaveDirectoryLock(save_dir)),
            save_directory.SaveDirectoryLockError)
        yield


def _train(state: TrainingState, datasets: RunDatasets, stream: TextIO | None,
           exit_monitor: ExitMonitor) -> TrainingResult:
    args = state.args
    world = torch.distributed.get_world_size()
    result = TrainingResult(iteration=state.iteration, consumed_samples=state.consumed_samples,
                            resumed_from=state.iteration if state.iteration else None)
    if state.iteration >= args.train_iters:
        _print_rank0(f"nothing to train: the checkpoint is at iteration {state.iteration} and "
                     f"--train-iters is {args.train_iters}")
        return result
    train_iterator = _data_iterator(build_loader(datasets.train, args, state.consumed_samples),
                                    state.model_config, state.model)
    is_logging_rank = torch.distributed.get_rank() == world - 1
    training_logger = _open_training_logger(args, world, state.iteration, stream)
    metrics = MetricsFile(Path(args.save) / METRICS_FILENAME
                          if args.save is not None and is_logging_rank else None,
                          start_iteration=state.iteration,
                          resumed_elsewhere=_resumed_elsewhere(args))
    story_eval = StoryCompletionEval.from_args(args, state.vocab)
    param_gather = ParamGatherHooks.from_args(state.model, args)
    skipped_updates = SkippedUpdates.from_args(args)
    hooks = IterationHooks.from_args(args, state.iteration, torch.distributed.get_rank(), world)
    for chunk in state.model:
        chunk.train()
    try:
        param_gather.start()
        hooks.start()
        while state.iteration < args.train_iters:
            hooks.before_iteration(state.iteration + 1)
            step = train_step(state, train_iterator)
            param_gather.after_step(step.skipped)
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            _record_step(state, step, result, training_logger)
            skipped_updates.check(args, state.iteration, step.skipped, step.loss_scale,
                                  step.loss)
            last = state.iteration == args.train_iters
            evaluating = state.iteration % args.eval_interval == 0 or last
            if evaluating and (datasets.valid is not None or story_eval is not None):
                with param_gather.synchronised(), hooks.evaluation():
                    _evaluate(state, datasets.valid, story_eval, result)
            metrics.write(_metrics_record(state, step, result.eval_losses.get(state.iteration),
                                          result.story_accuracy.get(state.iteration)))
            exit_reason = None if last else exit_monitor.reason(state.iteration)
            if args.save is not None and (exit_reason or last or (
                    args.save_interval and state.iteration % args.save_interval == 0)):
                with param_gather.synchronised(), exit_monitor.saving():
                    result.checkpoints.append(_save(state))
                if not exit_reason and not last:
                    # A signal (or the duration) that came during this periodic save stops the
                    # run now, with this checkpoint: not after one more iteration and a second
                    # save that the kill window may cut off.
                    exit_reason = exit_monitor.reason(state.iteration)
            if exit_reason:
                _print_rank0(f"exiting after iteration {state.iteration}: {exit_reason}")
                result.exit_reason = exit_reason
                break
        param_gather.finish()
    finally:
        try:
            training_logger.close()
            metrics.close()  # an OSError of its last flush (a full disk) propagates
        finally:  # automatic garbage collection back on, the profiler stopped, whatever happened
            hooks.close(state.iteration)
    result.iteration = state.iteration
    result.consumed_samples = state.consumed_samples
    return result


def _resumed_elsewhere(args: argparse.Namespace) -> bool:
    """Whether the run resumed from a checkpoint outside its --save directory (--load elsewhere)."""
    resume_from = getattr(args, "resume_from", None)
    return (resume_from is not None and args.save is not None
            and Path(resume_from).parent.resolve() != Path(args.save).resolve())


def _open_training_logger(args: argparse.Namespace, world: int, start_iteration: int,
                          stream: TextIO | None):
    """Collective: the training logger, whose writers (TensorBoard, W&B) the logging rank (the
    last) opens. When a rank cannot (W&B without a login or network), every rank raises
    LoggingSetupError with its error; the other ranks used to wait for it in the first
    collective, which broke with a gloo traceback once it exited."""
    # W&B and TensorBoard raise errors of their own: any is the logging rank's failure.
    training_logger, failure = outcome(lambda: build_training_logger(
        args, world_size=world, enabled=torch.distributed.get_rank() == world - 1,
        start_iteration=start_iteration, stream=stream))
    share_or_stop(None, failure, lambda failed: LoggingSetupError(
        f"rank {failed[0][0]} could not open the run's log writers (--tensorboard-dir, "
        f"--wandb-project): {failed[0][1]}. Fix what it names (for W&B: `wandb login`, or "
        f"WANDB_MODE=offline) or drop the flag"))
    return training_logger


def _record_step(state: TrainingState, step: StepResult, result: TrainingResult,
                 training_logger) -> None:
    # Also for an update fp16 skipped: its loss scale scales the gradients, not the forward
    # pass, so a non-finite loss is never the overflow the scaler recovers from, and a diverged
    # fp16 run would otherwise skip every step to the end.
    try:
        check_loss_finite({LOSS_NAME: step.loss}, state.iteration, fp16=state.args.fp16,
                          clip_grad=state.args.clip_grad)
    except NonFiniteLossError as err:
        good = good_checkpoint(state.args, state.iteration)
        raise NonFiniteLossError(f"{err}. {good}") from None
    try:
        check_grad_norm_finite(step.grad_norm, step.loss, state.iteration)
    except NonFiniteGradientError as err:
        good = good_checkpoint(state.args, state.iteration, passed_over_because=(
            f"its weights gave non-finite gradients on iteration {state.iteration}'s batch, "
            f"which resuming from it replays"))
        raise NonFiniteGradientError(f"{err}. {good}") from None
    state.flops = state.flops + step.flops  # a skipped update still cost its FLOPs
    state.tokens += step.num_tokens
    result.losses[state.iteration] = step.loss
    result.tokens += step.num_tokens
    result.flops[state.iteration] = state.flops.total
    training_logger.on_iteration(
        state.iteration, consumed_samples=state.consumed_samples,
        learning_rate=step.learning_rate, losses={LOSS_NAME: step.loss},
        step_seconds=step.seconds, num_tokens=step.num_tokens, grad_norm=step.grad_norm,
        loss_scale=step.loss_scale, flops=step.flops.total, skipped=step.skipped)


def _metrics_record(state: TrainingState, step: StepResult, valid_loss: float | None,
                    story_accuracy: dict[str, dict] | None) -> dict[str, Any]:
    """The `metrics.jsonl` line of the iteration `state` just finished."""
    record = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
              "tokens": state.tokens, "flops": state.flops.total,
              "global_positions": state.consumed_samples * state.args.seq_length,
              "loss": step.loss, "learning_rate": step.learning_rate,
              "step_seconds": step.seconds}
    if valid_loss is not None:
        record["valid_loss"] = valid_loss
    if story_accuracy is not None:
        record["story_accuracy"] = {mode: r["accuracy"] for mode, r in story_accuracy.items()}
    return record


def _evaluate(state: TrainingState, valid, story_eval: StoryCompletionEval | None,
              result: TrainingResult) -> None:
    """The validation loss and the story-completion accuracy, whichever the run measures."""
    if valid is not None:
        result.eval_losses[state.iteration] = _evaluate_and_print(state, valid)
    if story_eval is not None:
        accuracy = story_eval.run(state.model, state.vocab)
        _print_last_rank(format_accuracy(state.iteration, accuracy))
        result.story_accuracy[state.iteration] = accuracy


def _evaluate_and_print(state: TrainingState, dataset) -> float:
    loss = evaluate(state, dataset)
    perplexity = math.exp(min(loss, 20.0))
    _print_last_rank(f"validation loss at iteration {state.iteration} | {LOSS_NAME} value: "
                     f"{loss:.6E} | {LOSS_NAME} PPL: {perplexity:.6E}")
    return loss


def _save(state: TrainingState) -> str:
    args = state.args
    start = time.perf_counter()
    path = checkpoint_save.save_checkpoint(state.iteration, state.model, state.optimizer,
                                           state.scheduler, args, state.extra_state(), args.save,
                                           state.vocab)
    # The save time bounds the kill window a preemption must leave (docs/training.md).
    _print_rank0(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")
    return str(path)


def _print_rank0(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _print_last_rank(message: str) -> None:
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)
