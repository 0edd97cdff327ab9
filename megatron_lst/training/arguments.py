"""Command-line arguments of `pretrain_lst.py`: Megatron-LM flag names plus the LST flags.

Flags keep Megatron-LM's names and meanings wherever Megatron has one, and are grouped the way
Megatron groups them (`_add_network_size_args`, `_add_training_args`, ...). Values come from four
layers, later ones winning:

    parser defaults  <  --preset (model size)  <  --config YAML  <  the command line

`parse_args(argv)` composes them; `validate_args(args, world_size)` rejects every impossible
combination before any work starts, naming the flags and the fix, and adds the derived fields
(`data_parallel_size`, `num_micro_batches`, ...).
"""

from __future__ import annotations

import argparse
import logging
import math
import operator
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_lst.training import config_files, model_flags

logger = logging.getLogger(__name__)

# The modes of megatron_lst.patching, spelled out so that parsing flags does not import torch.
PATCHING_MODES = ("none", "static", "aligned", "mixed", "curriculum")

# The signals --exit-signal accepts (exit_conditions.ExitConditions turns them into signals).
EXIT_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")

# The names of megatron_lst.models.config.PRESETS, spelled out so that building the parser does not
# import torch; `preset_defaults` reads the sizes themselves from there.
PRESET_NAMES = ("tiny", "tiny-cpu", "medium", "paper-1b", "7b")


class ArgumentError(ValueError):
    """A flag value or a combination of flags that cannot run; the message says which and why."""


# Megatron-LM flags that lst-train does not take (parallelism it does not support, a switch it
# does not need), with what to use instead (a plain "unrecognized arguments" would not say
# whether the flag was mistyped or is not supported).
_NO_VIRTUAL_PIPELINE = ("virtual pipeline stages (the interleaved schedule) are not supported; "
                        "use --pipeline-model-parallel-size alone")
_NO_EXPERTS = "the global transformer is dense: there are no experts to place"
_NO_CONTEXT_PARALLEL = ("context parallelism is not supported; split the global transformer with "
                        "--tensor-model-parallel-size (with --sequence-parallel) and "
                        "--pipeline-model-parallel-size")
_STAGE_SPLIT = ("the pipeline stages are given as layer counts: use "
                "--decoder-first-pipeline-num-layers and --decoder-last-pipeline-num-layers (the "
                "first stage also runs the local encoder, the last the local decoder and head)")
_NO_FSDP = ("FSDP is not supported; shard the optimizer state with --use-distributed-optimizer "
            "and the weights with --tensor-model-parallel-size / --pipeline-model-parallel-size")
_NO_ENCODER_PARALLEL = ("there is no separately parallelised encoder model: the local encoder "
                        "runs on the first pipeline stage, replicated over tensor-parallel ranks")
_FIXED_ARCHITECTURE = ("the architecture is fixed to the reference's (pre-norm RMSNorm, SwiGLU, "
                       "interleaved RoPE of --rotary-base, no linear biases, untied output "
                       "weights); drop the flag")
_FUSIONS = ("the global block's kernels follow --transformer-impl (megatron.core picks the "
            "attention backend; the fusions that need CUDA kernels are off); drop the flag")
_TOKENIZER_BY_PATH = ("the data is tokenized beforehand (docs/data.md) and a tokenizer is given "
                      "by path only, with --tokenizer-model; drop the flag")
_ITERATIONS_NOT_SAMPLES = ("training is counted in iterations: use --train-iters, "
                           "--lr-decay-iters and --lr-warmup-iters (samples / "
                           "--global-batch-size)")
_OWN_CHECKPOINT_FORMAT = ("lst-train writes its own distributed checkpoint format (model, "
                          "optimizer and RNG state); drop the flag")
_LOGGED_ALWAYS = ("the log is a fixed set of values, written every --log-interval iterations "
                  "to the log line, TensorBoard and W&B (loss, learning rate, grad norm, loss "
                  "scale, throughput; docs/training.md, 'The log line'); drop the flag")
_NO_SUCH_SETTING = "lst-train has no such setting; drop the flag"
# Megatron-LM's mixture-of-experts flags (--moe-router-topk, --moe-grouped-gemm, ...) all start so.
MIXTURE_OF_EXPERTS_PREFIX = "--moe-"
UNSUPPORTED_MEGATRON_FLAGS = {
    "--context-parallel-size": _NO_CONTEXT_PARALLEL,
    "--hierarchical-context-parallel-sizes": _NO_CONTEXT_PARALLEL,
    "--cp-comm-type": _NO_CONTEXT_PARALLEL,
    "--num-layers-per-virtual-pipeline-stage": _NO_VIRTUAL_PIPELINE,
    "--num-virtual-stages-per-pipeline-rank": _NO_VIRTUAL_PIPELINE,
    "--pipeline-model-parallel-layout": _STAGE_SPLIT,
    "--account-for-embedding-in-pipeline-split": _STAGE_SPLIT,
    "--account-for-loss-in-pipeline-split": _STAGE_SPLIT,
    "--encoder-tensor-model-parallel-size": _NO_ENCODER_PARALLEL,
    "--encoder-pipeline-model-parallel-size": _NO_ENCODER_PARALLEL,
    "--use-torch-fsdp2": _NO_FSDP,
    "--use-megatron-fsdp": _NO_FSDP,
    "--use-custom-fsdp": _NO_FSDP,
    "--num-distributed-optimizer-instances": ("one distributed-optimizer instance shards over "
                                              "the whole data-parallel group; drop the flag"),
    "--expert-model-parallel-size": _NO_EXPERTS,
    "--expert-tensor-parallel-size": _NO_EXPERTS,
    "--num-experts": _NO_EXPERTS,
    "--group-query-attention": ("grouped-query attention needs no switch here: --num-query-groups "
                                "below --num-attention-heads turns it on (the local models: "
                                "--local-encoder-query-groups, --local-decoder-query-groups); "
                                "drop the flag"),
    "--lr-warmup-fraction": ("give the warm-up as a number of iterations, --lr-warmup-iters "
                             "(the fraction x --lr-decay-iters)"),
    "--rampup-batch-size": ("a batch-size ramp-up is not supported; every iteration takes "
                            "--global-batch-size"),
    "--train-samples": _ITERATIONS_NOT_SAMPLES,
    "--lr-decay-samples": _ITERATIONS_NOT_SAMPLES,
    "--lr-warmup-samples": _ITERATIONS_NOT_SAMPLES,
    "--weight-decay-incr-style": ("the weight decay is constant, --weight-decay; drop the flag "
                                  "and --start-weight-decay / --end-weight-decay"),
    "--start-weight-decay": "the weight decay is constant: use --weight-decay",
    "--end-weight-decay": "the weight decay is constant: use --weight-decay",
    "--recompute-activations": "use --recompute-granularity selective (the same thing)",
    "--vocab-file": _TOKENIZER_BY_PATH,
    "--merge-file": _TOKENIZER_BY_PATH,
    "--tokenizer-type": _TOKENIZER_BY_PATH,
    "--vocab-size": ("the vocabulary is the tokenizer's text ids plus --num-units speech units "
                     "(docs/data.md#the-joint-vocabulary); drop the flag"),
    "--make-vocab-size-divisible-by": ("the joint vocabulary is not padded; where tensor "
                                       "parallelism needs it divisible, raise --num-units "
                                       "(docs/data.md#the-joint-vocabulary)"),
    "--data-cache-path": ("the datasets keep their row indices under --save "
                          "(<--save>/lst_row_index); drop the flag"),
    "--normalization": _FIXED_ARCHITECTURE,
    "--swiglu": (f"{_FIXED_ARCHITECTURE}, and give --ffn-hidden-size: its default is 4 x "
                 f"--hidden-size, not Megatron-LM's SwiGLU default int(8h/3/64) x 64"),
    "--untie-embeddings-and-output-weights": _FIXED_ARCHITECTURE,
    "--position-embedding-type": _FIXED_ARCHITECTURE,
    "--use-rotary-position-embeddings": _FIXED_ARCHITECTURE,
    "--no-position-embedding": _FIXED_ARCHITECTURE,
    "--disable-bias-linear": _FIXED_ARCHITECTURE,
    "--rotary-percent": ("RoPE rotates every channel of each head (Megatron-LM's "
                         "--rotary-percent 1.0); drop the flag"),
    "--apply-layernorm-1p": _FIXED_ARCHITECTURE,
    "--qk-layernorm": _FIXED_ARCHITECTURE,
    "--calculate-per-token-loss": ("the loss is always a token mean over the global batch "
                                   "(every real token weighs the same); drop the flag"),
    "--decoupled-lr": "every parameter takes --lr (and --min-lr); drop the flag",
    "--decoupled-min-lr": "every parameter takes --lr (and --min-lr); drop the flag",
    "--fp8-format": "FP8 training is not supported; use --bf16",
    "--mock-data": ("there is no mock dataset: give --data-path (docs/data.md builds one; "
                    "`make demo` trains on a small generated corpus)"),
    "--tiktoken-pattern": _TOKENIZER_BY_PATH,
    "--cross-entropy-loss-fusion": _FUSIONS,
    "--grad-reduce-in-bf16": _NO_SUCH_SETTING,
    "--manual-gc": _NO_SUCH_SETTING,
    "--empty-unused-memory-level": _NO_SUCH_SETTING,
    "--no-mmap-bin-files": _NO_SUCH_SETTING,
    "--no-create-attention-mask-in-dataloader": _NO_SUCH_SETTING,
    "--profile": _NO_SUCH_SETTING,
    "--use-mcore-models": "the models are always megatron.core's; drop the flag",
    "--use-legacy-models": "the models are always megatron.core's; drop the flag",
    "--use-flash-attn": _FUSIONS,
    "--attention-backend": _FUSIONS,
    "--no-masked-softmax-fusion": _FUSIONS,
    "--no-bias-gelu-fusion": _FUSIONS,
    "--no-bias-swiglu-fusion": _FUSIONS,
    "--no-bias-dropout-fusion": _FUSIONS,
    "--no-rope-fusion": _FUSIONS,
    "--no-gradient-accumulation-fusion": _FUSIONS,
    "--no-persist-layer-norm": _FUSIONS,
    "--ckpt-format": _OWN_CHECKPOINT_FORMAT,
    "--use-dist-ckpt": _OWN_CHECKPOINT_FORMAT,
    "--async-save": _OWN_CHECKPOINT_FORMAT,
    "--log-throughput": _LOGGED_ALWAYS,
    "--log-params-norm": _LOGGED_ALWAYS,
    "--log-num-zeros-in-grad": _LOGGED_ALWAYS,
    "--log-timers-to-tensorboard": _LOGGED_ALWAYS,
    "--log-validation-ppl-to-tensorboard": _LOGGED_ALWAYS,
    "--timing-log-level": _LOGGED_ALWAYS,
    "--tensorboard-log-interval": ("TensorBoard gets the scalars every --log-interval "
                                   "iterations: use --log-interval"),
    "--wandb-save-dir": ("W&B writes where the wandb package is told to (WANDB_DIR); drop the "
                         "flag"),
}


def _refuse_unsupported_megatron_flags(argv: Sequence[str], config_keys: Sequence[str]) -> None:
    """ArgumentError for a Megatron-LM flag of UNSUPPORTED_MEGATRON_FLAGS, on the command line
    (`--flag V` or `--flag=V`) or as a --config key."""
    given = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    given += [config_files.flag_of_key(key) for key in config_keys if isinstance(key, str)]
    for flag in given:
        reason = UNSUPPORTED_MEGATRON_FLAGS.get(
            flag, _NO_EXPERTS if flag.startswith(MIXTURE_OF_EXPERTS_PREFIX) else None)
        if reason is not None:
            raise ArgumentError(f"{flag} is a Megatron-LM flag that lst-train does not take: "
                                f"{reason}")


# --- the parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full parser with Megatron-LM's defaults; no preset or YAML applied."""
    parser = argparse.ArgumentParser(
        prog="lst-train",
        description="Pretrain a Latent Speech-Text Transformer (or its token baseline).",
        allow_abbrev=False,
    )
    _add_config_args(parser)
    _add_network_size_args(parser)
    _add_lst_args(parser)
    _add_local_model_args(parser)
    _add_training_args(parser)
    _add_learning_rate_args(parser)
    _add_mixed_precision_args(parser)
    _add_distributed_args(parser)
    _add_data_args(parser)
    _add_checkpointing_args(parser)
    _add_logging_args(parser)
    _add_validation_args(parser)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", type=str, default=None,
                       help="YAML file of flag values (keys are flag names without the leading "
                            "dashes); command-line flags override it.")
    group.add_argument("--preset", type=str, default=None, choices=PRESET_NAMES,
                       help="Named model size; its sizes are defaults that --config and the "
                            "command line override.")


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "network size (global transformer)",
        "Model flags (here and under 'LST local models and cross-attention') left out come from "
        "the checkpoint --load resumes or fine-tunes, else from --preset or their defaults.")
    model_flags.add_model_flags(group, model_flags.GLOBAL_MODEL_FLAGS)
    group.add_argument("--use-checkpoint-args", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="With --load: build the model from the checkpoint's configuration "
                            "(default); model flags may only repeat its values. The --no- form "
                            "builds it from the flags alone.")
    group.add_argument("--attention-dropout", type=float, default=0.0)
    group.add_argument("--hidden-dropout", type=float, default=0.0)
    group.add_argument("--num-units", type=int, default=502,
                       help="Speech codebook size (joint vocabulary, docs/data.md#the-joint-vocabulary).")


def _add_lst_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LST: patching")
    group.add_argument("--patching-mode", choices=PATCHING_MODES, default="none",
                       help="none = token baseline (every token a patch, no local models).")
    group.add_argument("--patch-size", type=int, default=4,
                       help="Speech units per static patch.")
    group.add_argument("--silence-patching", choices=("separate", "merged"), default="separate",
                       help="Aligned patching: silences as their own patches or merged into "
                            "the next word.")
    group.add_argument("--curriculum-tau1", type=int, default=None,
                       help="Curriculum: aligned patching until this step.")
    group.add_argument("--curriculum-tau2", type=int, default=None,
                       help="Curriculum: P(aligned) falls linearly to 0 at this step, then static.")
    group.add_argument("--mixed-static-prob", type=float, default=0.5,
                       help="Mixed patching: probability a document is patched statically.")
    group.add_argument("--max-tokens", type=int, default=None,
                       help="Token budget N of one row; a row holds --seq-length patches. "
                            "Default: --seq-length with --patching-mode none; required otherwise.")
    group.add_argument("--kernel-backend", choices=("auto", "triton", "torch"), default="auto",
                       help="Segment-pool and patch cross-attention kernels: auto picks Triton "
                            "on CUDA and PyTorch elsewhere.")


def _add_local_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LST local models and cross-attention")
    model_flags.add_model_flags(group, model_flags.LOCAL_MODEL_FLAGS)


MAX_SEED = 2**31 - 1
"""numpy takes seeds below 2**32, and every pipeline stage adds 100 to the run's seed."""


def seed_flag(text: str) -> int:
    """argparse type of `--seed` (lst-train, lst-eval, lst-generate): an integer in
    [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, {MAX_SEED}]")
    return value


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="Default: micro-batch size x data-parallel size.")
    group.add_argument("--seq-length", type=int, default=None,
                       help="Global positions (patches) per sample.")
    group.add_argument("--train-iters", type=int, default=None)
    group.add_argument("--seed", type=seed_flag, default=1234)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--sgd-momentum", type=float, default=0.9)
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="On an --exit-signal (preemption, SLURM's --signal) to any rank: "
                            "finish the iteration, save a checkpoint to --save, exit with "
                            "status 0.")
    group.add_argument("--exit-signal", nargs="+", choices=EXIT_SIGNAL_NAMES,
                       default=["SIGTERM"],
                       help="The signals --exit-signal-handler handles (default: SIGTERM).")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="Save and exit once training has run this many minutes.")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="Save and exit after an iteration divisible by this.")
    group.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                       help="Activation recomputation in the global block: full layers, or "
                            "selective (the core attention only).")
    group.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                       help="With full recomputation: checkpoint groups of "
                            "--recompute-num-layers layers (uniform), or only the first "
                            "--recompute-num-layers layers of each stage (block).")
    group.add_argument("--recompute-num-layers", type=int, default=None)


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate")
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-decay-style", default="linear",
                       choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="Default: --train-iters.")
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-warmup-init", type=float, default=0.0)
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    group.add_argument("--lr-wsd-decay-style", default="exponential",
                       choices=("exponential", "linear", "cosine", "minus_sqrt"))
    on_resume = group.add_mutually_exclusive_group()
    on_resume.add_argument(
        "--override-opt_param-scheduler", action="store_true",
        help="On resume, use this run's learning-rate and weight-decay flags instead of the "
             "checkpoint's (the schedule's position, the samples consumed, is kept).")
    on_resume.add_argument(
        "--use-checkpoint-opt_param-scheduler", action="store_true",
        help="On resume, keep the checkpoint's learning-rate and weight-decay schedule whatever "
             "this run's flags say. Without either flag a resume that changes the schedule's "
             "flags is refused.")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed precision")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="Static loss scale for --fp16; default: dynamic scaling.")
    group.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    group.add_argument("--min-loss-scale", type=float, default=1.0)
    group.add_argument("--loss-scale-window", type=float, default=1000)
    group.add_argument("--hysteresis", type=int, default=2)


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                       help="Global layers on the first pipeline stage (default: an even share); "
                            "the stages without a given count split the rest evenly.")
    group.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                       help="Global layers on the last pipeline stage, which also runs the local "
                            "decoder, the output head and the encoder replica (default: an even "
                            "share). tools/plan_compute.py suggests a balanced split.")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"),
                       default="auto",
                       help="Global block layers: Transformer Engine's, megatron.core's local "
                            "ones, or auto (Transformer Engine when installed).")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="Overlap the data-parallel gradient reduction with the backward "
                            "pass (megatron DDP buckets).")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="With --use-distributed-optimizer and --overlap-grad-reduce: "
                            "all-gather the updated parameters bucket by bucket during the next "
                            "forward pass instead of at the end of the optimizer step.")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="Parameters per data-parallel communication bucket with "
                            "--overlap-grad-reduce, on the first pipeline stage (default: "
                            "megatron's, max(40M, 1M x data-parallel size)).")
    group.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="Shard the optimizer state over data-parallel ranks; "
                            "--no-use-distributed-optimizer overrides a config that sets it.")
    group.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                       help="Default: nccl with CUDA, gloo without.")
    group.add_argument("--distributed-timeout-minutes", type=int, default=30,
                       help="How long a collective may wait, including the other ranks' wait "
                            "while rank 0 builds the datasets' row indices.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="One dataset prefix, or weight-prefix pairs 'W1 P1 W2 P2 ...' to "
                            "blend several.")
    group.add_argument("--split", type=str, default="969,30,1",
                       help="Train,valid,test proportions of --data-path.")
    group.add_argument("--train-data-path", nargs="*", default=None,
                       help="Instead of --data-path and --split: training datasets, used whole "
                            "(one prefix, or weight-prefix pairs).")
    group.add_argument("--valid-data-path", nargs="*", default=None,
                       help="With --train-data-path: validation datasets, used whole.")
    group.add_argument("--task", choices=("lm", "asr", "tts"), default="lm",
                       help="What the rows train: lm = pretraining rows (interleaved documents, "
                            "loss on every token); asr = one utterance a row, '<s> units <t> "
                            "transcript EOS', loss on the transcript and EOS; tts = '<t> "
                            "transcript <s> units EOS', loss on the units and EOS. asr and tts "
                            "read aligned speech datasets only; fine-tune with --finetune "
                            "--load PRETRAINED.")
    group.add_argument("--speech-only-fraction", type=float, default=0.0,
                       help="Share of aligned speech documents laid out as one speech block "
                            "(speech-only data) instead of interleaved text and speech blocks "
                            "(default 0: the reference's interleaving for every document).")
    group.add_argument("--tokenizer-model", type=str, default=None)
    group.add_argument("--num-workers", type=int, default=2)
    group.add_argument("--index-workers", type=int, default=None,
                       help="Processes that interleave and patch documents while a dataset's "
                            "row index is built (default: every CPU this process may use; "
                            "0: in the main process).")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", type=str, default=None)
    group.add_argument("--save-interval", type=int, default=None)
    group.add_argument("--load", type=str, default=None,
                       help="Resume from the latest complete checkpoint of this save "
                            "directory, or from one checkpoint directory (DIR/iter_0000100).")
    group.add_argument("--ckpt-step", type=int, default=None,
                       help="With --load DIR: resume from the checkpoint of this iteration "
                            "instead of the latest one.")
    group.add_argument("--no-load-optim", action="store_true",
                       help="Do not load optimizer and scheduler state.")
    group.add_argument("--no-load-rng", action="store_true", help="Do not load RNG states.")
    group.add_argument("--finetune", action="store_true",
                       help="Load model weights only; start at iteration 0.")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--tensorboard-dir", type=str, default=None)
    group.add_argument("--wandb-project", type=str, default=None)
    group.add_argument("--wandb-exp-name", type=str, default=None)
    group.add_argument("--no-progress-bar", action="store_true",
                       help="No progress bar even on a terminal.")


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=100,
                       help="Global batches of validation rows; 0: no validation.")
    group.add_argument("--eval-data", type=str, default=None,
                       help="Story-completion JSONL for likelihood evaluation.")


# --- composing defaults, preset, YAML and the command line -----------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` on top of the preset and the YAML file it names; does not validate.
    A config file that does not map onto the flags raises ArgumentError."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    try:
        config = config_files.load_config(pre.config) if pre.config else {}
        _refuse_unsupported_megatron_flags(sys.argv[1:] if argv is None else argv, list(config))
        config_dests = config_files.config_to_defaults(config, parser, source=pre.config)
    except config_files.ConfigError as err:
        raise ArgumentError(str(err)) from None
    preset_name = pre.preset if pre.preset is not None else config_dests.get("preset")
    if preset_name is not None:  # a known name: the flag's choices were checked above
        parser.set_defaults(**preset_defaults(preset_name))
    parser.set_defaults(**config_dests)
    return parser.parse_args(argv)


def preset_defaults(name: str) -> dict[str, Any]:
    """Model flag defaults (destination -> value) of the model preset `name` of models.config;
    `model_provider.lst_config_from_args` turns them back into the preset's LSTConfig (with the
    document rule of its own flags, which a preset does not set)."""
    from megatron_lst.models.config import preset

    config = preset(name, vocab_size=1)  # sizes do not depend on it
    values = model_flags.flag_values(config)
    for flag in model_flags.DOCUMENT_FLAGS:
        del values[flag.dest]
    for flag in model_flags.MODEL_FLAGS:
        if flag.none_means is not None and operator.attrgetter(flag.field)(config) is None:
            # derived (key/value heads, head sizes): stays derived from the sizes the command
            # line may change, e.g. --local-encoder-heads 6 gets 6 key/value heads of its size
            values[flag.dest] = None
    return values


# --- validation -------------------------------------------------------------------------

def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Check `args` for a run on `world_size` processes; returns a copy with derived fields.

    Derived fields: `data_parallel_size`, `num_micro_batches`, `params_dtype_name`,
    `resume_from` (the checkpoint directory `--load` resumes from, or None), and defaults filled
    in for `global_batch_size`, `ffn_hidden_size`, `num_query_groups`,
    `max_position_embeddings`, `max_tokens`, `lr_decay_iters`, `distributed_backend`;
    `sequence_parallel` is turned off, with a warning, without tensor parallelism. With
    `--load` and `--use-checkpoint-args` (the default), the model flags not given are the
    checkpoint's. Raises ArgumentError naming the flags and the fix; `args` itself is not
    modified.
    """
    args = argparse.Namespace(**vars(args))
    _adopt_checkpoint_model(args)
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length",
             "train_iters", "lr")
    _require_finite(args)
    _validate_parallelism(args, world_size)
    _validate_model(args)
    _validate_lst(args)
    _check_model_config(args)
    _validate_backends(args)
    _validate_training(args)
    _validate_precision(args)
    _validate_checkpointing(args)
    _validate_exit_conditions(args)
    _validate_logging(args)
    _check_save_writable(args)  # last: it creates --save, which no refused run should leave
    return args


def _adopt_checkpoint_model(args: argparse.Namespace) -> None:
    """`--use-checkpoint-args`: the model of the checkpoint `--load` resumes or fine-tunes.

    A missing or broken `--load` is left to `_validate_checkpointing` to report.
    """
    if args.load is None or not args.use_checkpoint_args or not os.path.isdir(args.load):
        return
    from megatron_lst.checkpoint.model_config import read_model_config
    from megatron_lst.checkpoint.model_state import CheckpointContentError
    from megatron_lst.training.checkpointing import (
        CheckpointError,
        read_checkpoint_metadata,
        select_checkpoint,
    )

    try:
        path = select_checkpoint(args.load, args.ckpt_step)
        if path is None:
            return
        # Lenient: a record lacking a field loading needs is named when loading starts.
        saved = read_model_config(read_checkpoint_metadata(path, strict=False), path)
    except CheckpointError:
        return
    except CheckpointContentError as err:
        raise ArgumentError(f"--load {args.load}: {err}") from None
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


def _require(args: argparse.Namespace, *dests: str) -> None:
    missing = [_flag(d) for d in dests if getattr(args, d) is None]
    if missing:
        raise ArgumentError(
            f"missing {', '.join(missing)}: give them on the command line, in the --config "
            f"YAML, or pick a --preset for the model sizes"
        )


def _require_finite(args: argparse.Namespace) -> None:
    """Every number flag is finite: a NaN passes no range check (`nan < 0` is False), so a
    `--clip-grad nan` would silently turn clipping off."""
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"{_flag(dest)} must be a finite number, got {value}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _positive(args: argparse.Namespace, *dests: str) -> None:
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ArgumentError(f"{_flag(dest)} must be at least 1, got {value}")


def _validate_parallelism(args: argparse.Namespace, world_size: int) -> None:
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size",
              "micro_batch_size", "global_batch_size", "distributed_timeout_minutes",
              "ddp_bucket_size")
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
    if args.recompute_granularity == "full" and (args.recompute_method is None
                                                 or args.recompute_num_layers is None):
        raise ArgumentError("--recompute-granularity full needs --recompute-method uniform|block "
                            "and --recompute-num-layers")
    _positive(args, "recompute_num_layers")
    if args.overlap_param_gather and not (args.use_distributed_optimizer
                                          and args.overlap_grad_reduce):
        raise ArgumentError(
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
            "(as in Megatron-LM): without the distributed optimizer every rank updates whole "
            "parameters and there is nothing to gather; add both flags or drop "
            "--overlap-param-gather")
    if args.distributed_backend is None:
        import torch

        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"


def _validate_model(args: argparse.Namespace) -> None:
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "max_position_embeddings", "num_units")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    from megatron_lst.parallel import ParallelLayoutError, pipeline_stage_layers

    try:
        stage_layers = pipeline_stage_layers(args.num_layers, pp,
                                             args.decoder_first_pipeline_num_layers,
                                             args.decoder_last_pipeline_num_layers)
    except ParallelLayoutError as err:
        raise ArgumentError(str(err)) from None
    _check_uniform_recompute(args, stage_layers)
    if args.rotary_base is not None and args.rotary_base <= 0:
        raise ArgumentError(f"--rotary-base must be positive, got {args.rotary_base}")
    for dest in ("norm_epsilon", "init_method_std"):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            raise ArgumentError(f"{_flag(dest)} must be >= 0, got {getattr(args, dest)}")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise ArgumentError(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
            f"{args.num_attention_heads}; choose a divisor or give the head size (--kv-channels)"
        )
    _check_even_head_dim(args, "hidden_size", "num_attention_heads", "kv_channels")
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.num_attention_heads % args.num_query_groups:
        raise ArgumentError(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--num-query-groups {args.num_query_groups}"
        )
    for dest in ("num_attention_heads", "num_query_groups"):
        if getattr(args, dest) % tp:
            raise ArgumentError(
                f"{_flag(dest)} {getattr(args, dest)} is not divisible by "
                f"--tensor-model-parallel-size {tp}; tensor parallelism splits heads across ranks"
            )
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size % tp:
        raise ArgumentError(
            f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
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
            raise ArgumentError(f"{_flag(dest)} must be in [0, 1), got {getattr(args, dest)}")
    if args.reset_attention_mask is not False and args.attention_dropout > 0:  # None: default on
        raise ArgumentError("--reset-attention-mask runs the global attention as range attention, "
                            "which has no dropout; set --attention-dropout 0 or pass "
                            "--no-reset-attention-mask")
    if args.reset_position_ids and args.patching_mode == "none":
        raise ArgumentError("--reset-position-ids is not available for the token baseline "
                            "(--patching-mode none): megatron's GPTModel numbers RoPE positions "
                            "over the whole row")


def _check_even_head_dim(args: argparse.Namespace, hidden: str, heads: str, kv_channels: str) -> None:
    """RoPE rotates pairs of channels: one attention head, of `kv_channels` channels or else
    hidden / heads, must have an even size. Named by the flags that set it."""
    if getattr(args, kv_channels) is not None:
        if getattr(args, kv_channels) % 2:
            raise ArgumentError(
                f"{_flag(kv_channels)} {getattr(args, kv_channels)} must be even: RoPE rotates "
                f"pairs of channels of each attention head"
            )
        return
    head_dim = getattr(args, hidden) // getattr(args, heads)
    if head_dim % 2:
        raise ArgumentError(
            f"{_flag(hidden)} {getattr(args, hidden)} over {_flag(heads)} {getattr(args, heads)} "
            f"makes attention heads of {head_dim} channels, which must be even: RoPE rotates pairs "
            f"of channels; choose another head count or give an even head size ({_flag(kv_channels)})"
        )


def _check_uniform_recompute(args: argparse.Namespace, stage_layers: Sequence[int]) -> None:
    """Uniform recomputation checkpoints whole groups of --recompute-num-layers layers of each
    pipeline stage (megatron.core indexes past a stage's last layer otherwise)."""
    if args.recompute_method != "uniform":
        return
    group = args.recompute_num_layers
    if any(layers % group for layers in stage_layers):
        raise ArgumentError(
            f"--recompute-method uniform checkpoints groups of --recompute-num-layers {group} "
            f"layers, which must divide the global layers of every pipeline stage "
            f"{list(stage_layers)}; use a divisor of {math.gcd(*stage_layers)}"
        )


def _validate_lst(args: argparse.Namespace) -> None:
    if args.patching_mode == "none":
        if args.max_tokens is None:
            args.max_tokens = args.seq_length
        if args.max_tokens != args.seq_length:
            raise ArgumentError(
                f"--max-tokens {args.max_tokens} differs from --seq-length {args.seq_length} "
                f"with --patching-mode none, where every token is a patch; drop --max-tokens"
            )
        return
    _positive(args, "patch_size", "cross_attn_k", "cross_attn_heads", "cross_attn_window_encoder",
              "cross_attn_window_decoder", "local_encoder_window", "local_decoder_window",
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
                f"--curriculum-tau2 {args.curriculum_tau2}: aligned until tau1, static after tau2"
            )
        if args.curriculum_tau2 > args.train_iters:
            # A warning, not an error: a later run may extend --train-iters and resume.
            logger.warning("--curriculum-tau2 %d is beyond --train-iters %d: this run ends before "
                           "its static phase", args.curriculum_tau2, args.train_iters)
    if args.patching_mode == "mixed" and not 0.0 <= args.mixed_static_prob <= 1.0:
        raise ArgumentError(f"--mixed-static-prob must be in [0, 1], got {args.mixed_static_prob}")
    for side in ("encoder", "decoder"):
        dests = [f"local_{side}_layers", f"local_{side}_hidden_size", f"local_{side}_heads"]
        _require(args, *dests)
        _positive(args, *dests, f"local_{side}_query_groups", f"local_{side}_kv_channels")
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


def _check_model_config(args: argparse.Namespace) -> None:
    """What the model configuration itself rejects (e.g. an odd head dimension), named."""
    from megatron_lst.models.config import ModelConfigError
    from megatron_lst.training.model_provider import lst_config_from_args

    try:
        lst_config_from_args(args, vocab_size=2, eos_id=1)  # the vocabulary enters no check
    except ModelConfigError as err:
        raise ArgumentError(f"the model flags describe an impossible model: {err}") from None


def _validate_backends(args: argparse.Namespace) -> None:
    """The communication and global-block backends the flags name, and the kernel backend
    (--kernel-backend, or LST_KERNEL_BACKEND under auto), can run here (each used to fail only
    once the model was built or ran)."""
    import torch
    from lst_kernels.backend import BACKEND_ENV_VAR, resolve_backend

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
    if args.patching_mode == "none":
        return  # the token baseline runs no LST kernels
    # With CUDA the kernels get CUDA tensors: no tensor stands for those (a CUDA one here would
    # open a context), which still checks LST_KERNEL_BACKEND and that Triton is installed.
    tensors = () if torch.cuda.is_available() else (torch.empty(0),)
    source = f"--kernel-backend {args.kernel_backend}"
    if args.kernel_backend == "auto" and BACKEND_ENV_VAR in os.environ:
        source += f" with {BACKEND_ENV_VAR}={os.environ[BACKEND_ENV_VAR]}"
    try:
        resolve_backend(args.kernel_backend, *tensors)
    except (RuntimeError, ValueError) as err:
        raise ArgumentError(f"{source}: {err}") from None


def _validate_training(args: argparse.Namespace) -> None:
    _positive(args, "train_iters", "log_interval", "eval_interval")
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
            raise ArgumentError(f"{_flag(dest)} must be in [0, 1), got {getattr(args, dest)}")
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
            raise ArgumentError(f"{_flag(dest)} must be >= 0, got {getattr(args, dest)}")
    if args.eval_data is not None:
        if not Path(args.eval_data).is_file():
            raise ArgumentError(f"--eval-data {args.eval_data} is not a file (story-completion "
                                "items as JSONL, see docs/evaluation.md#the-item-format)")
        if args.tokenizer_model is None:
            raise ArgumentError("--eval-data needs --tokenizer-model to tokenize the items' text")


def _check_data_path(data_path: Sequence[str], flag: str) -> None:
    if not data_path:
        raise ArgumentError(f"{flag} needs at least one dataset prefix")
    if len(data_path) == 1:
        return
    weights = data_path[0::2]
    try:
        values = [float(w) for w in weights]
    except ValueError:
        if any(_is_number(p) for p in data_path):
            raise ArgumentError(
                f"{flag} {' '.join(data_path)} mixes weights and prefixes; give one prefix "
                f"or weight-prefix pairs 'W1 P1 W2 P2 ...'"
            ) from None
        raise ArgumentError(
            f"{flag} {' '.join(data_path)} names several datasets without weights; the "
            f"blend draws samples by weight: give weight-prefix pairs 'W1 P1 W2 P2 ...'"
        ) from None
    if len(data_path) % 2:
        raise ArgumentError(
            f"{flag} {' '.join(data_path)} has an odd number of items; weighted form is "
            f"'W1 P1 W2 P2 ...'"
        )
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ArgumentError(f"{flag} weights {weights} must be finite, >= 0, and not all 0")
    from megatron_lst.data.blend import parse_data_path
    from megatron_lst.data.dataset import DatasetError

    try:  # a prefix named twice, before any data is read (exit status 2, not 4)
        parse_data_path(data_path)
    except DatasetError as err:
        raise ArgumentError(str(err).replace("--data-path", flag, 1)) from None


def _check_split(split: str) -> None:
    """`--split` as `data_provider.split_bounds` reads it, checked before any data is read."""
    from megatron_lst.data.dataset import DatasetError
    from megatron_lst.training.data_provider import split_bounds

    try:
        split_bounds(split, 1)
    except DatasetError as err:
        raise ArgumentError(str(err)) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _validate_precision(args: argparse.Namespace) -> None:
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
    _positive(args, "hysteresis", "loss_scale_window")
    if not 0 < args.min_loss_scale <= args.initial_loss_scale:
        raise ArgumentError(
            f"--min-loss-scale {args.min_loss_scale} must be positive and at most "
            f"--initial-loss-scale {args.initial_loss_scale}"
        )


def _validate_checkpointing(args: argparse.Namespace) -> None:
    _positive(args, "save_interval")
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


def _checkpoint_to_load(args: argparse.Namespace) -> Path | None:
    """The checkpoint --load (and --ckpt-step) name, or None: no --load, or the first run of an
    auto-resuming job (--save and --load the same directory, nothing saved yet)."""
    # Imported here: checkpointing imports megatron.core, which argument parsing must not need.
    from megatron_lst.training.checkpointing import (
        METADATA_FILENAME,
        CheckpointError,
        checkpoints_from,
        select_checkpoint,
    )

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
        raise ArgumentError(f"--load {args.load}: {err}") from None
    if latest is None and not auto_resume:
        incomplete = [entry.name for entry in checkpoints_from(args.load, 0)]
        found = (f"its {', '.join(incomplete)} lack(s) {METADATA_FILENAME}, which every "
                 f"lst-train save writes last: a save that did not finish, or a checkpoint of "
                 f"another program (Megatron-LM's own have none)" if incomplete else
                 "no iter_XXXXXXX directory")
        raise ArgumentError(
            f"--load {args.load} holds no complete checkpoint ({found}); point --load at a "
            f"directory written by lst-train --save"
        )
    return latest


def _check_no_newer_checkpoints(args: argparse.Namespace, loaded: Path | None) -> None:
    """Refuse a --save directory holding checkpoints newer than the iteration the run starts
    from (`loaded`'s, 0 with --finetune or without one): its first save would collide with one
    of them only after training up to it, and one it does write would lie behind them (resuming
    loads the newest)."""
    from megatron_lst.training.checkpointing import checkpoints_from

    if args.save is None:
        return
    start = 0 if loaded is None or args.finetune else int(loaded.name.removeprefix("iter_"))
    newer = checkpoints_from(args.save, start + 1)
    if newer:
        raise ArgumentError(
            f"--save {args.save} already holds {[entry.name for entry in newer]}, newer than "
            f"iteration {start} where this run starts: its checkpoints would collide with them or "
            f"lie behind them (resuming loads the newest). Resume from the newest with --load "
            f"{args.save}, or move those checkpoints away, or pass another --save")


def _check_no_file_in_the_way(flag: str, path: str) -> None:
    """`path` is a directory or can be made one: neither it nor an ancestor is a file (saving
    would otherwise fail at the first write, after the datasets and the model are built)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        advice = ("give a directory (created if missing)" if flag == "--save" else
                  "point --load at a --save directory, or one iter_XXXXXXX directory in it")
        raise ArgumentError(f"{flag} {path}: {existing} is a file, not a directory; {advice}")


def _check_save_writable(args: argparse.Namespace) -> None:
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


def _validate_exit_conditions(args: argparse.Namespace) -> None:
    _positive(args, "exit_interval")
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
        raise ArgumentError(f"{', '.join(watched)} stop training early to resume later, which "
                            f"needs a checkpoint: give --save (and the same --load to resume)")


def _validate_logging(args: argparse.Namespace) -> None:
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


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """`args` as a JSON-ready dict (for checkpoints and logs)."""
    return {k: _jsonable(v) for k, v in sorted(vars(args).items())}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
