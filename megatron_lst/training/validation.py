"""The checks of `arguments.validate_args`: the flags describe a run that can run here.

Each `validate_*` function checks one group of flags (parallel layout, global model, LST local
models, training, data, precision, early exit, logging), raises ArgumentError naming the flags and
the fix, and fills in the derived fields and defaults its group owns (`data_parallel_size`,
`num_micro_batches`, `ffn_hidden_size`, ...). The flags that name checkpoints and directories are
checked in `checkpoint_flags`. Nothing here imports torch or megatron.core at import time.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_lst.training.flag_checks import (
    ArgumentError,
    flag_name,
    require,
    require_positive,
)
from megatron_lst.training.megatron_flags import SIZES_ONLY_ONE

if TYPE_CHECKING:  # the models pull in megatron.core and torch: imported where a check runs
    from megatron_lst.models.config import LSTConfig

logger = logging.getLogger(__name__)


def require_finite(args: argparse.Namespace) -> None:
    """Every number flag is finite: a NaN passes no range check (`nan < 0` is False), so a
    `--clip-grad nan` would silently turn clipping off."""
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"{flag_name(dest)} must be a finite number, got {value}")


def validate_parallelism(args: argparse.Namespace, world_size: int) -> None:
    require_positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "micro_batch_size", "global_batch_size", "distributed_timeout_minutes",
                     "ddp_bucket_size")
    for dest, reason in SIZES_ONLY_ONE.items():
        if getattr(args, dest) != 1:
            raise ArgumentError(f"{flag_name(dest)} {getattr(args, dest)}: {reason}; only 1 (the "
                                f"default) is taken")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size < 1:
        raise ArgumentError(f"world size must be at least 1, got {world_size}")
    if world_size % (tp * pp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of {tp * pp} "
            f"processes or change the parallel sizes"
        )
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    per_step = args.micro_batch_size * dp
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp} = {per_step}; "
            f"use a multiple of {per_step}"
        )
    args.num_micro_batches = args.global_batch_size // per_step
    if args.sequence_parallel and tp == 1:
        logger.warning("--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
                       "turning it off")
        args.sequence_parallel = False
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method needs --recompute-granularity full")
    if args.recompute_num_layers is not None and args.recompute_granularity != "full":
        # megatron's TransformerConfig refuses it under selective recomputation, after the
        # datasets were indexed, and ignores it without recomputation.
        raise ArgumentError("--recompute-num-layers needs --recompute-granularity full (selective "
                            "recomputation takes no layer count); drop it or recompute full layers")
    if args.recompute_granularity == "full" and (args.recompute_method is None
                                                 or args.recompute_num_layers is None):
        raise ArgumentError("--recompute-granularity full needs --recompute-method uniform|block "
                            "and --recompute-num-layers")
    require_positive(args, "recompute_num_layers")
    if args.overlap_param_gather and not (args.use_distributed_optimizer
                                          and args.overlap_grad_reduce):
        raise ArgumentError(
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
            "(as in Megatron-LM): without the distributed optimizer every rank updates whole "
            "parameters and there is nothing to gather; add both flags or drop "
            "--overlap-param-gather")
    if args.use_distributed_optimizer and args.optimizer != "adam":
        # megatron.core's DistributedOptimizer asserts it, once the datasets and the model
        # were built.
        raise ArgumentError(
            f"--use-distributed-optimizer shards Adam's state only (megatron.core's distributed "
            f"optimizer), not --optimizer {args.optimizer}'s: use --optimizer adam, or drop "
            f"--use-distributed-optimizer (--no-use-distributed-optimizer overrides a config "
            f"that sets it)")
    if args.distributed_backend is None:
        import torch

        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"


def validate_model(args: argparse.Namespace) -> None:
    require_positive(args, "num_layers", "hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "ffn_hidden_size",
                     "max_position_embeddings", "num_units")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    from megatron_lst.parallel import (
        ParallelLayoutError,
        pipeline_stage_layers,
        virtual_pipeline_size,
    )

    try:
        stage_layers = pipeline_stage_layers(args.num_layers, pp,
                                             args.decoder_first_pipeline_num_layers,
                                             args.decoder_last_pipeline_num_layers)
        args.virtual_pipeline_model_parallel_size = virtual_pipeline_size(
            stage_layers, args.num_micro_batches, args.num_layers_per_virtual_pipeline_stage,
            args.num_virtual_stages_per_pipeline_rank)
    except ParallelLayoutError as err:
        raise ArgumentError(str(err)) from None
    vpp = args.virtual_pipeline_model_parallel_size or 1
    _check_uniform_recompute(args, [layers // vpp for layers in stage_layers])
    if args.rotary_base is not None and args.rotary_base <= 0:
        raise ArgumentError(f"--rotary-base must be positive, got {args.rotary_base}")
    for dest in ("norm_epsilon", "init_method_std"):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            raise ArgumentError(f"{flag_name(dest)} must be >= 0, got {getattr(args, dest)}")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise ArgumentError(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
            f"{args.num_attention_heads}; choose a divisor or give the head size (--kv-channels)"
        )
    _check_even_head_dim(args, "hidden_size", "num_attention_heads", "kv_channels")
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    heads = args.num_attention_heads
    if heads % args.num_query_groups:
        # Counts tensor parallelism can split too; none when tp does not divide the heads.
        fitting = [g for g in _divisors(heads) if g % tp == 0]
        advice = (f"use one of {fitting}" if fitting else
                  f"use one of {_divisors(heads)}, with a --tensor-model-parallel-size that "
                  f"divides it ({tp} divides none of them)")
        raise ArgumentError(
            f"--num-attention-heads {heads} is not divisible by --num-query-groups "
            f"{args.num_query_groups}; {advice}"
        )
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    _check_tensor_parallel_split(args, tp)
    if args.seq_length < 2:
        raise ArgumentError(f"--seq-length must be at least 2 (inputs and shifted labels), "
                            f"got {args.seq_length}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
            f"{args.max_position_embeddings}; raise the latter"
        )
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(
            f"--sequence-parallel splits --seq-length {args.seq_length} across "
            f"--tensor-model-parallel-size {tp} ranks; use a multiple of {tp}"
        )
    for dest in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(args, dest) < 1.0:
            raise ArgumentError(f"{flag_name(dest)} must be in [0, 1), got {getattr(args, dest)}")
    if args.reset_attention_mask is not False and args.attention_dropout > 0:  # None: default on
        raise ArgumentError("--reset-attention-mask runs the global attention as range attention, "
                            "which has no dropout; set --attention-dropout 0 or pass "
                            "--no-reset-attention-mask")
    if args.reset_position_ids and args.patching_mode == "none":
        raise ArgumentError("--reset-position-ids is not available for the token baseline "
                            "(--patching-mode none): megatron's GPTModel numbers RoPE positions "
                            "over the whole row")


def _divisors(number: int) -> list[int]:
    return [size for size in range(1, number + 1) if number % size == 0]


def _check_tensor_parallel_split(args: argparse.Namespace, tp: int) -> None:
    """Tensor parallelism splits the global model's heads, query groups and FFN width over its
    ranks: refuse a size that does not divide them all, naming the sizes that do."""
    split = ("num_attention_heads", "num_query_groups", "ffn_hidden_size")
    undivided = [f"{flag_name(dest)} {getattr(args, dest)}" for dest in split
                 if getattr(args, dest) % tp]
    if undivided:
        fitting = _divisors(math.gcd(*(getattr(args, dest) for dest in split)))
        raise ArgumentError(
            f"--tensor-model-parallel-size {tp} does not divide {', '.join(undivided)}: "
            f"tensor parallelism splits the heads, query groups and FFN width over its ranks; "
            f"use one of {fitting}"
        )


def _check_even_head_dim(args: argparse.Namespace, hidden: str, heads: str,
                         kv_channels: str) -> None:
    """RoPE rotates pairs of channels: one attention head, of `kv_channels` channels or else
    hidden / heads, must have an even size. Named by the flags that set it."""
    if getattr(args, kv_channels) is not None:
        if getattr(args, kv_channels) % 2:
            raise ArgumentError(
                f"{flag_name(kv_channels)} {getattr(args, kv_channels)} must be even: RoPE "
                f"rotates pairs of channels of each attention head"
            )
        return
    head_dim = getattr(args, hidden) // getattr(args, heads)
    if head_dim % 2:
        raise ArgumentError(
            f"{flag_name(hidden)} {getattr(args, hidden)} over {flag_name(heads)} "
            f"{getattr(args, heads)} makes attention heads of {head_dim} channels, which must be "
            f"even: RoPE rotates pairs of channels; choose another head count or give an even "
            f"head size ({flag_name(kv_channels)})"
        )


def _check_uniform_recompute(args: argparse.Namespace, stage_layers: Sequence[int]) -> None:
    """Uniform recomputation checkpoints whole groups of --recompute-num-layers layers of each
    model chunk, `stage_layers` (megatron.core indexes past a chunk's last layer otherwise)."""
    if args.recompute_method != "uniform":
        return
    group = args.recompute_num_layers
    if any(layers % group for layers in stage_layers):
        raise ArgumentError(
            f"--recompute-method uniform checkpoints groups of --recompute-num-layers {group} "
            f"layers, which must divide the global layers of every pipeline (or virtual "
            f"pipeline) stage "
            f"{list(stage_layers)}; use a divisor of {math.gcd(*stage_layers)}"
        )


def validate_lst(args: argparse.Namespace) -> None:
    if args.patching_mode == "none":
        if args.max_tokens is None:
            args.max_tokens = args.seq_length
        if args.max_tokens != args.seq_length:
            raise ArgumentError(
                f"--max-tokens {args.max_tokens} differs from --seq-length {args.seq_length} "
                f"with --patching-mode none, where every token is a patch; drop --max-tokens"
            )
        return
    require_positive(args, "patch_size", "cross_attn_k", "cross_attn_heads",
                     "cross_attn_window_encoder", "cross_attn_window_decoder",
                     "local_encoder_window", "local_decoder_window",
                     "local_encoder_ffn_hidden_size", "local_decoder_ffn_hidden_size")
    if args.max_tokens is None:
        raise ArgumentError(
            f"--patching-mode {args.patching_mode} needs --max-tokens, the token budget of a "
            f"row of --seq-length {args.seq_length} patches (e.g. {4 * args.seq_length})"
        )
    if args.max_tokens < args.seq_length:
        raise ArgumentError(
            f"--max-tokens {args.max_tokens} is smaller than --seq-length {args.seq_length}: a "
            f"row of {args.seq_length} patches needs at least one token per patch; raise "
            f"--max-tokens"
        )
    if args.patching_mode == "curriculum":
        if args.curriculum_tau1 is None or args.curriculum_tau2 is None:
            raise ArgumentError("--patching-mode curriculum needs --curriculum-tau1 and "
                                "--curriculum-tau2 (steps)")
        if not 0 <= args.curriculum_tau1 <= args.curriculum_tau2:
            raise ArgumentError(
                f"--curriculum-tau1 {args.curriculum_tau1} must be >= 0 and <= "
                f"--curriculum-tau2 {args.curriculum_tau2}: aligned through tau1, static from tau2"
            )
        # Iteration i (logged from 1) is curriculum step i - 1: the run's last step is
        # train_iters - 1. A warning, not an error: a later run may extend --train-iters and resume.
        from megatron_lst.patching.curriculum import PatchingConfig  # torch, via the package

        first_static = PatchingConfig(
            "curriculum", aligned_until_step=args.curriculum_tau1,
            static_from_step=args.curriculum_tau2).first_static_step
        if first_static >= args.train_iters:
            logger.warning(
                "--curriculum-tau1 %d / --curriculum-tau2 %d with --train-iters %d: this run ends "
                "before its static phase (every document static from step %d, iteration %d; "
                "iteration %d is step %d)",
                args.curriculum_tau1, args.curriculum_tau2, args.train_iters, first_static,
                first_static + 1, args.train_iters, args.train_iters - 1)
    if args.patching_mode == "mixed" and not 0.0 <= args.mixed_static_prob <= 1.0:
        raise ArgumentError(f"--mixed-static-prob must be in [0, 1], got {args.mixed_static_prob}")
    for side in ("encoder", "decoder"):
        dests = [f"local_{side}_layers", f"local_{side}_hidden_size", f"local_{side}_heads"]
        require(args, *dests)
        require_positive(args, *dests, f"local_{side}_query_groups", f"local_{side}_kv_channels")
        hidden, heads = getattr(args, dests[1]), getattr(args, dests[2])
        if getattr(args, f"local_{side}_kv_channels") is None and hidden % heads:
            raise ArgumentError(
                f"--local-{side}-hidden-size {hidden} is not divisible by --local-{side}-heads "
                f"{heads}; choose a divisor or give the head size (--local-{side}-kv-channels)"
            )
        _check_even_head_dim(args, *dests[1:], f"local_{side}_kv_channels")
        groups = getattr(args, f"local_{side}_query_groups")
        if groups is not None and heads % groups:
            raise ArgumentError(
                f"--local-{side}-heads {heads} is not divisible by --local-{side}-query-groups "
                f"{groups}: each key/value head serves a whole group of query heads"
            )
        cross_heads = args.cross_attn_heads if args.cross_attn_heads is not None else heads
        if hidden % cross_heads:
            raise ArgumentError(
                f"--local-{side}-hidden-size {hidden} is not divisible by --cross-attn-heads "
                f"{cross_heads}"
            )
    if args.local_decoder_hidden_size != args.local_encoder_hidden_size:
        raise ArgumentError(
            f"--local-decoder-hidden-size {args.local_decoder_hidden_size} must equal "
            f"--local-encoder-hidden-size {args.local_encoder_hidden_size}: the decoder reads the "
            f"encoder's token states"
        )


def check_model_config(args: argparse.Namespace) -> LSTConfig:
    """The model configuration of the flags (its vocabulary a stand-in: the vocabulary enters
    no check); what the configuration itself rejects (e.g. an odd head dimension), named."""
    from megatron_lst.models.config import ModelConfigError
    from megatron_lst.training.model_provider import lst_config_from_args

    try:
        return lst_config_from_args(args, vocab_size=2, eos_id=1)
    except ModelConfigError as err:
        raise ArgumentError(f"the model flags describe an impossible model: {err}") from None


def validate_backends(args: argparse.Namespace, config: LSTConfig) -> None:
    """The communication and global-block backends the flags name, and the kernel backend
    (--kernel-backend, or LST_KERNEL_BACKEND under auto), can run here, with heads the Triton
    patch attention kernel takes where it runs: the cross-attention's, and on CUDA the range
    attention's, packed-document global and local windows' (each used to fail only once the
    model was built or ran). `config`: `check_model_config(args)`."""
    import torch
    from lst_kernels.backend import BACKEND_ENV_VAR, resolve_backend
    from lst_kernels.patch_attention import TRITON_MAX_HEAD_DIM

    from megatron_lst.models.specs import resolve_transformer_impl

    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        raise ArgumentError("--distributed-backend nccl needs CUDA; use gloo (the default "
                            "without CUDA)")
    packed_documents = args.reset_attention_mask is not False or args.reset_position_ids
    if args.transformer_impl == "transformer_engine" and packed_documents:
        raise ArgumentError(
            "--transformer-impl transformer_engine cannot run packed-document attention "
            "(--reset-attention-mask, on by default, or --reset-position-ids): use "
            "--transformer-impl local or auto, or pass --no-reset-attention-mask")
    try:
        resolve_transformer_impl(args.transformer_impl)
    except RuntimeError as err:
        raise ArgumentError(f"--transformer-impl {args.transformer_impl}: {err}") from None
    # With CUDA the kernels get CUDA tensors: no tensor stands for those (a CUDA one here would
    # open a context), which still checks LST_KERNEL_BACKEND and that Triton is installed.
    tensors = () if torch.cuda.is_available() else (torch.empty(0),)
    # (backend, what chooses it, the attention whose heads it gets, their size, the PyTorch switch)
    chosen = []
    if args.patching_mode != "none":  # pooling and cross-attention
        chosen.append((args.kernel_backend, f"--kernel-backend {args.kernel_backend}",
                       "cross-attention", config.encoder.hidden_size
                       // config.cross_attention.num_heads, "--kernel-backend torch"))
    # On CUDA (CPU has its own path) the range attention of packed documents (the global
    # model's, also the baseline's) and of the local windows runs the same kernel on the same
    # backend. flash-attn runs them instead where it can, which it never does for heads of more
    # than 256 channels: those always reach the kernel. The global model runs it where its
    # attention is reset at documents (`RowDocuments.global_key_starts`; the baseline's
    # `token_document_starts`), else megatron's SDPA.
    documents = config.documents
    global_range_attention = documents is not None and documents.reset_attention_mask and (
        documents.reset_global_attention or args.patching_mode == "none")
    if torch.cuda.is_available() and global_range_attention:
        chosen.append((args.kernel_backend, f"--kernel-backend {args.kernel_backend}",
                       "global attention", config.global_model.head_dim, "--kernel-backend torch"))
    if torch.cuda.is_available() and args.patching_mode != "none":
        # A local window runs range attention where a row is longer than it or documents cut it.
        for side, local in (("encoder", config.encoder), ("decoder", config.decoder)):
            if args.reset_attention_mask is not False or args.max_tokens > local.window:
                chosen.append((args.kernel_backend, f"--kernel-backend {args.kernel_backend}",
                               f"local {side} self-attention ({_local_head_flags(args, side)})",
                               local.head_dim, "--kernel-backend torch"))
    for backend, source, attention, head_dim, switch in chosen:
        if backend == "auto" and BACKEND_ENV_VAR in os.environ:
            source += f" with {BACKEND_ENV_VAR}={os.environ[BACKEND_ENV_VAR]}"
        try:
            resolved = resolve_backend(backend, *tensors)
        except (RuntimeError, ValueError) as err:
            raise ArgumentError(f"{source}: {err}") from None
        if resolved == "triton" and head_dim > TRITON_MAX_HEAD_DIM:  # refused at the first call
            raise ArgumentError(
                f"{source} runs the Triton patch attention kernel, which takes heads of up to "
                f"{TRITON_MAX_HEAD_DIM} channels (larger tiles do not fit GPU shared memory); "
                f"this model's {attention} heads have {head_dim}: pass {switch} (PyTorch "
                f"attention), or use smaller heads")


def _local_head_flags(args: argparse.Namespace, side: str) -> str:
    """The flags that set one local model's head size, with their values."""
    kv_channels = getattr(args, f"local_{side}_kv_channels")
    if kv_channels is not None:
        return f"--local-{side}-kv-channels {kv_channels}"
    return (f"--local-{side}-hidden-size {getattr(args, f'local_{side}_hidden_size')} / "
            f"--local-{side}-heads {getattr(args, f'local_{side}_heads')}")


def validate_training(args: argparse.Namespace) -> None:
    require_positive(args, "train_iters", "log_interval", "eval_interval")
    if args.eval_iters < 0:
        raise ArgumentError(f"--eval-iters must be >= 0 (0: no validation), got {args.eval_iters}")
    if args.lr <= 0:
        raise ArgumentError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if not 0 <= args.lr_warmup_init <= args.lr:
        raise ArgumentError(f"--lr-warmup-init {args.lr_warmup_init} must be in [0, --lr {args.lr}]")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --lr-decay-iters "
            f"{args.lr_decay_iters}) (the scheduler decays only after warm-up)"
        )
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        raise ArgumentError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
    if (args.lr_wsd_decay_iters is not None
            and not 1 <= args.lr_wsd_decay_iters <= args.lr_decay_iters):
        raise ArgumentError(
            f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} must be in [1, --lr-decay-iters "
            f"{args.lr_decay_iters}]: WSD decays over the last iterations of the decay")
    if args.adam_eps <= 0:
        raise ArgumentError(f"--adam-eps must be positive (it keeps Adam's update finite where "
                            f"a gradient is 0), got {args.adam_eps}")
    if args.sgd_momentum < 0:
        raise ArgumentError(f"--sgd-momentum must be >= 0, got {args.sgd_momentum}")
    if args.clip_grad < 0 or args.weight_decay < 0:
        raise ArgumentError(f"--clip-grad {args.clip_grad} and --weight-decay "
                            f"{args.weight_decay} must be >= 0 (0 turns them off)")
    for dest in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, dest) < 1.0:
            raise ArgumentError(f"{flag_name(dest)} must be in [0, 1), got {getattr(args, dest)}")


def validate_data(args: argparse.Namespace) -> None:
    """The datasets (--data-path or --train-data-path/--valid-data-path, --split), how rows are
    laid out and loaded, and the --eval-data items."""
    if not 0.0 <= args.speech_only_fraction <= 1.0:
        raise ArgumentError(f"--speech-only-fraction must be in [0, 1], got "
                            f"{args.speech_only_fraction}")
    if args.speech_only_fraction > 0 and args.task != "lm":
        raise ArgumentError(f"--speech-only-fraction lays out pretraining documents; --task "
                            f"{args.task} rows are one utterance each: drop the flag")
    if args.data_path is not None and args.train_data_path is not None:
        raise ArgumentError("give --data-path (cut by --split) or --train-data-path (with "
                            "--valid-data-path), not both")
    if args.data_path is not None:
        _check_split(args.split)
    if args.valid_data_path is not None and args.train_data_path is None:
        raise ArgumentError("--valid-data-path goes with --train-data-path; with --data-path the "
                            "validation documents come from --split")
    for flag, data_path in (("--data-path", args.data_path),
                            ("--train-data-path", args.train_data_path),
                            ("--valid-data-path", args.valid_data_path)):
        if data_path is not None:
            _check_data_path(data_path, flag)
    for dest in ("num_workers", "index_workers"):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            raise ArgumentError(f"{flag_name(dest)} must be >= 0, got {getattr(args, dest)}")
    if args.eval_data is not None:
        if not Path(args.eval_data).is_file():
            raise ArgumentError(f"--eval-data {args.eval_data} is not a file (story-completion "
                                "items as JSONL, see docs/evaluation.md#the-item-format)")
        if args.tokenizer_model is None:
            raise ArgumentError("--eval-data needs --tokenizer-model to tokenize the items' text")


def _check_data_path(data_path: Sequence[str], flag: str) -> None:
    """One prefix, weight-prefix pairs, or prefixes without weights (blended by their sizes, as
    Megatron-LM blends them); a list of prefixes with some numbers among them is refused."""
    from megatron_lst.data.blend import is_weight, parse_data_path
    from megatron_lst.data.dataset import DatasetError

    if not data_path:
        raise ArgumentError(f"{flag} needs at least one dataset prefix")
    if len(data_path) > 1 and any(is_weight(p) for p in data_path):
        _check_weights(data_path, flag)

    try:  # a prefix named twice, before any data is read (exit status 2, not 4)
        parse_data_path(data_path)
    except DatasetError as err:
        raise ArgumentError(str(err).replace("--data-path", flag, 1)) from None


def _check_weights(data_path: Sequence[str], flag: str) -> None:
    """Weight-prefix pairs 'W1 P1 W2 P2 ...' (`data_path` holds numbers)."""
    weights = data_path[0::2]
    try:
        values = [float(w) for w in weights]
    except ValueError:
        raise ArgumentError(
            f"{flag} {' '.join(data_path)} mixes weights and prefixes; give one prefix, "
            f"weight-prefix pairs 'W1 P1 W2 P2 ...', or prefixes without weights 'P1 P2 ...' "
            f"(blended by their sizes)"
        ) from None
    if len(data_path) % 2:
        raise ArgumentError(
            f"{flag} {' '.join(data_path)} has an odd number of items; weighted form is "
            f"'W1 P1 W2 P2 ...'"
        )
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ArgumentError(f"{flag} weights {weights} must be finite, >= 0, and not all 0")


def _check_split(split: str) -> None:
    """`--split` as `data_provider.split_bounds` reads it, checked before any data is read."""
    from megatron_lst.data.dataset import DatasetError
    from megatron_lst.training.data_provider import split_bounds

    try:
        split_bounds(split, 1)
    except DatasetError as err:
        raise ArgumentError(str(err)) from None


def validate_precision(args: argparse.Namespace) -> None:
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 are mutually exclusive; pick one")
    if args.loss_scale is not None and not args.fp16:
        raise ArgumentError(f"--loss-scale {args.loss_scale} applies only with --fp16 "
                            f"(bf16 and fp32 train unscaled); drop it or add --fp16")
    if args.fp16 and args.loss_scale is not None and args.loss_scale <= 0:
        raise ArgumentError(f"--loss-scale must be positive, got {args.loss_scale}")
    if args.fp16 and args.loss_scale is None:
        _check_dynamic_loss_scale(args)
    args.params_dtype_name = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    # The distributed optimizer also works in fp32: it shards fp32 state across data-parallel
    # ranks without a separate main copy, so there is nothing to reject here.


def _check_dynamic_loss_scale(args: argparse.Namespace) -> None:
    """The settings of megatron.core's DynamicGradScaler (--fp16 without --loss-scale)."""
    require_positive(args, "hysteresis", "loss_scale_window")
    if not 0 < args.min_loss_scale <= args.initial_loss_scale:
        raise ArgumentError(
            f"--min-loss-scale {args.min_loss_scale} must be positive and at most "
            f"--initial-loss-scale {args.initial_loss_scale}"
        )


def validate_exit_conditions(args: argparse.Namespace) -> None:
    require_positive(args, "exit_interval")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise ArgumentError(f"--exit-duration-in-mins must be positive, got "
                            f"{args.exit_duration_in_mins}")
    if not args.exit_signal_handler and args.exit_signal != ["SIGTERM"]:
        raise ArgumentError(f"--exit-signal {' '.join(args.exit_signal)} is handled only with "
                            f"--exit-signal-handler (without it the signal ends the run unsaved); "
                            f"add --exit-signal-handler")
    watched = [flag for flag, on in (("--exit-signal-handler", args.exit_signal_handler),
                                     ("--exit-duration-in-mins", args.exit_duration_in_mins),
                                     ("--exit-interval", args.exit_interval)) if on]
    if watched and args.save is None:
        raise ArgumentError(f"{', '.join(watched)} {'stops' if len(watched) == 1 else 'stop'} "
                            f"training early to resume later, which needs a checkpoint: give "
                            f"--save (and the same --load to resume)")


def validate_logging(args: argparse.Namespace) -> None:
    from megatron_lst.training.train_logging import LoggingSetupError, require_optional_package

    if args.wandb_exp_name is not None and args.wandb_project is None:
        raise ArgumentError("--wandb-exp-name needs --wandb-project")
    try:
        if args.tensorboard_dir is not None:
            require_optional_package("tensorboard")
        if args.wandb_project is not None:
            require_optional_package("wandb")
    except LoggingSetupError as err:
        raise ArgumentError(str(err)) from None
