"""The megatron.core optimizer config and LR / weight-decay scheduler a run's flags describe.

Megatron-LM counts scheduler steps in samples, not iterations: the scheduler is built with
`--lr-warmup-iters`, `--lr-decay-iters` and `--train-iters` times the global batch size and is
advanced with `scheduler.step(increment=global_batch_size)` after every iteration, so its state
in a checkpoint is the number of samples consumed.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    """The megatron.core optimizer config of validated `args` (see `validate_args`)."""
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=getattr(torch, args.params_dtype_name),
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=getattr(args, "overlap_param_gather", False),
    )


def scheduler_from_args(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Megatron-LM's `get_optimizer_param_scheduler` for validated `args`, in samples."""
    samples_per_iteration = args.global_batch_size
    wsd_decay_steps = (args.lr_wsd_decay_iters * samples_per_iteration
                       if args.lr_wsd_decay_iters is not None else None)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * samples_per_iteration,
        lr_decay_steps=args.lr_decay_iters * samples_per_iteration,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * samples_per_iteration,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        # A resume has passed `resume_check.check_resume_flags`: the checkpoint's schedule
        # (in samples) is kept unless --override-opt_param-scheduler asks for the flags'.
        override_opt_param_scheduler=getattr(args, "override_opt_param_scheduler", False),
        use_checkpoint_opt_param_scheduler=not getattr(args, "override_opt_param_scheduler", False),
    )
