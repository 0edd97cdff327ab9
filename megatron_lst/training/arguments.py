"""Command-line arguments of `pretrain_lst.py`: Megatron-LM flag names plus the LST flags.

Flags keep Megatron-LM's names and meanings wherever Megatron has one, and are grouped the way
Megatron groups them (`_add_network_size_args`, `_add_training_args`, ...). Values come from four
layers, later ones winning:

    parser defaults  <  --preset (model size)  <  --config YAML  <  the command line

`parse_args(argv)` composes them, refusing Megatron-LM flags lst-train does not take
(`megatron_flags`); `validate_args(args, world_size)` rejects every impossible combination before
any work starts, naming the flags and the fix, and adds the derived fields (`data_parallel_size`,
`num_micro_batches`, ...). The checks themselves live in `validation` and, for the flags that name
checkpoints and directories, `checkpoint_flags`.
"""

from __future__ import annotations

import argparse
import operator
import sys
from collections.abc import Sequence
from typing import Any

from megatron_lst.launch_environment import LaunchEnvironmentError, launch_rank
from megatron_lst.training import (
    checkpoint_flags,
    config_files,
    megatron_flags,
    memory_history,
    model_flags,
    profiling,
    validation,
)
from megatron_lst.training.flag_checks import ArgumentError, require, seen_by_this_rank

# The modes of megatron_lst.patching, spelled out so that parsing flags does not import torch.
PATCHING_MODES = ("none", "static", "aligned", "mixed", "curriculum")

# The signals --exit-signal accepts (exit_conditions.ExitConditions turns them into signals).
EXIT_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")

# The names of megatron_lst.models.config.PRESETS, spelled out so that building the parser does not
# import torch; `preset_defaults` reads the sizes themselves from there.
PRESET_NAMES = ("tiny", "tiny-cpu", "medium", "paper-1b", "7b")


# --- the parser ------------------------------------------------------------------------

class FlagParser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of the command line (the usage and the error, exit
    status 2) rank 0 alone prints in a launch of several ranks (the RANK environment variable):
    every rank is given the same command line, and 512 ranks printed the same usage 512 times.
    The other ranks leave it to rank 0 as `stop_together.say_why_before_arming` does, and exit
    with the same status. A RANK that is no rank is refused after the command line's error."""

    def error(self, message: str):
        try:
            rank = launch_rank()
        except LaunchEnvironmentError as launch_error:
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: {launch_error}\n")
        if rank != 0:
            from megatron_lst.training.stop_together import say_why_before_arming  # torch

            say_why_before_arming(f"{self.prog}: error: {message}", same_on_every_rank=True)
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with Megatron-LM's defaults; no preset or YAML applied."""
    parser = FlagParser(
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
                       help="Curriculum: aligned patching up to and including this step "
                            "(step i - 1 is the logged iteration i).")
    group.add_argument("--curriculum-tau2", type=int, default=None,
                       help="Curriculum: P(aligned) falls linearly to 0 at this step (static "
                            "from it on; from tau1 + 1 when equal to tau1).")
    group.add_argument("--mixed-static-prob", type=float, default=0.5,
                       help="Mixed patching: probability a document is patched statically.")
    group.add_argument("--max-tokens", type=int, default=None,
                       help="Token budget N of one row; a row holds --seq-length patches. "
                            "Default: --seq-length with --patching-mode none; required otherwise.")
    group.add_argument("--kernel-backend", choices=("auto", "triton", "torch"), default="auto",
                       help="Segment-pool, patch cross-attention and range attention kernels "
                            "(local windows, packed-document global attention; on CUDA where "
                            "flash-attn does not run them): auto picks Triton on CUDA and "
                            "PyTorch elsewhere.")


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
    _add_profiling_args(group)


def _add_profiling_args(group: argparse._ArgumentGroup) -> None:
    """Megatron-LM's profiling, manual garbage collection and memory history flags
    (`profiling`, `memory_history`)."""
    group.add_argument("--profile", action="store_true",
                       help="Profile the iterations --profile-step-start .. --profile-step-end "
                            "- 1 on the --profile-ranks: with --use-pytorch-profiler a PyTorch "
                            "trace, else CUDA's profiler API for `nsys profile "
                            "--capture-range=cudaProfilerApi` (CUDA only).")
    group.add_argument("--use-pytorch-profiler", action="store_true",
                       help="With --profile: torch.profiler, one Chrome / TensorBoard trace per "
                            "profiled rank in --profile-dir.")
    group.add_argument("--profile-step-start", type=int, default=None,
                       help="With --profile: the first profiled iteration (default 10).")
    group.add_argument("--profile-step-end", type=int, default=None,
                       help="With --profile: the iteration after the last profiled one "
                            "(default 12).")
    group.add_argument("--profile-ranks", nargs="+", type=int, default=None,
                       help="With --profile: the global ranks to profile (default 0).")
    group.add_argument("--profile-dir", type=str, default=None,
                       help="Where --use-pytorch-profiler writes its traces (default: "
                            "--tensorboard-dir, else <--save>/profile).")
    group.add_argument("--manual-gc", action="store_true",
                       help="Turn Python's automatic garbage collection off during training and "
                            "collect on every rank at the same points: before the first "
                            "iteration, every --manual-gc-interval iterations and around each "
                            "validation.")
    group.add_argument("--manual-gc-interval", type=int, default=0,
                       help="With --manual-gc: collect after every iteration divisible by this "
                            "(0: only before the first iteration and around validation).")
    group.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                       help="With --manual-gc: no collection around validation.")
    group.add_argument("--record-memory-history", action="store_true",
                       help="Record the CUDA caching allocator's allocations on the last rank "
                            "and write its snapshot (for pytorch.org/memory_viz) to "
                            "--memory-snapshot-path every --log-interval iterations and when "
                            "training ends (CUDA only).")
    group.add_argument("--memory-snapshot-path", type=str, default=None,
                       help="With --record-memory-history: the snapshot file (default: "
                            "<--save>/memory_snapshot.pickle).")


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
    group.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                       help="Model chunks per pipeline rank for megatron's interleaved 1F1B "
                            "schedule (smaller pipeline bubble, more p2p messages); must divide "
                            "every stage's global layers.")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="The same as global layers per model chunk (instead of "
                            "--num-virtual-stages-per-pipeline-rank).")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--context-parallel-size", type=int, default=1,
                       help="Megatron-LM's; only 1: context parallelism is not supported (the "
                            "flag is taken so that ported launch scripts run).")
    group.add_argument("--expert-model-parallel-size", type=int, default=1,
                       help="Megatron-LM's; only 1: the global transformer has no experts (the "
                            "flag is taken so that ported launch scripts run).")
    group.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"),
                       default="auto",
                       help="Global block layers: Transformer Engine's, megatron.core's local "
                            "ones, or auto: Transformer Engine where it is installed and CUDA "
                            "is present, local otherwise. Document masking (--reset-attention-"
                            "mask, the default) runs on the local spec: auto then picks local, "
                            "and transformer_engine is refused.")
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
                       help="How long a collective may wait (not the other ranks' wait while "
                            "rank 0 builds the datasets' row indices, which has no limit).")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="One dataset prefix, weight-prefix pairs 'W1 P1 W2 P2 ...' to "
                            "blend several, or prefixes 'P1 P2 ...' without weights, blended by "
                            "their sizes (as Megatron-LM does).")
    group.add_argument("--split", type=str, default="969,30,1",
                       help="Train,valid,test proportions of --data-path.")
    group.add_argument("--train-data-path", nargs="*", default=None,
                       help="Instead of --data-path and --split: training datasets, used whole "
                            "(one prefix, weight-prefix pairs, or prefixes without weights).")
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
    group.add_argument("--eod-mask-loss", action="store_true",
                       help="Leave out of the loss the prediction made at each end-of-document "
                            "token (the next document's first token), as Megatron-LM's flag "
                            "does; off by default, as the reference trains.")
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
    group.add_argument("--pretrained-checkpoint", type=str, default=None,
                       help="With --load (the run's own save directory, usually --save): while "
                            "--load holds no checkpoint, fine-tune from this one (weights only, "
                            "iteration 0, as --finetune); once it holds one, resume it. A "
                            "fine-tuning job that is stopped and requeued resumes its own "
                            "progress with the same command.")


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
    with seen_by_this_rank():  # a file another node may not see
        config = _read_config(pre.config) if pre.config else {}
    try:
        megatron_flags.refuse_unsupported_megatron_flags(sys.argv[1:] if argv is None else argv,
                                                         list(config))
        config_dests = config_files.config_to_defaults(config, parser, source=pre.config)
    except config_files.ConfigError as err:
        raise ArgumentError(str(err)) from None
    preset_name = pre.preset if pre.preset is not None else config_dests.get("preset")
    if preset_name is not None:  # a known name: the flag's choices were checked above
        parser.set_defaults(**preset_defaults(preset_name))
    parser.set_defaults(**config_dests)
    return parser.parse_args(argv)


def _read_config(path: str) -> dict[str, Any]:
    """The flag values of the --config YAML file `path`; ArgumentError when it cannot be read."""
    try:
        return config_files.load_config(path)
    except config_files.ConfigError as err:
        raise ArgumentError(str(err)) from None


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
    `max_position_embeddings`, `max_tokens`, `lr_decay_iters`, `distributed_backend`,
    `profile_dir`, `memory_snapshot_path`;
    `sequence_parallel` is turned off, with a warning, without tensor parallelism;
    `--pretrained-checkpoint` becomes `--load` with `--finetune` while `--load` holds no
    checkpoint. With
    `--load` and `--use-checkpoint-args` (the default), the model flags not given are the
    checkpoint's. Raises ArgumentError naming the flags and the fix; `args` itself is not
    modified.
    """
    args = argparse.Namespace(**vars(args))
    with seen_by_this_rank():  # the --load checkpoint
        checkpoint_flags.choose_pretrained_or_own_checkpoint(args)
        checkpoint_flags.adopt_model_from_load(args)
    require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length",
            "train_iters", "lr")
    validation.require_finite(args)
    validation.validate_parallelism(args, world_size)
    validation.validate_model(args)
    validation.validate_lst(args)
    config = validation.check_model_config(args)
    with seen_by_this_rank():  # this node's GPUs and Triton
        validation.validate_backends(args, config)
    validation.validate_training(args)
    with seen_by_this_rank():  # the --eval-data file
        validation.validate_data(args)
    validation.validate_precision(args)
    with seen_by_this_rank():  # --save and --load
        checkpoint_flags.validate_checkpointing(args)
    validation.validate_exit_conditions(args)
    profiling.validate_profiling(args, world_size)
    memory_history.validate_memory_history(args)
    with seen_by_this_rank():  # this node's installed packages and GPUs
        validation.validate_logging(args)
        profiling.check_cuda_profiler(args)
        memory_history.check_cuda_memory_history(args)
        checkpoint_flags.check_resume_flags_before_loading(args)  # every derived field set
        # last: they create --save, --profile-dir and the snapshot's directory, which no
        # refused run should leave
        checkpoint_flags.check_save_writable(args)
        profiling.check_profile_dir_writable(args)
        memory_history.check_snapshot_directory_writable(args)
    return args
