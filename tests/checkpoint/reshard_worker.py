"""Worker for test_reshard.py: Adam training steps of an `LSTModel` under one TP/PP layout,
around an `lst-train` checkpoint with optimizer state.

`--save DIR`: load the portable weights, take step 1, save the checkpoint (model + optimizer),
take steps 2 and 3; reports the three losses.
`--load DIR`: load the checkpoint twice, with the optimizer state and without it (weights only),
and take steps 2 and 3 after each; reports both pairs of losses.
Steps use megatron's DDP, forward-backward schedule, `finalize_lst_model_grads` and
`get_megatron_optimizer`, as the training loop does.
"""

import argparse

import torch
from distributed.harness import report_results
from distributed.lst_stage import cpu_stage, mean_loss_forward_step

from checkpoint.layout_worker import start_layout_worker
from megatron_lst.checkpoint.dist import training_args_for
from megatron_lst.checkpoint.model_state import load_full_state_dict
from megatron_lst.checkpoint.verify import fixed_batch
from megatron_lst.models import finalize_lst_model_grads
from megatron_lst.parallel import destroy_parallel
from megatron_lst.training.checkpoint_load import load_checkpoint
from megatron_lst.training.checkpoint_save import save_checkpoint


def build(config, tp: int, pp: int):
    """`(DDP-wrapped model, megatron Adam)` for this rank's stage."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, params_dtype=torch.float32)
    model = cpu_stage(config, megatron_config)
    ddp = DistributedDataParallel(
        config=megatron_config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model)
    megatron_config.finalize_model_grads_func = finalize_lst_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
                        params_dtype=torch.float32), [ddp])
    return ddp, optimizer


def train_step(ddp, optimizer, config, step: int) -> float | None:
    """One optimizer step on the batch of `step`; the loss on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = fixed_batch(config, seed=step)
    if config.documents is not None:  # rows packing documents: one ends every 11 tokens
        batch["tokens"][:, 10::11] = config.documents.eos_id
    batch["labels"] = batch["tokens"].roll(-1, dims=1)
    batch["loss_mask"] = torch.ones(batch["tokens"].shape)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=mean_loss_forward_step, data_iterator=iter([batch]), model=[ddp],
        num_microbatches=1, seq_length=batch["patch_lengths"].shape[1],
        micro_batch_size=batch["tokens"].shape[0], forward_only=False)
    succeeded, _, _ = optimizer.step()
    assert succeeded
    return reduced[0]["loss"].item() if parallel_state.is_pipeline_last_stage() else None


def main() -> None:
    args, portable = start_layout_worker(__doc__)
    config = portable.config
    record = {}
    if args.save:
        ddp, optimizer = build(config, args.tp, args.pp)
        load_full_state_dict(ddp.module, portable.state, args.portable)
        optimizer.reload_model_params()
        record["step1"] = train_step(ddp, optimizer, config, 1)
        save_checkpoint(1, [ddp], optimizer, None, argparse.Namespace(**training_args_for(config)),
                        {"consumed_samples": 2}, args.save, portable.vocab)
        record["steps"] = [train_step(ddp, optimizer, config, step) for step in (2, 3)]
    else:
        for variant, flags in (("with_optimizer", {}), ("weights_only", {"no_load_optim": True})):
            ddp, optimizer = build(config, args.tp, args.pp)
            run = argparse.Namespace(**training_args_for(config), no_load_rng=True, **flags)
            loaded = load_checkpoint(args.load, [ddp], optimizer, None, run, portable.vocab)
            assert loaded.iteration == 1 and loaded.extra_state == {"consumed_samples": 2}
            record[variant] = [train_step(ddp, optimizer, config, step) for step in (2, 3)]
    report_results(args.results, record)
    destroy_parallel()


if __name__ == "__main__":
    main()
