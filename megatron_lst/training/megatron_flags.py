"""Megatron-LM flags that `lst-train` refuses by name, each with what to use instead.

`lst-train` keeps Megatron-LM's flag names; a Megatron-LM flag it does not take (parallelism it
does not support, a switch it does not need) would otherwise fail as argparse's "unrecognized
arguments", which does not say whether the flag was mistyped or is not supported.
docs/training.md#where-we-differ-from-megatron-lm lists them, with the replacements, in its two
items that start "Not supported".
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_lst.training import config_files
from megatron_lst.training.flag_checks import ArgumentError

NO_EXPERTS = "the global transformer is dense: there are no experts to place"
NO_CONTEXT_PARALLEL = ("context parallelism is not supported; split the global transformer with "
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
_DATA_ON_THE_COMMAND_LINE = ("give the datasets on the command line (or in --config): --data-path "
                             "with --split, or --train-data-path and --valid-data-path, each one "
                             "prefix, weight-prefix pairs or prefixes without weights")
_ONE_VALIDATION_BLEND = ("validation reads --eval-iters x --global-batch-size rows of one blend of "
                         "the validation datasets, the same rows every time; drop the flag")
# Megatron-LM parallel sizes lst-train takes only at 1 (their default), with why not more: launch
# scripts spell them out even for a model that uses neither.
SIZES_ONLY_ONE = {
    "context_parallel_size": NO_CONTEXT_PARALLEL,
    "expert_model_parallel_size": NO_EXPERTS,
}
_NO_FP8 = "FP8 training is not supported; use --bf16"
# Megatron-LM flag families refused by the start of their name: its mixture-of-experts flags
# (--moe-router-topk, --moe-grouped-gemm, ...) and its FP8 flags (--fp8-format, --fp8-recipe,
# --fp8-param-gather, ...; and `--fp8`, a common guess at them).
UNSUPPORTED_PREFIXES = {"--moe-": NO_EXPERTS, "--fp8": _NO_FP8}
UNSUPPORTED_MEGATRON_FLAGS = {
    "--hierarchical-context-parallel-sizes": NO_CONTEXT_PARALLEL,
    "--cp-comm-type": NO_CONTEXT_PARALLEL,
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
    "--expert-tensor-parallel-size": NO_EXPERTS,
    "--num-experts": NO_EXPERTS,
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
    "--test-data-path": ("lst-train validates on --valid-data-path (or --split's valid part) and "
                         "never reads a test split; drop the flag (lst-eval scores held-out "
                         "data, docs/evaluation.md)"),
    "--data-args-path": _DATA_ON_THE_COMMAND_LINE,
    "--per-split-data-args-path": _DATA_ON_THE_COMMAND_LINE,
    "--dataloader-type": ("the loader is always Megatron-LM's 'single' one (rows in training "
                          "order, a resume continues at the next row) over --train-iters x "
                          "--global-batch-size rows, which repeat the datasets' epochs as "
                          "needed; drop the flag"),
    "--num-dataset-builder-threads": ("the row indices are built by --index-workers processes; "
                                      "use that"),
    "--mid-level-dataset-surplus": ("each dataset of a blend is built for exactly the rows the "
                                    "blend takes from it; drop the flag"),
    "--dataloader-fast-cache-load": ("the other ranks load rank 0's cached row indices once it "
                                     "has built them; drop the flag"),
    "--multiple-validation-sets": _ONE_VALIDATION_BLEND,
    "--full-validation": _ONE_VALIDATION_BLEND,
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
    "--fp8-format": _NO_FP8,
    "--no-fp8-wgrad": _NO_FP8,
    "--data-parallel-random-init": ("every data-parallel replica starts from the same weights, "
                                    "drawn from --seed; drop the flag"),
    "--mock-data": ("there is no mock dataset: give --data-path (docs/data.md builds one; "
                    "`make demo` trains on a small generated corpus)"),
    "--tiktoken-pattern": _TOKENIZER_BY_PATH,
    "--cross-entropy-loss-fusion": _FUSIONS,
    "--grad-reduce-in-bf16": _NO_SUCH_SETTING,
    "--empty-unused-memory-level": _NO_SUCH_SETTING,
    "--no-mmap-bin-files": _NO_SUCH_SETTING,
    "--no-create-attention-mask-in-dataloader": _NO_SUCH_SETTING,
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


def refuse_unsupported_megatron_flags(argv: Sequence[str], config_keys: Sequence[str]) -> None:
    """ArgumentError for a Megatron-LM flag of UNSUPPORTED_MEGATRON_FLAGS or of a family of
    UNSUPPORTED_PREFIXES, on the command line (`--flag V` or `--flag=V`) or as a --config key."""
    given = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    given += [config_files.flag_of_key(key) for key in config_keys if isinstance(key, str)]
    for flag in given:
        reason = UNSUPPORTED_MEGATRON_FLAGS.get(flag) or next(
            (why for prefix, why in UNSUPPORTED_PREFIXES.items() if flag.startswith(prefix)), None)
        if reason is not None:
            raise ArgumentError(f"{flag} is a Megatron-LM flag that lst-train does not take: "
                                f"{reason}")
