"""lst-train flags: Megatron names, preset < YAML < command line, and up-front validation."""

import dataclasses
import errno
import os
from pathlib import Path

import pytest
import torch

from megatron_lst.data import input_files
from megatron_lst.training import arguments
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpointing import METADATA_FILENAME, TRACKER_FILENAME
from megatron_lst.training.config_files import (
    ConfigError,
    config_to_argv,
    config_to_defaults,
    load_config,
)
from training.training_cases import fake_checkpoint

CONFIGS = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))
BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3"]


def valid(*extra: str, world_size: int = 1):
    return validate_args(parse_args([*BASE, *extra]), world_size)


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# --- Megatron-LM flag names and derived fields --------------------------------------------

def test_megatron_flags_parse_to_megatron_destinations():
    args = valid("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                 "--micro-batch-size", "2", "--global-batch-size", "16", "--min-lr", "1e-4",
                 "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--clip-grad", "0.5",
                 "--weight-decay", "0.1", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--bf16",
                 "--data-path", "0.7", "a", "0.3", "b", "--save-interval", "5", "--save", "/x",
                 "--eval-interval", "5", "--log-interval", "1", "--seed", "7",
                 world_size=8)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.data_parallel_size == 2
    assert args.num_micro_batches == 16 // (2 * 2)
    assert args.lr_decay_iters == args.train_iters
    assert args.params_dtype_name == "bfloat16"
    assert args.data_path == ["0.7", "a", "0.3", "b"]
    assert args.ffn_hidden_size == 4 * 64 and args.num_query_groups == 4
    assert args.max_tokens == args.seq_length  # baseline: a token is a position


def test_global_batch_defaults_to_one_micro_batch_per_replica():
    args = valid("--micro-batch-size", "3", world_size=4)
    assert (args.global_batch_size, args.num_micro_batches) == (12, 1)


def test_validate_returns_a_copy():
    parsed = parse_args(BASE)
    validate_args(parsed, 1)
    assert not hasattr(parsed, "data_parallel_size")


# --- impossible combinations fail before any work, naming flags and fix -------------------

@pytest.mark.parametrize("extra, world_size, message", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     r"world size 6 is not divisible by --tensor-model-parallel-size 2 x "
     r"--pipeline-model-parallel-size 2"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
     r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--fp16", "--bf16"], 1, r"--fp16 and --bf16 are mutually exclusive"),
    (["--pipeline-model-parallel-size", "3"], 3, r"4 global layers do not split over 3 "
                                                 r"pipeline stages .* set "
                                                 r"--decoder-first-pipeline-num-layers .*, e.g. "
                                                 r"--decoder-first-pipeline-num-layers 2 alone "
                                                 r"\(stages \[2, 1, 1\]\)"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "4"], 2,
     r"the 0 remaining layers must divide evenly \(at least 1 each\) over the 1 other .*, e.g. "
     r"drop both \(even stages \[2, 2\]\)"),
    (["--pipeline-model-parallel-size", "8"], 8, r"4 global layers cannot fill 8 pipeline stages "
                                                 r"\(each needs at least 1\): use "
                                                 r"--pipeline-model-parallel-size 4 or less"),
    (["--decoder-last-pipeline-num-layers", "2"], 1, r"need --pipeline-model-parallel-size > 1"),
    (["--tensor-model-parallel-size", "8"], 8, r"--tensor-model-parallel-size 8 does not divide "
                                               r"--num-attention-heads 4, --num-query-groups 4: "
                                               r".*use one of \[1, 2, 4\]"),
    # The sizes that work divide the query groups too (was: no size named).
    (["--tensor-model-parallel-size", "4", "--num-query-groups", "2"], 4,
     r"does not divide --num-query-groups 2: .*use one of \[1, 2\]"),
    (["--tensor-model-parallel-size", "2", "--num-query-groups", "3"], 2,
     r"--num-attention-heads 4 is not divisible by --num-query-groups 3; use one of \[2, 4\]"),
    # No group count fits a tensor-parallel size that does not divide the heads (was: "use one
    # of []").
    (["--tensor-model-parallel-size", "8", "--num-query-groups", "3"], 8,
     r"--num-query-groups 3; use one of \[1, 2, 4\], with a --tensor-model-parallel-size that "
     r"divides it \(8 divides none of them\)"),
    (["--seq-length", "1"], 1, r"--seq-length must be at least 2"),
    (["--patching-mode", "static", "--patch-size", "0", "--max-tokens", "64"], 1,
     r"--patch-size must be at least 1"),
    (["--patching-mode", "curriculum", "--max-tokens", "64", "--curriculum-tau1", "50",
      "--curriculum-tau2", "10"], 1, r"--curriculum-tau1 50 must be >= 0 and <= "
                                     r"--curriculum-tau2 10"),
    (["--patching-mode", "curriculum", "--max-tokens", "64"], 1,
     r"needs --curriculum-tau1 and --curriculum-tau2"),
    (["--patching-mode", "static", "--max-tokens", "8"], 1,
     r"--max-tokens 8 is smaller than --seq-length 16"),
    (["--patching-mode", "static"], 1, r"--patching-mode static needs --max-tokens"),
    (["--max-tokens", "32"], 1, r"--max-tokens 32 differs from --seq-length 16 with "
                                r"--patching-mode none"),
    (["--loss-scale", "128"], 1, r"--loss-scale 128.0 applies only with --fp16"),
    (["--min-lr", "1"], 1, r"--min-lr 1.0 must be in \[0, --lr 0.001\]"),
    (["--lr-warmup-iters", "10"], 1, r"--lr-warmup-iters 10 must be in \[0, --lr-decay-iters 10\)"),
    (["--finetune"], 1, r"--finetune loads weights from --load DIR"),
    (["--data-path", "0.5", "a", "b"], 1, r"odd number of items|mixes weights and prefixes"),
    (["--data-path", "a", "0.5"], 1, r"mixes weights and prefixes"),
    (["--data-path", "a", "1", "b"], 1, r"mixes weights and prefixes; .* or prefixes without "
                                        r"weights 'P1 P2 ...'"),
    (["--train-data-path", "a", "./a"], 1, r"--train-data-path names './a' twice \(also as 'a'\)"
                                           r".*; give it once$"),
    (["--index-workers", "-1"], 1, r"--index-workers must be >= 0, got -1"),
    (["--speech-only-fraction", "1.5"], 1, r"--speech-only-fraction must be in \[0, 1\], got 1.5"),
    (["--speech-only-fraction", "0.5", "--task", "asr"], 1,
     r"--task asr rows are one utterance each: drop the flag"),
    (["--data-path", "a", "--train-data-path", "b"], 1, r"--data-path .* or --train-data-path .*not both"),
    (["--valid-data-path", "b"], 1, r"--valid-data-path goes with --train-data-path"),
    (["--train-data-path", "a", "b", "2"], 1, r"--train-data-path a b 2 mixes weights and prefixes"),
    (["--train-data-path", "a", "--valid-data-path", "0.5", "b", "-1", "c"], 1,
     r"--valid-data-path weights \['0.5', '-1'\] must be finite"),
    (["--distributed-timeout-minutes", "0"], 1, r"--distributed-timeout-minutes must be at least 1"),
    # Each of these used to pass validation and then hang, crash in torch or megatron.core, or
    # train wrongly (a NaN --clip-grad turned clipping off; --adam-eps 0 gave a NaN loss).
    (["--clip-grad", "nan"], 1, r"--clip-grad must be a finite number, got nan"),
    (["--lr", "inf"], 1, r"--lr must be a finite number, got inf"),
    (["--adam-eps", "0"], 1, r"--adam-eps must be positive"),
    (["--optimizer", "sgd", "--sgd-momentum", "-1"], 1, r"--sgd-momentum must be >= 0"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "-1"], 1,
     r"--lr-wsd-decay-iters -1 must be in \[1, --lr-decay-iters 10\]"),
    # a prefix named twice was refused only once training read the data, as bad data (status 4)
    (["--data-path", "0.5", "data/a", "0.3", "./data//a"], 1,
     r"--data-path names './data//a' twice \(also as 'data/a'\): .* summed weight 0.8"),
    (["--train-data-path", "1", "t", "2", "t"], 1,
     r"--train-data-path names 't' twice .* summed weight 3"),
    (["--hidden-size", "60"], 1,
     r"--hidden-size 60 over --num-attention-heads 4 makes attention heads of 15 channels, which "
     r"must be even"),
    (["--rotary-base", "0"], 1, r"--rotary-base must be positive"),
    (["--norm-epsilon", "-1"], 1, r"--norm-epsilon must be >= 0"),
    (["--init-method-std", "-1"], 1, r"--init-method-std must be >= 0"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "0"], 1, r"--recompute-num-layers must be at least 1"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "3"], 1,
     r"groups of --recompute-num-layers 3 layers, which must divide .* \[4\]"),
    (["--num-layers", "5", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "3", "--recompute-granularity", "full",
      "--recompute-method", "uniform", "--recompute-num-layers", "2"], 2,
     r"stage \[3, 2\]; use a divisor of 1"),
    (["--fp16", "--hysteresis", "0"], 1, r"--hysteresis must be at least 1"),
    (["--fp16", "--loss-scale-window", "0"], 1, r"--loss-scale-window must be at least 1"),
    (["--fp16", "--min-loss-scale", "0"], 1, r"--min-loss-scale 0.0 must be positive"),
    (["--data-path", "a", "--split", "abc"], 1, r"--split 'abc': expected comma-separated"),
    (["--data-path", "a", "--split", "nan,1,1"], 1, r"proportions must be finite"),
    (["--transformer-impl", "transformer_engine"], 1,
     r"--transformer-impl transformer_engine cannot run packed-document attention"),
], ids=lambda v: v if isinstance(v, int) else None)
def test_impossible_combinations_name_the_flags(extra, world_size, message):
    with pytest.raises(ArgumentError, match=message):
        valid(*extra, world_size=world_size)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the backends a CPU-only machine lacks")
@pytest.mark.parametrize("extra, message", [
    (["--distributed-backend", "nccl"], r"--distributed-backend nccl needs CUDA; use gloo"),
    (["--transformer-impl", "transformer_engine", "--no-reset-attention-mask"],
     r"--transformer-impl transformer_engine: .*needs transformer_engine installed and CUDA"),
    (["--patching-mode", "static", "--max-tokens", "64", "--local-encoder-layers", "1",
      "--local-encoder-hidden-size", "32", "--local-encoder-heads", "2",
      "--local-decoder-layers", "1", "--local-decoder-hidden-size", "32",
      "--local-decoder-heads", "2", "--kernel-backend", "triton"],
     r"--kernel-backend triton: backend='triton' on CPU tensors needs TRITON_INTERPRET=1|"
     r"--kernel-backend triton: backend='triton' needs the `triton` package"),
])
def test_backends_this_machine_cannot_run_are_named(extra, message, monkeypatch):
    """Each failed with a traceback once the model was built or ran."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ArgumentError, match=message):
        valid(*extra)


LST_FLAGS = ["--patching-mode", "static", "--max-tokens", "64", "--local-encoder-layers", "1",
             "--local-encoder-hidden-size", "32", "--local-encoder-heads", "2",
             "--local-decoder-layers", "1", "--local-decoder-hidden-size", "32",
             "--local-decoder-heads", "2"]


@pytest.mark.parametrize("cuda", [False, True])
def test_a_misspelled_kernel_backend_variable_is_a_flag_error(monkeypatch, cuda):
    """LST_KERNEL_BACKEND=trtion was a bare ValueError traceback from lst-train on CPU, and on
    CUDA it passed validation and failed at the model's first forward."""
    monkeypatch.setenv("LST_KERNEL_BACKEND", "trtion")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(ArgumentError, match=r"--kernel-backend auto with LST_KERNEL_BACKEND=trtion: "
                                            r"LST_KERNEL_BACKEND='trtion' is not one of"):
        valid(*LST_FLAGS, *(["--distributed-backend", "gloo"] if cuda else []))
    monkeypatch.setenv("LST_KERNEL_BACKEND", "torch")
    valid(*LST_FLAGS, *(["--distributed-backend", "gloo"] if cuda else []))
    monkeypatch.setenv("LST_KERNEL_BACKEND", "trtion")
    # An explicit choice ignores the variable, on CUDA too: the range attention takes it there.
    valid("--kernel-backend", "torch", *LST_FLAGS,
          *(["--distributed-backend", "gloo"] if cuda else []))


@pytest.mark.parametrize("model", [[], LST_FLAGS], ids=["baseline", "lst"])
def test_the_kernel_backend_variable_is_checked_for_the_range_attention_on_cuda(monkeypatch,
                                                                                model):
    """On CUDA the range attention of packed documents (the default, in the token baseline and
    LST's global model) and of LST's local windows runs on --kernel-backend; under "auto"
    LST_KERNEL_BACKEND decides, so a misspelled one is refused for the baseline too (which pools
    nothing), and an explicit --kernel-backend torch ignores it (it was refused when the range
    attention ran under "auto" whatever the flag said). Without CUDA that attention has its own
    path, and the baseline without packed documents runs no kernel."""
    monkeypatch.setenv("LST_KERNEL_BACKEND", "trtion")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ArgumentError, match=r"--kernel-backend auto with LST_KERNEL_BACKEND=trtion: "
                                            r"LST_KERNEL_BACKEND='trtion' is not one of"):
        valid("--distributed-backend", "gloo", *model)
    valid("--distributed-backend", "gloo", "--kernel-backend", "torch", *model)
    monkeypatch.setenv("LST_KERNEL_BACKEND", "torch")
    valid("--distributed-backend", "gloo", *model)
    monkeypatch.setenv("LST_KERNEL_BACKEND", "trtion")
    valid("--distributed-backend", "gloo", "--no-reset-attention-mask", "--kernel-backend",
          "triton")  # the baseline without packed documents runs no kernel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    valid("--kernel-backend", "torch", *model)


def test_heads_past_the_triton_kernel_are_refused_before_building_on_cuda(monkeypatch):
    """The Triton patch attention kernel refuses heads of more than 256 channels: a model whose
    cross-attention or packed-document global attention has them failed at its first forward on
    CUDA. Refused up front naming the heads and the switch to PyTorch attention."""
    pytest.importorskip("triton")
    monkeypatch.delenv("LST_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gloo = ["--distributed-backend", "gloo"]
    wide_cross = [*LST_FLAGS, "--local-encoder-hidden-size", "1024", "--local-decoder-hidden-size",
                  "1024", "--local-encoder-heads", "4", "--local-decoder-heads", "4",
                  "--cross-attn-heads", "2"]  # cross-attention heads of 512 channels
    with pytest.raises(ArgumentError, match=r"--kernel-backend auto runs the Triton patch "
                                            r"attention kernel, .* up to 256 channels .*"
                                            r"cross-attention heads have 512: pass "
                                            r"--kernel-backend torch"):
        valid(*gloo, *wide_cross)
    valid(*gloo, *wide_cross, "--kernel-backend", "torch")
    wide_global = ["--kv-channels", "320"]
    with pytest.raises(ArgumentError, match=r"--kernel-backend auto runs the Triton .* global "
                                            r"attention heads have 320: pass "
                                            r"--kernel-backend torch"):
        valid(*gloo, *wide_global)
    with pytest.raises(ArgumentError, match=r"--kernel-backend triton runs the Triton .* global "
                                            r"attention heads have 320"):
        valid(*gloo, *wide_global, "--kernel-backend", "triton")
    valid(*gloo, *wide_global, "--no-reset-attention-mask")  # megatron's own attention then
    valid(*gloo, *wide_global, "--kernel-backend", "torch")
    monkeypatch.setenv("LST_KERNEL_BACKEND", "torch")
    valid(*gloo, *wide_global)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LST_KERNEL_BACKEND")
    valid(*wide_global)
    valid(*wide_cross)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_local_heads_past_the_triton_kernel_are_refused_naming_the_flag(monkeypatch, side):
    """A local window's heads wider than 256 channels (--local-*-kv-channels, or hidden / heads):
    flash-attn does not take them, so on CUDA the window ran the Triton range kernel, which
    refused them at the first forward. Refused up front naming the flag and the switch; a row
    no longer than the window without documents runs PyTorch's causal kernel and is taken."""
    pytest.importorskip("triton")
    monkeypatch.delenv("LST_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gloo = ["--distributed-backend", "gloo"]
    wide = [*LST_FLAGS, f"--local-{side}-kv-channels", "320"]
    with pytest.raises(ArgumentError, match=rf"--kernel-backend auto runs the "
                                            rf"Triton .* local {side} self-attention "
                                            rf"\(--local-{side}-kv-channels 320\) heads have 320: "
                                            r"pass --kernel-backend torch"):
        valid(*gloo, *wide)
    valid(*gloo, *wide, "--kernel-backend", "torch")
    # Wide heads from hidden / heads name those two flags.
    with pytest.raises(ArgumentError, match=rf"\(--local-{side}-hidden-size 1024 / "
                                            rf"--local-{side}-heads 2\) heads have 512"):
        valid(*gloo, *LST_FLAGS, "--local-encoder-hidden-size", "1024",
              "--local-decoder-hidden-size", "1024", "--cross-attn-heads", "8",
              f"--local-{'decoder' if side == 'encoder' else 'encoder'}-kv-channels", "64")
    # Rows of 64 tokens fit a window of 64 and hold one document: no range attention.
    valid(*gloo, *wide, "--no-reset-attention-mask", f"--local-{side}-window", "64")
    with pytest.raises(ArgumentError, match=rf"local {side} self-attention"):
        valid(*gloo, *wide, "--no-reset-attention-mask", f"--local-{side}-window", "63")
    monkeypatch.setenv("LST_KERNEL_BACKEND", "torch")
    valid(*gloo, *wide)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LST_KERNEL_BACKEND")
    valid(*wide)  # the CPU path takes any head size


@pytest.mark.skipif(torch.cuda.is_available(), reason="the backends a CPU-only machine lacks")
def test_a_kernel_backend_variable_this_machine_cannot_run_is_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LST_KERNEL_BACKEND", "triton")
    with pytest.raises(ArgumentError, match=r"--kernel-backend auto with LST_KERNEL_BACKEND=triton: "
                                            r"LST_KERNEL_BACKEND=triton (on CPU|needs the "
                                            r"`triton`)"):
        valid(*LST_FLAGS)


@pytest.mark.parametrize("given", [
    ["--hierarchical-context-parallel-sizes", "2", "2"],
    ["--expert-tensor-parallel-size", "2"],
    # Megatron-LM layout flags that were a bare "unrecognized arguments".
    ["--pipeline-model-parallel-layout", "Et|tL"],
    ["--use-torch-fsdp2"],
    ["--cp-comm-type", "p2p"],
    ["--encoder-pipeline-model-parallel-size", "1"],
    # Megatron-LM's GQA switch, from a ported script: was "unrecognized arguments"
    ["--group-query-attention", "--num-query-groups", "2"],
    ["--config", "CONFIG"],  # the same key in a --config file
])
def test_unsupported_megatron_flags_are_named_not_unrecognized(tmp_path, given):
    config = tmp_path / "config.yaml"
    config.write_text("cp-comm-type: p2p\n")
    given = [str(config) if value == "CONFIG" else value for value in given]
    flag = "--cp-comm-type" if "--config" in given else given[0].split("=")[0]
    with pytest.raises(ArgumentError, match=rf"{flag} is a Megatron-LM flag that lst-train does "
                                            rf"not take: .*(use|dense|split|encoder)"):
        parse_args(given)


@pytest.mark.parametrize("given, reason", [
    # Megatron-LM data flags of a ported launch script: were "unrecognized arguments".
    (["--test-data-path", "a"], "never reads a test split; drop the flag"),
    (["--per-split-data-args-path", "splits.json"], "give the datasets on the command line"),
    (["--dataloader-type", "cyclic"], "always Megatron-LM's 'single' one"),
    (["--num-dataset-builder-threads", "4"], "use that"),
])
def test_megatron_data_flags_are_named_with_what_to_do(given, reason):
    with pytest.raises(ArgumentError, match=rf"{given[0]} is a Megatron-LM flag that lst-train "
                                            rf"does not take: .*{reason}"):
        parse_args(given)


@pytest.mark.parametrize("key", ["cp_comm_type", "--cp-comm-type"])
def test_unsupported_megatron_flag_is_named_under_any_spelling_of_its_config_key(tmp_path, key):
    # A key spelled with underscores (as argparse's dest, Megatron-LM's args.yaml) or with the
    # dashes was "unknown key ...; did you mean 'tensor-model-parallel-size'?".
    config = tmp_path / "config.yaml"
    config.write_text(f"{key}: p2p\n")
    with pytest.raises(ArgumentError, match=r"--cp-comm-type is a Megatron-LM flag that "
                                            r"lst-train does not take: context parallelism"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize("flag", ["--context-parallel-size", "--expert-model-parallel-size"])
def test_megatron_parallel_sizes_of_one_are_taken_and_more_refused(tmp_path, flag):
    # Megatron-LM launch scripts spell out `--context-parallel-size 1` for models that use no
    # context parallelism: that was refused like any context parallelism.
    assert valid(*LST_FLAGS, flag, "1")
    config = tmp_path / "config.yaml"
    config.write_text(f"{flag.lstrip('-').replace('-', '_')}: 1\n")
    assert valid(*LST_FLAGS, "--config", str(config))
    reason = "context parallelism" if "context" in flag else "no experts"
    with pytest.raises(ArgumentError, match=rf"{flag} 2: .*{reason}.*only 1 \(the default\)"):
        valid(*LST_FLAGS, flag, "2")


@pytest.mark.parametrize(("given", "instead"), [
    # Flags of Megatron-LM's example launch scripts (examples/gpt3, examples/llama,
    # examples/mixtral), each a bare "unrecognized arguments" before.
    (["--lr-warmup-fraction", ".001"], r"--lr-warmup-iters"),
    (["--rampup-batch-size", "16", "16", "5859375"], r"--global-batch-size"),
    (["--train-samples", "1000"], r"--train-iters"),
    (["--lr-decay-samples", "1000"], r"--lr-decay-iters"),
    (["--weight-decay-incr-style", "constant"], r"--weight-decay"),
    (["--recompute-activations"], r"--recompute-granularity selective"),
    (["--tokenizer-type", "GPT2BPETokenizer"], r"--tokenizer-model"),
    (["--vocab-file", "v.json", "--merge-file", "m.txt"], r"--tokenizer-model"),
    (["--vocab-size", "32000"], r"--num-units"),
    (["--make-vocab-size-divisible-by", "128"], r"--num-units"),
    (["--data-cache-path", "/tmp/cache"], r"--save"),
    (["--normalization=RMSNorm"], r"RMSNorm, SwiGLU"),
    (["--swiglu"], r"drop the flag, and give --ffn-hidden-size: its default is 4 x --hidden-size"),
    (["--untie-embeddings-and-output-weights"], r"untied output weights"),
    (["--position-embedding-type", "rope"], r"--rotary-base"),
    (["--disable-bias-linear"], r"no linear biases"),
    (["--use-mcore-models"], r"megatron.core's"),
    (["--use-flash-attn"], r"--transformer-impl"),
    (["--no-masked-softmax-fusion"], r"--transformer-impl"),
    (["--ckpt-format", "torch_dist"], r"its own distributed checkpoint format"),
    (["--log-throughput"], r"--log-interval"),
    (["--tensorboard-log-interval", "1"], r"use --log-interval"),
    (["--wandb-save-dir", "/tmp/w"], r"WANDB_DIR"),
    # examples/llama/train_llama3_8b_h100_fp8.sh
    (["--rotary-percent", "1.0"], r"every channel"),
    (["--calculate-per-token-loss"], r"token mean"),
    (["--decoupled-lr", "5e-4"], r"--lr"),
    (["--fp8-format", "hybrid"], r"use --bf16"),
    # every FP8 flag, and --fp8 (no Megatron-LM flag, but the one users guess), not only
    # --fp8-format: the others failed as argparse's "unrecognized arguments"
    (["--fp8"], r"FP8 training is not supported; use --bf16"),
    (["--fp8-recipe", "delayed"], r"FP8 training is not supported; use --bf16"),
    (["--fp8-param-gather"], r"FP8 training is not supported; use --bf16"),
    (["--no-fp8-wgrad"], r"FP8 training is not supported; use --bf16"),
    (["--data-parallel-random-init"], r"same weights, drawn from --seed"),
    (["--mock-data"], r"--data-path"),
    (["--empty-unused-memory-level", "1"], r"no such setting; drop the flag"),
    # examples/mixtral: every mixture-of-experts flag, not only --num-experts
    (["--moe-router-topk", "2"], r"dense: there are no experts"),
    (["--moe-grouped-gemm"], r"dense: there are no experts"),
])
def test_megatron_launch_script_flags_are_refused_with_what_to_use(given, instead):
    with pytest.raises(ArgumentError, match=rf"{given[0].split('=')[0]} is a Megatron-LM flag "
                                            rf"that lst-train does not take: .*{instead}"):
        parse_args([*BASE, *given])


def test_eval_iters_zero_is_megatrons_no_validation_and_negative_is_refused():
    assert valid("--eval-iters", "0").eval_iters == 0
    with pytest.raises(ArgumentError, match=r"--eval-iters must be >= 0 \(0: no validation\), "
                                            r"got -1"):
        valid("--eval-iters", "-1")


def test_megatron_gqa_switch_says_that_query_groups_suffice():
    with pytest.raises(ArgumentError, match=r"--group-query-attention is a Megatron-LM flag .*: "
                                            r"grouped-query attention needs no switch here: "
                                            r"--num-query-groups below --num-attention-heads"):
        parse_args(["--group-query-attention", "--num-query-groups", "2"])


def test_missing_model_size_names_the_flags():
    with pytest.raises(ArgumentError, match=r"missing --num-layers, --hidden-size"):
        validate_args(parse_args(["--seq-length", "16", "--train-iters", "1", "--lr", "1"]), 1)


def test_lst_local_sizes_are_checked():
    lst = ["--patching-mode", "static", "--max-tokens", "64", "--local-encoder-layers", "1",
           "--local-encoder-hidden-size", "30", "--local-encoder-heads", "4",
           "--local-decoder-layers", "1", "--local-decoder-hidden-size", "32",
           "--local-decoder-heads", "4"]
    with pytest.raises(ArgumentError, match=r"--local-encoder-hidden-size 30 is not divisible"):
        valid(*lst)
    with pytest.raises(ArgumentError, match=r"missing --local-encoder-layers"):
        valid("--patching-mode", "aligned", "--max-tokens", "64")
    lst[lst.index("30")] = "64"
    with pytest.raises(ArgumentError, match=r"--local-decoder-hidden-size 32 must equal "
                                            r"--local-encoder-hidden-size 64"):
        valid(*lst)


def test_sequence_parallel_without_tensor_parallel_warns_and_turns_off(caplog):
    args = valid("--sequence-parallel")
    assert args.sequence_parallel is False
    assert "--sequence-parallel has no effect" in caplog.text


def test_save_interval_without_save_warns(caplog):
    valid("--save-interval", "5")
    assert "no checkpoints will be written" in caplog.text



def test_curriculum_beyond_the_run_warns(caplog):
    model = ["--patching-mode", "curriculum", "--max-tokens", "64",
             "--local-encoder-layers", "1", "--local-encoder-hidden-size", "32",
             "--local-encoder-heads", "4", "--local-decoder-layers", "1",
             "--local-decoder-hidden-size", "32", "--local-decoder-heads", "4"]
    curriculum = [*model, "--curriculum-tau1", "5"]
    # --train-iters 10 runs steps 0 .. 9 (iteration i is step i - 1).
    valid(*curriculum, "--curriculum-tau2", "9")  # static from step 9: iteration 10
    assert "static phase" not in caplog.text
    valid(*curriculum, "--curriculum-tau2", "10")  # step 10 is never trained
    assert ("--curriculum-tau1 5 / --curriculum-tau2 10 with --train-iters 10: this run ends "
            "before its static phase (every document static from step 10, iteration 11; "
            "iteration 10 is step 9)") in caplog.text
    caplog.clear()
    # tau1 == tau2: step tau1 is still aligned, static from tau1 + 1.
    valid(*model, "--curriculum-tau1", "8", "--curriculum-tau2", "8")  # static from step 9
    assert "static phase" not in caplog.text
    valid(*model, "--curriculum-tau1", "9", "--curriculum-tau2", "9")  # static from step 10
    assert ("--curriculum-tau1 9 / --curriculum-tau2 9 with --train-iters 10: this run ends "
            "before its static phase (every document static from step 10, iteration 11") in caplog.text


def test_distributed_optimizer_in_fp32_is_allowed():
    args = valid("--use-distributed-optimizer", world_size=2)
    assert args.use_distributed_optimizer and args.params_dtype_name == "float32"


def test_missing_tensorboard_is_named_with_the_install_command(monkeypatch):
    import importlib.util

    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else original(name, *a))
    with pytest.raises(ArgumentError, match=r"pip install tensorboard"):
        valid("--tensorboard-dir", "/tmp/tb")


# --- --load: no checkpoint yet (auto-resume) versus a missing or corrupt one -------------

def test_load_directory_missing(tmp_path):
    with pytest.raises(ArgumentError, match=r"--load .*does not exist"):
        valid("--load", str(tmp_path / "nowhere"))
    auto_resume = valid("--load", str(tmp_path / "run"), "--save", str(tmp_path / "run"))
    assert auto_resume.resume_from is None


@pytest.mark.parametrize("flags", [["--save", "FILE"], ["--save", "FILE/run"],
                                   ["--load", "FILE"], ["--save", "FILE", "--load", "FILE"]])
def test_a_file_where_the_checkpoint_directory_goes_is_refused(tmp_path, flags):
    """--save under a file failed with NotADirectoryError once the datasets were built; --load
    of a file said it did not exist."""
    (tmp_path / "file").write_text("")
    flags = [flag.replace("FILE", str(tmp_path / "file")) for flag in flags]
    advice = "give a directory" if flags[0] == "--save" else "point --load at a --save directory"
    with pytest.raises(ArgumentError, match=rf"{flags[0]} .*: {tmp_path / 'file'} is a file, "
                                            rf"not a directory; {advice}"):
        valid(*flags)


def test_load_directory_without_checkpoint(tmp_path):
    with pytest.raises(ArgumentError, match=r"holds no complete checkpoint"):
        valid("--load", str(tmp_path))
    assert valid("--load", str(tmp_path), "--save", str(tmp_path)).resume_from is None


def test_load_directory_of_another_program_names_what_its_checkpoints_lack(tmp_path):
    """A Megatron-LM save directory has iter_XXXXXXX directories without our metadata; the
    message said there was no iter_XXXXXXX directory at all."""
    fake_checkpoint(tmp_path, 10, complete=False)
    with pytest.raises(ArgumentError, match=rf"--load {tmp_path} holds no complete checkpoint "
                                            rf"\(its iter_0000010 lack\(s\) {METADATA_FILENAME}, "
                                            rf".*another program .*written by lst-train --save"):
        valid("--load", str(tmp_path))


def test_load_directory_with_checkpoint_and_corrupt_pointer(tmp_path):
    checkpoint = tmp_path / "iter_0000020"
    checkpoint.mkdir()
    (checkpoint / "metadata.json").write_text("{}")
    (checkpoint / METADATA_FILENAME).write_text("{}")
    assert valid("--load", str(tmp_path)).resume_from == str(checkpoint)
    (tmp_path / TRACKER_FILENAME).write_text("40")
    with pytest.raises(ArgumentError, match=r"--load .*names iteration 40.*corrupt"):
        valid("--load", str(tmp_path), "--save", str(tmp_path))


def test_save_directory_with_newer_checkpoints_is_refused_before_training(tmp_path):
    """Resuming an older checkpoint (or starting over) into a --save directory with newer ones
    would train up to the first colliding save and fail there, or save behind them."""
    for iteration in (10, 20):
        fake_checkpoint(tmp_path, iteration)
    save = ("--save", str(tmp_path))
    assert valid("--load", str(tmp_path), *save).resume_from == str(tmp_path / "iter_0000020")
    with pytest.raises(ArgumentError, match=r"already holds \['iter_0000020'\], newer than "
                                            r"iteration 10"):
        valid("--load", str(tmp_path), "--ckpt-step", "10", *save)
    with pytest.raises(ArgumentError, match=r"already holds \['iter_0000010', 'iter_0000020'\]"):
        valid(*save)
    with pytest.raises(ArgumentError, match=r"newer than iteration 0.*pass another --save"):
        valid("--load", str(tmp_path), "--finetune", *save)
    assert valid("--load", str(tmp_path), "--finetune", "--save", str(tmp_path / "new")).finetune


def test_resuming_from_elsewhere_into_a_save_holding_another_runs_checkpoints_is_refused(
        tmp_path):
    """--load A --save B, B holding checkpoints of another run no newer than where this run
    starts: they stayed beside this run's, and after its first save the advice after a
    divergence named B's older checkpoint of the other run as the one to go back to."""
    import shutil

    from megatron_lst.checkpoint.integrity import record_checkpoint_files, write_manifest

    def with_manifest(checkpoint: Path) -> Path:
        (checkpoint / "__0_0.distcp").write_bytes(checkpoint.parent.name.encode())
        write_manifest(checkpoint, record_checkpoint_files(checkpoint))
        return checkpoint

    resumed = with_manifest(fake_checkpoint(tmp_path / "A", 100))
    other = tmp_path / "B"
    for iteration in (50, 100):
        with_manifest(fake_checkpoint(other, iteration))
    with pytest.raises(ArgumentError, match=(
            rf"--save {other} already holds \['iter_0000050', 'iter_0000100'\], and this run "
            rf"resumes from {resumed}, outside it: .* Pass an empty --save, or --save "
            rf"{tmp_path / 'A'} to go on")):
        valid("--load", str(tmp_path / "A"), "--save", str(other))
    # Its own directory, an empty one, or one that holds a copy of the checkpoint it resumes.
    shutil.copytree(tmp_path / "A", tmp_path / "copy")
    for save in (tmp_path / "A", tmp_path / "empty", tmp_path / "copy"):
        assert valid("--load", str(resumed), "--save", str(save)).resume_from == str(resumed)
    fake_checkpoint(tmp_path / "copy", 50)  # an earlier checkpoint of the run it continues
    assert valid("--load", str(tmp_path / "A"), "--save", str(tmp_path / "copy")).resume_from
    # A checkpoint of the same iteration with other weights is no copy.
    (resumed / "__0_0.distcp").write_bytes(b"other weights")
    write_manifest(resumed, record_checkpoint_files(resumed))
    with pytest.raises(ArgumentError, match=r"already holds \['iter_0000050', 'iter_0000100'\]"):
        valid("--load", str(tmp_path / "A"), "--save", str(tmp_path / "copy"))


# --- presets and YAML ----------------------------------------------------------------------

def test_precedence_is_preset_then_yaml_then_command_line(tmp_path):
    config = write_yaml(tmp_path, "preset: tiny-cpu\nhidden_size: 96\nnum-layers: 4\nlr: 3e-4\n")
    args = parse_args(["--config", config, "--num-layers", "6"])
    assert args.num_layers == 6  # command line beats YAML
    assert args.hidden_size == 96  # YAML beats preset
    assert args.num_attention_heads == 4  # from the preset
    assert args.lr == 3e-4  # PyYAML reads 3e-4 as a string; the flag's type converts it
    assert parse_args(["--config", config, "--preset", "paper-1b"]).num_attention_heads == 16


def test_yaml_switches_and_lists(tmp_path):
    config = write_yaml(tmp_path, "bf16: true\nsequence-parallel: false\nno-load-rng: true\n"
                                  "data-path: [0.67, text, 0.33, speech]\n")
    args = parse_args(["--config", config])
    assert args.bf16 is True and args.sequence_parallel is False and args.no_load_rng is True
    assert args.data_path == ["0.67", "text", "0.33", "speech"]


def test_yaml_values_of_text_flags_are_taken_as_written(tmp_path):
    """YAML 1.1 read `0755` as the octal 493, `2024_01` as 202401, `yes` as True and a date as a
    date: `save: 0755` saved into the directory 493. The command line takes them as written."""
    config = write_yaml(tmp_path, "save: 0755\nload: yes\ntokenizer-model: 2024-01-01\n"
                                  "data-path: [0.5, 2024_01, 0.50, '007', 5e-1, 0x1f]\n"
                                  "seq-length: 016\nlr: 1e-3\n")
    args = parse_args(["--config", config])
    assert (args.save, args.load, args.tokenizer_model) == ("0755", "yes", "2024-01-01")
    assert args.data_path == ["0.5", "2024_01", "0.50", "007", "5e-1", "0x1f"]
    # `016` is YAML's octal 14; `--seq-length 016` is 16
    assert args.seq_length == 16 and args.lr == 1e-3
    argv = config_to_argv(load_config(config), arguments.build_parser())
    assert argv[argv.index("--save") + 1] == "0755"
    assert argv[argv.index("--data-path") + 1:argv.index("--data-path") + 3] == ["0.5", "2024_01"]


@pytest.mark.parametrize(("written", "refused"), [
    ("seq-length: 0x10", r"--seq-length takes an integer, got '0x10'"),  # YAML: 16
    ("seq-length: 0o17", r"--seq-length takes an integer, got '0o17'"),  # YAML: 15
    ("seq-length: 0b101", r"--seq-length takes an integer, got '0b101'"),  # YAML: 5
    ("seq-length: 1:30", r"--seq-length takes an integer, got '1:30'"),  # YAML base 60: 90
    ("seq-length: 2048.0", r"--seq-length takes an integer, got '2048.0'"),  # YAML: 2048
    ("lr: .inf", r"--lr takes a number, got '.inf'"),  # YAML: inf
    ("lr: 1_0.5", None),  # the same 10.5 on both sides
    ("seq-length: 1_000", None),  # Python's int() reads it, on the command line too
    ("seq-length: '+16'", None),
])
def test_a_number_in_a_config_means_what_the_same_text_means_on_the_command_line(
        tmp_path, capsys, written, refused):
    """YAML 1.1 reads `0x10` as 16 and `1:30` as 90, where the command line refuses
    `--seq-length 0x10`: a config value is now the text the file writes, read as the command
    line reads it."""
    key, text = written.split(": ")
    on_the_command_line = ["--" + key, text.strip("'")]
    config = write_yaml(tmp_path, written + "\n")
    if refused is None:
        from_config, from_argv = (vars(parse_args(["--config", config])),
                                  vars(parse_args(on_the_command_line)))
        assert (from_config.pop("config"), from_argv.pop("config")) == (config, None)
        assert from_config == from_argv
        return
    with pytest.raises(ArgumentError, match=refused):
        parse_args(["--config", config])
    with pytest.raises(SystemExit):
        parse_args(on_the_command_line)
    err = capsys.readouterr().err
    assert f"argument --{key}: invalid" in err and f"'{text}'" in err, err


@pytest.mark.parametrize("key", ["override-opt_param-scheduler", "override_opt_param_scheduler",
                                 "override-opt-param-scheduler"])
def test_a_flag_spelled_with_an_underscore_is_a_config_key_in_any_spelling(tmp_path, key):
    # Megatron-LM's --override-opt_param-scheduler, written as the flag is spelled, was
    # "unknown key 'override-opt_param-scheduler'; did you mean 'override-opt_param-scheduler'".
    args = parse_args([*BASE, "--config", write_yaml(tmp_path, f"{key}: true\n")])
    assert args.override_opt_param_scheduler and not args.use_checkpoint_opt_param_scheduler


@pytest.mark.parametrize("text, message", [
    ("micro_bach_size: 2\n", r"unknown key 'micro_bach_size'; did you mean 'micro-batch-size'"),
    ("patching-mode: dynamic\n", r"'dynamic' is not one of"),
    ("num-layers: 2.5\n", r"--num-layers takes an integer"),
    # "takes a int", "takes a float"
    ("num-layers: two\n", r"--num-layers takes an integer, got 'two'"),
    ("lr: fast\n", r"--lr takes a number, got 'fast'"),
    ("bf16: yes please\n", r"--bf16 is a switch; write true or false"),
    ("seq-length: [1, 2]\n", r"--seq-length takes one value"),
    ("config: other.yaml\n", r"unknown key 'config'"),
    # PyYAML keeps the last of a repeated key, and a null replaced the default: both were silent.
    ("lr: 1e-3\nseq-length: 16\nlr: 1e-2\n", r"key 'lr' appears twice \(lines 1 and 3\)"),
    ("seq-length: 16\nseq_length: 32\n", r"keys 'seq-length' and 'seq_length' both set --seq-length"),
    ("micro-batch-size: null\n", r"--micro-batch-size cannot be null; give a value, or leave "
                                  r"the key out for its default 1"),
    ("- a\n- b\n", r"must be a mapping"),
    # --seed's own type: its ArgumentTypeError and int(inf)'s OverflowError were tracebacks, and
    # 1.5 became seed 1 (the command line refuses --seed 1.5).
    ("seed: -1\n", r"--seed: -1 is not in \[0, 2147483647\]"),
    ("seed: .inf\n", r"--seed: not an integer: '.inf'"),
    ("seed: 1.5\n", r"--seed: not an integer: '1.5'"),
    # one string was one path, '0.67 a 0.33 b', refused later as a manifest not found
    ("data-path: '0.67 a 0.33 b'\n", r"--data-path takes a list, and '0.67 a 0.33 b' is one "
                                     r"string; write \[0.67, a, 0.33, b\]"),

    # a null item was the path 'None'; a YAML set one path "{'b', 'a'}"
    ("data-path: [0.5, a, 0.5, null]\n", r"--data-path takes a list without nulls, got "
                                          r"\['0.5', 'a', '0.5', None\]; leave the null out"),
    ("data-path: !!set {a, b}\n", r"data-path: nested value \{.*\} is not a flag value"),
    ("save: !!set {a}\n", r"--save takes one value, got \{'a'\}"),
    # a merge key's values bypassed the text as written (`save: 0755` became --save 493)
    ("seq-length: 16\n<<: {save: 0755}\n", r"line 2 merges a mapping into this one \(<<\); "
                                            r"write each flag as a key of its own"),
    # PyYAML's recursion was a RecursionError traceback
    ("data-path: " + "[" * 5000 + "]" * 5000 + "\n", r"nest lists or mappings too deeply"),
])
def test_bad_yaml_names_the_key_and_the_fix(tmp_path, text, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(["--config", write_yaml(tmp_path, text)])
    if not text.startswith("-"):
        with pytest.raises(ConfigError, match=message):
            config_to_argv(load_config(write_yaml(tmp_path, text)), arguments.build_parser())


def test_a_config_that_is_no_utf8_file_is_named(tmp_path):
    """Non-UTF-8 bytes were a UnicodeDecodeError traceback."""
    config = tmp_path / "run.yaml"
    config.write_bytes(b"seq-length: 16\nlr: \xff\n")
    with pytest.raises(ArgumentError, match=r"run.yaml is not UTF-8 text \(invalid start byte "
                                            r"at byte 19\); save it as UTF-8"):
        parse_args(["--config", str(config)])
    with pytest.raises(ArgumentError, match=rf"--config {tmp_path}: is a directory, not a file"):
        parse_args(["--config", str(tmp_path)])


def test_a_config_that_cannot_be_read_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A file the user may not read was a PermissionError traceback. Root reads any file, so
    there the open is made to fail as it does for another user."""
    config = tmp_path / "run.yaml"
    config.write_text("seq-length: 16\n")
    if os.geteuid() == 0:
        def refused(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        monkeypatch.setattr(input_files, "open", refused, raising=False)
    else:
        config.chmod(0)
    with pytest.raises(ArgumentError, match=rf"--config {config}: cannot read the file "
                                            rf"\(Permission denied\); make it readable"):
        parse_args(["--config", str(config)])


def test_a_config_that_is_a_fifo_is_refused_before_it_blocks(tmp_path):
    """Opening a FIFO waited for a writer that never comes."""
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ArgumentError, match=rf"--config {fifo}: is a FIFO \(named pipe\), not a "
                                            rf"file"):
        parse_args(["--config", str(fifo)])


def test_unknown_preset_is_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "13b"])
    assert "argument --preset: invalid choice: '13b'" in capsys.readouterr().err



@pytest.mark.parametrize("seed", ["-1", str(2**31), "x"])
def test_seeds_numpy_cannot_take_are_usage_errors(seed, capsys):
    """--seed -1 passed, then numpy refused it inside set-up ('Seed must be between 0 and
    2**32 - 1', naming no flag); lst-eval and lst-generate use the same type."""
    from megatron_lst.evaluation.eval_cli import build_eval_parser

    with pytest.raises(SystemExit):
        parse_args([*BASE, "--seed", seed])
    assert "argument --seed:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_eval_parser().parse_args(["--load", "x", "--seed", seed])
    assert "argument --seed:" in capsys.readouterr().err
    assert parse_args([*BASE, "--seed", str(2**31 - 1)]).seed == 2**31 - 1

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_validate_and_equal_their_command_line(path):
    parser = arguments.build_parser()
    from_yaml = parse_args(["--config", str(path)])
    from_argv = parse_args(config_to_argv(load_config(path), parser))
    assert {k: v for k, v in vars(from_yaml).items() if k != "config"} == \
        {k: v for k, v in vars(from_argv).items() if k != "config"}
    world_size = from_yaml.tensor_model_parallel_size * from_yaml.pipeline_model_parallel_size
    args = validate_args(from_yaml, world_size)
    assert args.global_batch_size % (args.micro_batch_size * args.data_parallel_size) == 0
    assert config_to_defaults(load_config(path), parser, source=path)


def test_shipped_configs_cover_the_paper_runs():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu_lst.yaml", "tiny_cpu_baseline.yaml", "paper_1b_lst.yaml",
            "paper_1b_baseline.yaml", "7b_lst.yaml"} <= names
    paper = validate_args(parse_args(["--config", str(CONFIGS[0].parent / "paper_1b_lst.yaml")]), 8)
    assert (paper.num_layers, paper.hidden_size, paper.num_attention_heads) == (25, 2048, 16)
    assert (paper.local_encoder_layers, paper.local_decoder_layers) == (1, 9)
    assert paper.local_encoder_hidden_size == paper.local_decoder_hidden_size == 1024
    assert paper.cross_attn_window_encoder == paper.cross_attn_window_decoder == 512
    assert paper.rotary_base == 500000 and paper.patching_mode == "curriculum"


def test_preset_names_are_the_model_presets():
    from megatron_lst.models.config import PRESETS

    assert arguments.PRESET_NAMES == PRESETS


@pytest.mark.parametrize("name", arguments.PRESET_NAMES)
def test_preset_flags_build_the_preset_model(name):
    from megatron_lst.models.config import DocumentMaskingConfig, preset
    from megatron_lst.training.model_provider import lst_config_from_args

    config = preset(name, vocab_size=1020)
    run = ["--preset", name, "--seq-length", "8", "--train-iters", "1", "--lr", "1e-3"]
    lst = validate_args(parse_args([*run, "--patching-mode", "static",
                                    "--max-tokens", str(config.max_sequence_length)]), 1)
    # --reset-attention-mask is on by default: documents end at the vocabulary's EOS.
    documents = DocumentMaskingConfig(eos_id=2)
    assert lst_config_from_args(lst, 1020, eos_id=2) == dataclasses.replace(config, documents=documents)
    baseline = lst_config_from_args(validate_args(parse_args(run), 1), 1020, eos_id=2)
    assert (baseline.global_model, baseline.rope_theta, baseline.max_sequence_length) == \
        (config.global_model, config.rope_theta, config.max_sequence_length)


@pytest.mark.parametrize("data_path, prefixes", [
    (["a"], ["a"]), (["0.7", "a", "0.3", "b"], ["a", "b"]), (["1", "a", "0", "b"], ["a", "b"]),
    # Megatron-LM's list without weights: blended by the datasets' sizes.
    (["a", "b"], ["a", "b"]), (["a", "b", "c"], ["a", "b", "c"])])
def test_accepted_data_paths_are_ones_the_blend_reads(data_path, prefixes):
    # validate_args must accept exactly what megatron_lst.data.blend can build.
    from megatron_lst.data.blend import parse_data_path

    assert valid("--data-path", *data_path).data_path == data_path
    assert [prefix for _, prefix in parse_data_path(data_path)] == prefixes


def test_patching_choices_are_the_patchers():
    # arguments.py keeps its own copy so that parsing flags does not import torch.
    from megatron_lst.patching.curriculum import PATCHING_MODES
    from megatron_lst.patching.patchers import SILENCE_MODES

    parser = arguments.build_parser()
    choices = {action.dest: tuple(action.choices) for action in parser._actions if action.choices}
    assert choices["patching_mode"] == PATCHING_MODES == arguments.PATCHING_MODES
    assert choices["silence_patching"] == SILENCE_MODES


def test_uneven_pipeline_stages_split_like_megatron():
    from megatron_lst.parallel import pipeline_stage_layers

    args = valid("--num-layers", "25", "--pipeline-model-parallel-size", "4",
                 "--decoder-first-pipeline-num-layers", "7",
                 "--decoder-last-pipeline-num-layers", "4", world_size=4)
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == (7, 4)
    assert pipeline_stage_layers(25, 4, 7, 4) == [7, 7, 7, 4]
    assert pipeline_stage_layers(25, 2, None, 12) == [13, 12]
    assert pipeline_stage_layers(24, 4) == [6, 6, 6, 6]


def test_megatron_performance_flags_reach_the_configs():
    from megatron_lst.models.config import preset
    from megatron_lst.training.model_provider import transformer_config_from_args

    args = valid("--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1", "--transformer-impl", "local",
                 "--overlap-grad-reduce", "--distributed-backend", "gloo")
    assert (args.transformer_impl, args.overlap_grad_reduce, args.distributed_backend) == (
        "local", True, "gloo")
    config = transformer_config_from_args(preset("tiny", 64), args)
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == ("full", "uniform", 1)


def test_overlap_param_gather_reaches_the_ddp_and_optimizer_configs():
    from megatron_lst.training.schedule import optimizer_config_from_args

    args = valid("--use-distributed-optimizer", "--overlap-grad-reduce",
                 "--overlap-param-gather", "--ddp-bucket-size", "1000000")
    assert (args.overlap_param_gather, args.ddp_bucket_size) == (True, 1000000)
    assert optimizer_config_from_args(args).overlap_param_gather


@pytest.mark.parametrize("extra", [
    ["--overlap-param-gather", "--overlap-grad-reduce"],
    ["--overlap-param-gather", "--use-distributed-optimizer"],
])
def test_overlap_param_gather_needs_the_distributed_optimizer_and_overlapped_reduction(extra):
    with pytest.raises(ArgumentError, match=r"--overlap-param-gather needs "
                                            r"--use-distributed-optimizer and --overlap-grad-reduce"):
        valid(*extra)


def test_ddp_bucket_size_must_be_positive():
    with pytest.raises(ArgumentError, match="--ddp-bucket-size must be at least 1"):
        valid("--ddp-bucket-size", "0")


@pytest.mark.parametrize("extra, message", [
    (["--recompute-method", "uniform"], r"--recompute-method needs --recompute-granularity full"),
    (["--recompute-granularity", "full"], r"needs --recompute-method uniform\|block and "
                                          r"--recompute-num-layers"),
    # megatron's TransformerConfig raised a ValueError traceback once the datasets were indexed.
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     r"--recompute-num-layers needs --recompute-granularity full"),
    # Ignored without recomputation.
    (["--recompute-num-layers", "2"], r"--recompute-num-layers needs --recompute-granularity full"),
])
def test_incomplete_recomputation_flags_are_refused(extra, message):
    with pytest.raises(ArgumentError, match=message):
        valid(*extra)


def test_a_path_with_spaces_is_still_one_data_path(tmp_path):
    args = parse_args(["--config", write_yaml(tmp_path, "data-path: 'my data/corpus'\n")])
    assert args.data_path == ["my data/corpus"]


def test_wide_global_heads_outside_the_range_attention_are_not_refused_on_cuda(monkeypatch):
    """The LST global model runs range attention only with its attention reset at documents:
    with --no-reset-global-attention-mask, or RoPE positions reset without the attention
    (--reset-position-ids --no-reset-attention-mask), it runs megatron's SDPA, which takes heads
    of any size. Both were refused as if the Triton kernel were to get them."""
    pytest.importorskip("triton")
    monkeypatch.delenv("LST_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    wide_global = ["--distributed-backend", "gloo", *LST_FLAGS, "--kv-channels", "320"]
    with pytest.raises(ArgumentError, match=r"global attention heads have 320"):
        valid(*wide_global)
    valid(*wide_global, "--no-reset-global-attention-mask")
    valid(*wide_global, "--no-reset-attention-mask", "--reset-position-ids")


def test_argparse_names_the_command_line_and_a_rank_that_is_no_rank(monkeypatch, capsys):
    """A flag error under RANK=one was a LaunchEnvironmentError traceback (lst-eval and
    lst-generate, whose parsers are FlagParsers too, check RANK nowhere before)."""
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(SystemExit) as refused:
        parse_args(["--seq-length", "x"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lst-train ")
    assert err.endswith("lst-train: error: argument --seq-length: invalid int value: 'x'\n"
                        "lst-train: the environment variable RANK='one' is not a whole number of "
                        "at least 0; launch with torchrun (which sets it), or unset it to run one "
                        "process\n")


@pytest.mark.parametrize("rank, printed", [
    ("0", "usage: lst-train "),
    # rank 0 prints it: the other ranks wait for the launcher to end them (not here), then say it
    ("1", "[rank 1] lst-train: error: argument --seq-length: invalid int value: 'x'\n"),
])
def test_argparse_refuses_a_command_line_on_rank_0_alone(monkeypatch, capsys, rank, printed):
    """Every rank is given the same command line: each of 512 ranks printed argparse's usage."""
    from megatron_lst.training import stop_together

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(stop_together, "STOP_WAIT_SECONDS", 0.0)
    with pytest.raises(SystemExit) as refused:
        parse_args(["--seq-length", "x"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.startswith(printed)
