"""The body of checkpoint_worker.py: train a tiny megatron.core GPTModel, save and resume.

One run parses real `lst-train` flags (`arguments.parse_args` + `validate_args`), builds a GPTModel
with dropout (so the RNG states matter), megatron DDP, a megatron optimizer and an
`OptimizerParamScheduler`, optionally resumes from `--load`, then trains on a fixed synthetic
batch sequence (batch i depends only on i) up to `--train-iters`, saving at `--save-at`. Flags of
this worker (the rest go to the argument parser):

  --save-at I [I ...]      iterations after which to save to --save
  --crash MODE             make the save at the last --save-at iteration die:
                             hang-after-write: write the data, create READY_FILE, then wait to be
                                               killed (the test sends SIGKILL)
                             exit-before-pointer: die after the rename, before the pointer update
  --verify-round-trip      after the first save, load it into a fresh model/optimizer/scheduler
                           and report what did not come back bit-for-bit (model, optimizer,
                           scheduler, RNG states); the run then continues unperturbed
  --eval                   report the loss on a held-out batch (eval mode, no dropout)
  --vocab-text-size V      save and load with the joint vocabulary of a V-piece text tokenizer
  --probe-load-errors      instead of training, load --load with the given vocabulary and into a
                           model with --hidden-size + 16; report the errors
  --mcore-019-layout       save as megatron.core 0.19 does (checkpoint/mcore_layouts.py)

Reports per rank: losses by iteration (last pipeline stage), the iteration it resumed from, the
eval loss.
"""

import argparse
import os
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from checkpoint.mcore_layouts import mcore_019_save
from distributed.harness import report_results

from megatron_lst.checkpoint import durable_files
from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.models.config import CUDA_FUSIONS
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training import checkpoint_load, checkpoint_save
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.schedule import optimizer_config_from_args, scheduler_from_args

VOCAB_SIZE = 128
READY_FILE = "ready-to-kill"


def build_model(args):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        **dict.fromkeys(CUDA_FUSIONS, False),
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB_SIZE,
        max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_training_state(args):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer

    model = build_model(args)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(optimizer_config_from_args(args), [model])
    return model, optimizer, scheduler_from_args(optimizer, args)


def synthetic_batch(args, index: int) -> dict:
    """Micro-batch `index` of the run: the same on every rank, layout and process."""
    generator = torch.Generator().manual_seed(1000 + index)
    shape = (args.micro_batch_size, args.seq_length + 1)
    tokens = torch.randint(0, VOCAB_SIZE, shape, generator=generator)
    return {
        "tokens": tokens[:, :-1],  # [b, s]
        "labels": tokens[:, 1:],  # [b, s]
        "loss_mask": torch.ones(args.micro_batch_size, args.seq_length),
        "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1),
    }


def masked_mean_loss(loss_mask, output_tensor):
    losses = output_tensor.float()  # [b, s]
    loss = (losses * loss_mask).sum() / loss_mask.sum()
    # A copy: megatron's schedule divides the returned loss by the micro-batch count in place.
    return loss, {"loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                   labels=batch["labels"])
    return output, partial(masked_mean_loss, batch["loss_mask"])


def run_schedule(model, args, batches, forward_only: bool) -> float | None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return sum(r["loss"].item() for r in reduced) / len(reduced)


def train_iteration(model, optimizer, scheduler, args, iteration: int) -> float | None:
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    first = (iteration * args.data_parallel_size + dp_rank) * args.num_micro_batches
    batches = [synthetic_batch(args, first + m) for m in range(args.num_micro_batches)]
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_schedule(model, args, batches, forward_only=False)
    succeeded, _, _ = optimizer.step()
    if not succeeded:
        raise RuntimeError(f"optimizer skipped iteration {iteration}")
    scheduler.step(increment=args.global_batch_size)
    return loss


def evaluate(model, args) -> float | None:
    model.eval()
    with torch.no_grad():
        loss = run_schedule(model, args, [synthetic_batch(args, 10**6)], forward_only=True)
    model.train()
    return loss


def rng_states() -> dict:
    """Every generator state a checkpoint restores, for comparison."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def equal(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return type(a) is type(b) and a == b


def flatten(state, prefix: str = "") -> dict:
    """Nested dicts/lists -> {"a.b.0": leaf}."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix: state}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def round_trip_mismatches(model, optimizer, scheduler, args, path) -> list[str]:
    """Load `path` into fresh objects; names of everything that differs from the live state."""
    saved_rng = flatten(rng_states())
    fresh_model, fresh_optimizer, fresh_scheduler = build_training_state(args)
    checkpoint_load.load_checkpoint(path.parent, [fresh_model], fresh_optimizer, fresh_scheduler,
                                    args)
    mismatches = []
    for (name, a), b in zip(model.module.state_dict().items(),
                            fresh_model.module.state_dict().values(), strict=True):
        if torch.is_tensor(a) and not torch.equal(a, b):
            mismatches.append(f"model {name}")
    live_optimizer = flatten(optimizer.state_dict())
    fresh_optimizer_state = flatten(fresh_optimizer.state_dict())
    if live_optimizer.keys() != fresh_optimizer_state.keys():
        mismatches.append("optimizer state keys")
    mismatches += [f"optimizer {name}" for name, value in live_optimizer.items()
                   if not equal(value, fresh_optimizer_state.get(name))]
    if scheduler.state_dict() != fresh_scheduler.state_dict():
        mismatches.append("scheduler")
    # Building the fresh model drew from the generators; loading must have rewound them to
    # the saved states, which is also where the live run continues from.
    mismatches += [f"rng {name}" for name, value in flatten(rng_states()).items()
                   if not equal(value, saved_rng[name])]
    return mismatches


def crash_during_save(mode: str, save_dir: str) -> None:
    """Make the next save die at the point `mode` names (see the module docstring)."""
    from megatron.core import dist_checkpointing

    if mode == "hang-after-write":
        real_save = dist_checkpointing.save

        def save_then_hang(state, directory, *a, **k):
            real_save(state, directory, *a, **k)
            Path(save_dir, READY_FILE).write_text(directory)
            time.sleep(600)

        dist_checkpointing.save = save_then_hang
    elif mode == "exit-before-pointer":
        def die(path, text):
            os._exit(17)

        durable_files.replace_file_durably = die
    else:
        raise ValueError(f"unknown --crash mode {mode!r}")


def load_errors(args, vocab) -> dict:
    """The errors of loading `args.load` with `vocab` and into a wider model."""
    errors = {}
    model, optimizer, scheduler = build_training_state(args)
    try:
        checkpoint_load.load_checkpoint(args.load, [model], optimizer, scheduler, args, vocab)
    except VocabularyError as err:
        errors["vocabulary"] = str(err)
    wider = argparse.Namespace(**vars(args))
    wider.hidden_size += 16
    wider.ffn_hidden_size = 4 * wider.hidden_size
    model, optimizer, scheduler = build_training_state(wider)
    try:
        checkpoint_load.load_checkpoint(args.load, [model], optimizer, scheduler, wider)
    except CheckpointError as err:
        errors["shape"] = str(err)
    return errors


def main() -> None:
    own = argparse.ArgumentParser(allow_abbrev=False)
    own.add_argument("--save-at", type=int, nargs="*", default=[])
    own.add_argument("--crash", default=None)
    own.add_argument("--verify-round-trip", action="store_true")
    own.add_argument("--eval", action="store_true")
    own.add_argument("--vocab-text-size", type=int, default=None)
    own.add_argument("--probe-load-errors", action="store_true")
    own.add_argument("--mcore-019-layout", action="store_true")
    own.add_argument("--results", required=True)
    mine, rest = own.parse_known_args()
    args = parse_args(rest)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args = validate_args(args, world_size)

    initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        seed=args.seed)
    vocab = JointVocab(mine.vocab_text_size) if mine.vocab_text_size is not None else None
    if mine.probe_load_errors:
        report_results(mine.results, load_errors(args, vocab))
        destroy_parallel()
        return
    if mine.mcore_019_layout:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save = mcore_019_save(dist_checkpointing.save)
    model, optimizer, scheduler = build_training_state(args)
    record = {"losses": {}, "resumed_from": None, "round_trip_mismatches": None}
    iteration = 0
    if args.load is not None:
        loaded = checkpoint_load.load_checkpoint(args.load, [model], optimizer, scheduler, args,
                                                 vocab)
        if loaded is not None:
            iteration = loaded.iteration
            record["resumed_from"] = iteration
            record["consumed_samples"] = loaded.extra_state["consumed_samples"]
    while iteration < args.train_iters:
        loss = train_iteration(model, optimizer, scheduler, args, iteration)
        iteration += 1
        record["losses"][iteration] = loss
        if iteration in mine.save_at:
            if mine.crash is not None and iteration == max(mine.save_at):
                crash_during_save(mine.crash, args.save)
            extra = {"consumed_samples": iteration * args.global_batch_size, "step": iteration}
            path = checkpoint_save.save_checkpoint(iteration, [model], optimizer, scheduler, args,
                                                   extra, args.save, vocab)
            if mine.verify_round_trip and record["round_trip_mismatches"] is None:
                record["round_trip_mismatches"] = round_trip_mismatches(
                    model, optimizer, scheduler, args, path)
    if mine.eval:
        record["eval_loss"] = evaluate(model, args)
    report_results(mine.results, record)
    destroy_parallel()
