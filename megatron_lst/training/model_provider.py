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
    DocumentMaskingConfig,
    GlobalModelConfig,
    LocalModelConfig,
    swiglu_ffn_size,
)
from megatron_lst.training import model_flags


def lst_config_from_args(args: argparse.Namespace, vocab_size: int,
                         eos_id: int | None = None) -> LSTConfig:
    """The model of validated `args` over a joint vocabulary of `vocab_size` ids whose EOS is
    `eos_id` (needed when --reset-attention-mask or --reset-position-ids is on).

    Reads exactly the model flags of `model_flags` (one per `LSTConfig` field but the vocabulary
    and its EOS); a flag left at None takes its field's default, or the rule its help names
    (local FFN widths: the SwiGLU rule; cross-attention heads: the local encoder's; document
    masking: on). The token baseline (--patching-mode none) reads only the global flags; its
    local models are never built.
    """
    baseline = args.patching_mode == "none"
    given = model_flags.given_fields(args, baseline)
    documents = _document_config(given.get("documents", {}), eos_id)
    global_model = GlobalModelConfig(**given.get("global_model", {}))
    if baseline:
        # A stand-in local pair the baseline never builds: LSTConfig requires one.
        local = LocalModelConfig(hidden_size=2, num_layers=1, num_heads=1, ffn_hidden_size=2)
        return LSTConfig(vocab_size=vocab_size, global_model=global_model, encoder=local,
                         decoder=local, cross_attention=CrossAttentionConfig(num_heads=1),
                         documents=documents, **given.get(None, {}))
    encoder, decoder = (
        LocalModelConfig(**{"ffn_hidden_size": swiglu_ffn_size(given[side]["hidden_size"]),
                            **given[side]})
        for side in ("encoder", "decoder")
    )
    cross_attention = CrossAttentionConfig(**{"num_heads": encoder.num_heads,
                                              **given.get("cross_attention", {})})
    return LSTConfig(vocab_size=vocab_size, global_model=global_model, encoder=encoder,
                     decoder=decoder, cross_attention=cross_attention, documents=documents,
                     **given.get(None, {}))


def _document_config(given: dict[str, bool], eos_id: int | None) -> DocumentMaskingConfig | None:
    """The packed-document rule of --reset-attention-mask (default on), --reset-position-ids
    (default off) and, for LST, --reset-cross-attention-mask and --reset-global-attention-mask
    (default on); None when the first two are off."""
    reset_attention = given.get("reset_attention_mask", True)
    reset_positions = given.get("reset_position_ids", False)
    switches = {name: given[name] for name in ("reset_cross_attention", "reset_global_attention")
                if name in given}
    if not (reset_attention or reset_positions):
        return None
    if eos_id is None:
        raise ValueError("--reset-attention-mask / --reset-position-ids find documents by the "
                         "vocabulary's EOS id; pass it (eos_id) to build the model")
    return DocumentMaskingConfig(eos_id=eos_id, reset_attention_mask=reset_attention,
                                 reset_position_ids=reset_positions, **switches)


def transformer_config_from_args(config: LSTConfig, args: argparse.Namespace):
    """megatron.core `TransformerConfig` of the global model with this run's parallel layout,
    precision, dropout and per-token loss reduction (see `loop.py`). The virtual pipeline stages
    are those `initialize_parallel` set up (a checkpoint's flags may name others)."""
    from megatron.core import parallel_state

    params_dtype = getattr(torch, args.params_dtype_name)
    return config.transformer_config(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()),
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


def build_model_chunks(args: argparse.Namespace, vocab_size: int, *, eos_id: int | None = None,
                       config: LSTConfig | None = None) -> tuple[list[torch.nn.Module], LSTConfig]:
    """This rank's wrapped model chunks and the model config: one chunk, or one per virtual
    pipeline stage (`args.virtual_pipeline_model_parallel_size`), in the order megatron's
    interleaved schedule runs them; the local encoder is on the first chunk of the first
    pipeline rank, the local decoder and head on the last chunk of the last.

    The model is `config` when given (a checkpoint's own), else the one the flags describe over
    a vocabulary of `vocab_size` ids whose EOS is `eos_id`.

    Call after `initialize_parallel`. The returned chunks are megatron DDP modules sharing one
    megatron config, whose `finalize_model_grads_func` is `finalize_lst_model_grads`.
    """
    if config is None:
        config = lst_config_from_args(args, vocab_size, eos_id)
    elif config.vocab_size != vocab_size:
        raise ValueError(f"model vocab_size {config.vocab_size} differs from the vocabulary's "
                         f"{vocab_size} ids")
    megatron_config = transformer_config_from_args(config, args)
    virtual_stages = megatron_config.virtual_pipeline_model_parallel_size
    stages = [None] if virtual_stages is None else list(range(virtual_stages))
    chunks = [_wrapped_chunk(config, megatron_config, args, vp_stage, disable_bucketing=index > 0)
              for index, vp_stage in enumerate(stages)]
    megatron_config.finalize_model_grads_func = finalize_lst_model_grads
    if getattr(args, "overlap_grad_reduce", False):
        # As Megatron-LM's get_model: the schedules hold the reduction back until the last
        # micro-batch (no_sync) and start it there, bucket by bucket, during its backward pass.
        no_sync = [chunk.no_sync for chunk in chunks]
        grad_sync = [chunk.start_grad_sync for chunk in chunks]
        megatron_config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        megatron_config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync
    return chunks, config


def _wrapped_chunk(config: LSTConfig, megatron_config, args: argparse.Namespace,
                   vp_stage: int | None, disable_bucketing: bool) -> torch.nn.Module:
    """The model chunk of virtual pipeline stage `vp_stage` (None: the whole stage) in
    `Float16Module` (with --fp16/--bf16) and megatron's DDP. `disable_bucketing`: one gradient
    bucket for the chunk, as Megatron-LM gives every chunk but the first."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    model = build_model(
        config, args.patching_mode, megatron_config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                            vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        transformer_impl=getattr(args, "transformer_impl", "auto"),
        kernel_backend=args.kernel_backend,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.fp16 or args.bf16:
        model = Float16Module(megatron_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=getattr(args, "overlap_grad_reduce", False),
        # Forward pre-hooks gather the parameters; the training loop turns them off around
        # evaluation and saving (`param_gather.ParamGatherHooks`). `align_param_gather` stays off:
        # without it every chunk's hooks gather its parameters at its own first forward pass,
        # which is correct with or without virtual stages (aligning only times the gathers).
        overlap_param_gather=getattr(args, "overlap_param_gather", False),
        bucket_size=getattr(args, "ddp_bucket_size", None),
    )
    return DistributedDataParallel(config=megatron_config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=disable_bucketing)
