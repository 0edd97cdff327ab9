"""Build this rank's model for a run: the `LSTConfig` the flags describe, its megatron.core
`TransformerConfig`, the model of this pipeline stage, and megatron's wrappers around it.

Wrapping follows Megatron-LM's `get_model`: `Float16Module` with --fp16/--bf16 (the module's
parameters in half precision, fp32 loss out of the last stage), then megatron's
`DistributedDataParallel` with gradients accumulated and reduced in fp32 in a contiguous buffer
(`param.main_grad`), which the megatron optimizer and `finalize_lst_model_grads` read.
"""

from __future__ import annotations

import argparse

import torch

from megatron_lst.models import LSTConfig, build_model, finalize_lst_model_grads
from megatron_lst.models.config import (
    CrossAttentionConfig,
    GlobalModelConfig,
    LocalModelConfig,
    swiglu_ffn_size,
)


def lst_config_from_args(args: argparse.Namespace, vocab_size: int) -> LSTConfig:
    """The model of validated `args` over a joint vocabulary of `vocab_size` ids.

    The token baseline (--patching-mode none) reads only the global sizes, the vocabulary and
    the RoPE settings; its local models are described by the same flags but never built.
    """
    global_model = GlobalModelConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups,
    )
    if args.patching_mode == "none":
        # A stand-in local pair the baseline never builds: LSTConfig requires one.
        local = LocalModelConfig(hidden_size=2, num_layers=1, num_heads=1, ffn_hidden_size=2)
        return LSTConfig(
            vocab_size=vocab_size, global_model=global_model, encoder=local, decoder=local,
            cross_attention=CrossAttentionConfig(num_heads=1),
            norm_eps=args.norm_epsilon, rope_theta=float(args.rotary_base),
            max_sequence_length=args.max_position_embeddings, init_std=args.init_method_std,
        )
    encoder, decoder = (
        LocalModelConfig(
            hidden_size=getattr(args, f"local_{side}_hidden_size"),
            num_layers=getattr(args, f"local_{side}_layers"),
            num_heads=getattr(args, f"local_{side}_heads"),
            ffn_hidden_size=swiglu_ffn_size(getattr(args, f"local_{side}_hidden_size")),
            window=args.local_attention_window,
        )
        for side in ("encoder", "decoder")
    )
    return LSTConfig(
        vocab_size=vocab_size,
        global_model=global_model,
        encoder=encoder,
        decoder=decoder,
        cross_attention=CrossAttentionConfig(
            slots_per_patch=args.cross_attn_k,
            num_heads=(args.cross_attn_heads if args.cross_attn_heads is not None
                       else args.local_encoder_heads),
            encoder_window=args.cross_attn_window_encoder,
            decoder_window=args.cross_attn_window_decoder,
        ),
        norm_eps=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        max_sequence_length=args.max_tokens,
        init_std=args.init_method_std,
    )


def transformer_config_from_args(config: LSTConfig, args: argparse.Namespace):
    """megatron.core `TransformerConfig` of the global model with this run's parallel layout,
    precision, dropout and per-token loss reduction (see `loop.py`)."""
    params_dtype = getattr(torch, args.params_dtype_name)
    return config.transformer_config(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        fp16=args.fp16,
        bf16=args.bf16,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        calculate_per_token_loss=True,
        recompute_granularity=getattr(args, "recompute_granularity", None),
        recompute_method=getattr(args, "recompute_method", None),
        recompute_num_layers=getattr(args, "recompute_num_layers", None),
    )


def build_model_chunks(args: argparse.Namespace, vocab_size: int) -> tuple[list[torch.nn.Module], LSTConfig]:
    """This rank's wrapped model chunks (one: no virtual pipeline stages) and the model config.

    Call after `initialize_parallel`. The returned chunks are megatron DDP modules; their
    `.config` has `finalize_model_grads_func` set to `finalize_lst_model_grads`.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = lst_config_from_args(args, vocab_size)
    megatron_config = transformer_config_from_args(config, args)
    model = build_model(
        config, args.patching_mode, megatron_config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_impl=getattr(args, "transformer_impl", "auto"),
        kernel_backend=args.kernel_backend,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.fp16 or args.bf16:
        model = Float16Module(megatron_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=getattr(args, "overlap_grad_reduce", False),
    )
    wrapped = DistributedDataParallel(config=megatron_config, ddp_config=ddp_config, module=model)
    megatron_config.finalize_model_grads_func = finalize_lst_model_grads
    if ddp_config.overlap_grad_reduce:
        # As Megatron-LM's get_model: the schedules hold the reduction back until the last
        # micro-batch (no_sync) and start it there, bucket by bucket, during its backward pass.
        megatron_config.no_sync_func = wrapped.no_sync
        megatron_config.grad_sync_func = wrapped.start_grad_sync
    return [wrapped], config
