"""Turn a training budget into steps for LST and its token baseline under each control mode.

    python tools/plan_compute.py --budget-flops 1e21 --preset paper-1b \
        --seq-length 2048 --global-batch-size 256 --tokens-per-patch 3.1 --max-tokens 8192 \
        --out plan.json

prints, for each control mode (compute: equal steps of equal global positions, as in the paper;
flops: equal total FLOPs, local modules included; data: equal raw tokens), the steps, tokens,
global positions and FLOPs split per model part of LST and of the baseline (the global
transformer run over tokens, with the same width, depth and vocabulary). `--budget-steps N`
fixes the steps of the `--reference` model instead of a FLOP total. The model is a preset of
megatron_lst.models.config or given by its dimensions (--global-dim ... without --preset).
The plan is megatron_lst.training.compute_plan's. FLOPs are the closed-form estimate of
megatron_lst.training.flops (training = 3x forward); an LST row counts its --max-tokens positions
(padding included, as training computes and logs them), its tokens the real --tokens-per-patch.
With --pipeline-model-parallel-size it also suggests a pipeline split and, given
--micro-batch-size, prints its bubble from megatron's schedule simulated over the stages' unequal
FLOPs (megatron_lst.training.pipeline_schedule_model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.models.config import (
    PRESETS,
    CrossAttentionConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    ModelConfigError,
    preset,
    swiglu_ffn_size,
)
from megatron_lst.parallel import ParallelLayoutError, pipeline_stage_layers, virtual_pipeline_size
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.compute_plan import (
    Budget,
    ComputePlan,
    ControlMode,
    ModelPlan,
    StepShape,
    plan,
)
from megatron_lst.training.flops import FlopBreakdown, ModelShape
from megatron_lst.training.pipeline_schedule_model import ScheduleTiming, simulate

_DIMENSIONS = ("global_dim", "global_layers", "global_heads", "local_dim", "encoder_layers",
               "decoder_layers", "local_heads")
# Dimension flags with a default; like the ones above, they describe a model without a preset.
_DEFAULTS = {"global_kv_heads": None, "global_kv_channels": None, "global_ffn_hidden": None,
             "local_kv_heads": None, "local_kv_channels": None, "local_ffn_hidden": None,
             "local_window": 512, "cross_attn_k": 2, "cross_attn_heads": None,
             "cross_attn_window": 512, "cross_attn_all_layers": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("budget")
    amount = group.add_mutually_exclusive_group(required=True)
    amount.add_argument("--budget-flops", type=float, help="total training FLOPs, e.g. 1e21")
    amount.add_argument("--budget-steps", type=int, help="training steps of the --reference model")
    group.add_argument("--reference", choices=("lst", "baseline"), default="baseline",
                       help="the model whose steps the budget sets under compute and data control")
    group.add_argument("--control", nargs="+", choices=[m.value for m in ControlMode],
                       default=[m.value for m in ControlMode], help="control modes to plan")

    group = parser.add_argument_group("step")
    group.add_argument("--seq-length", type=int, required=True,
                       help="global positions per row (patches for LST, tokens for the baseline)")
    group.add_argument("--global-batch-size", type=int, required=True, help="rows per step")
    group.add_argument("--tokens-per-patch", type=float, required=True,
                       help="mean input tokens per LST patch, e.g. 3.1 for static p=4 on "
                            "speech-heavy data (1.0 = every token its own patch)")
    group.add_argument("--max-tokens", type=int,
                       help="token positions of an LST row, as lst-train --max-tokens: rows are "
                            "padded to it and LST FLOPs count all of them, as the training log "
                            "does (default: seq-length x tokens-per-patch, no padding)")

    group = parser.add_argument_group("vocabulary")
    group.add_argument("--text-vocab-size", type=int, default=32000,
                       help="text tokenizer size (Llama-2: 32000)")
    group.add_argument("--num-units", type=int, default=502, help="speech unit codebook size")

    group = parser.add_argument_group("model: a preset, or the dimensions below")
    group.add_argument("--preset", choices=PRESETS)
    group.add_argument("--global-dim", type=int)
    group.add_argument("--global-layers", type=int)
    group.add_argument("--global-heads", type=int)
    group.add_argument("--global-kv-heads", type=int, help="default: --global-heads (no GQA)")
    group.add_argument("--global-kv-channels", type=int,
                       help="size of one global attention head (lst-train --kv-channels); "
                            "default: --global-dim / --global-heads")
    group.add_argument("--global-ffn-hidden", type=int, help="default: the reference SwiGLU rule")
    group.add_argument("--local-dim", type=int, help="encoder and decoder width")
    group.add_argument("--encoder-layers", type=int)
    group.add_argument("--decoder-layers", type=int)
    group.add_argument("--local-heads", type=int)
    group.add_argument("--local-kv-heads", type=int,
                       help="key/value heads of the encoder and decoder (lst-train "
                            "--local-*-query-groups); default: --local-heads (no GQA)")
    group.add_argument("--local-kv-channels", type=int,
                       help="size of one encoder and decoder attention head (lst-train "
                            "--local-*-kv-channels); default: --local-dim / --local-heads")
    group.add_argument("--local-ffn-hidden", type=int, help="default: the reference SwiGLU rule")
    group.add_argument("--local-window", type=int, help="in tokens (default: 512)")
    group.add_argument("--cross-attn-k", type=int, help="slots per patch (default: 2)")
    group.add_argument("--cross-attn-heads", type=int, help="default: --local-heads")
    group.add_argument("--cross-attn-window", type=int, help="in patches (default: 512)")
    group.add_argument("--cross-attn-all-layers", action=argparse.BooleanOptionalAction,
                       help="cross-attention in every local layer, else in one (default: every)")

    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="with > 1, also suggest --decoder-first/last-pipeline-num-layers "
                             "that balance the stages' training FLOPs (with --micro-batch-size: "
                             "that give the shortest step of megatron's 1F1B schedule "
                             "simulated over the stages) and print the pipeline bubble")
    parser.add_argument("--num-virtual-stages-per-pipeline-rank", type=int,
                        help="model chunks per pipeline rank (lst-train's flag of that name): "
                             "the split keeps every stage's layers divisible by it, and the "
                             "interleaved schedule is simulated; needs --micro-batch-size")
    parser.add_argument("--micro-batch-size", type=int,
                        help="rows per micro-batch; with --data-parallel-size it gives the "
                             "micro-batches per step the pipeline bubble depends on")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="data-parallel replicas (default 1)")
    parser.add_argument("--out", type=Path, help="write the plans as JSON here")
    return parser


def model_config(args: argparse.Namespace) -> LSTConfig:
    """The LST config named by --preset or spelled out by the dimension flags."""
    vocab_size = JointVocab(args.text_vocab_size, args.num_units).size
    given = [name for name in (*_DIMENSIONS, *_DEFAULTS) if getattr(args, name) is not None]
    if args.preset is not None:
        if given:
            raise ModelConfigError(
                f"--preset {args.preset} and --{given[0].replace('_', '-')} both given; "
                "use a preset or the dimension flags, not both"
            )
        return preset(args.preset, vocab_size)
    missing = [name for name in _DIMENSIONS if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ModelConfigError(f"no --preset: give the model dimensions {flags}")
    args = argparse.Namespace(**{
        **vars(args),
        **{name: default for name, default in _DEFAULTS.items() if getattr(args, name) is None},
    })

    def local(layers: int) -> LocalModelConfig:
        ffn = args.local_ffn_hidden or swiglu_ffn_size(args.local_dim)
        return LocalModelConfig(args.local_dim, layers, args.local_heads, ffn, args.local_window,
                                num_query_groups=args.local_kv_heads,
                                kv_channels=args.local_kv_channels)

    return LSTConfig(
        vocab_size=vocab_size,
        global_model=GlobalModelConfig(
            args.global_dim, args.global_layers, args.global_heads,
            args.global_ffn_hidden or swiglu_ffn_size(args.global_dim), args.global_kv_heads,
            kv_channels=args.global_kv_channels,
        ),
        encoder=local(args.encoder_layers),
        decoder=local(args.decoder_layers),
        cross_attention=CrossAttentionConfig(
            slots_per_patch=args.cross_attn_k,
            num_heads=args.cross_attn_heads or args.local_heads,
            encoder_window=args.cross_attn_window,
            decoder_window=args.cross_attn_window,
            all_encoder_layers=args.cross_attn_all_layers,
            all_decoder_layers=args.cross_attn_all_layers,
        ),
    )


_COLUMNS = ("model", "steps", "tokens", "positions", "FLOPs", "encoder", "global", "decoder",
            "cross-attn", "head", "FLOPs/pos")


def _row(name: str, model: ModelPlan) -> list[str]:
    flops = model.flops
    parts = (flops.total, flops.encoder, flops.global_, flops.decoder, flops.cross_attention,
             flops.head)
    per_position = model.flops_per_step.total / model.global_positions_per_step
    return [name, f"{model.steps:,}", f"{model.tokens:.3e}", f"{model.global_positions:.3e}",
            *(f"{value:.3e}" for value in parts), f"{per_position:.3e}"]


def format_plan(computed: ComputePlan) -> str:
    """A plain-text table of one plan."""
    budget = computed.budget
    amount = (f"{budget.flops:.3e} FLOPs (reference {budget.reference})" if budget.flops is not None
              else f"{budget.steps:,} steps of {budget.reference}")
    step = computed.step
    lines = [
        f"control {computed.control.value}: budget {amount}; "
        f"step = {step.global_batch_size} rows x {step.seq_length} global positions, "
        f"{step.tokens_per_patch:g} tokens per LST patch"
        + (f", LST rows padded to {step.max_tokens} tokens" if step.max_tokens is not None else ""),
    ]
    rows = [list(_COLUMNS), _row("lst", computed.lst), _row("baseline", computed.baseline)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


# The most forward and backward passes a step may have to be simulated (a few microseconds each):
# beyond it the planner balances the largest stage instead.
MAX_SIMULATED_PASSES = 250_000


def simulated_passes(pp: int, virtual_stages: int | None, num_micro_batches: int) -> int:
    """Forward and backward passes of one step over all ranks and chunks."""
    return 2 * pp * (virtual_stages or 1) * num_micro_batches


@dataclasses.dataclass(frozen=True)
class PipelineSplit:
    """A choice of `--decoder-first/last-pipeline-num-layers` (None: megatron's even share), the
    global layers and training FLOPs per step of each stage, and, with the micro-batches per step
    known, megatron's schedule simulated over those stages."""

    first: int | None
    last: int | None
    layers: list[int]
    costs: list[float]  # per pipeline stage, all its virtual stages together
    timing: ScheduleTiming | None = None


def balanced_pipeline_split(num_layers: int, pp: int, flops: FlopBreakdown,
                            virtual_stages: int | None = None,
                            num_micro_batches: int | None = None) -> PipelineSplit:
    """The split of `num_layers` global layers over `pp` stages, among those whose stages
    `virtual_stages` per rank can cut (`parallel.virtual_pipeline_size`, which also checks
    `num_micro_batches` per step, needed with `virtual_stages`, against the interleaved
    schedule), that makes one step of `flops` fastest: the one whose simulated megatron schedule
    (`pipeline_schedule_model`, times proportional to FLOPs) takes the least time with
    `num_micro_batches` known (and a step of at most MAX_SIMULATED_PASSES passes), else the one
    whose largest stage has the fewest FLOPs.

    The first stage adds the encoder and the patch cross-attention to its global layers; the last
    stage the decoder, its cross-attention, the head and the encoder replica (recomputed there).
    `cross_attention` is counted half on each side (an estimate)."""
    candidates = sorted(_pipeline_splits(num_layers, pp, flops, virtual_stages,
                                         num_micro_batches),
                        key=lambda split: max(split.costs))  # stable: the even split first
    if (num_micro_batches is None
            or simulated_passes(pp, virtual_stages, num_micro_batches) > MAX_SIMULATED_PASSES):
        return candidates[0]
    best = None
    for split in candidates:
        # No schedule is shorter than its busiest rank's work: the rest cannot beat `best`.
        if best is not None and max(split.costs) >= best.timing.step_time:
            break
        timed = dataclasses.replace(split, timing=_simulate_split(
            split, pp, flops, virtual_stages or 1, num_micro_batches))
        if best is None or timed.timing.step_time < best.timing.step_time:
            best = timed
    return best


def _pipeline_splits(num_layers: int, pp: int, flops: FlopBreakdown, virtual_stages: int | None,
                     num_micro_batches: int | None) -> list[PipelineSplit]:
    """Every split megatron and `virtual_stages` accept, with its FLOPs per stage; raises the
    layout error when there is none."""
    splits, virtual_error = [], None
    for first in [None, *range(1, num_layers)]:
        for last in [None, *range(1, num_layers)]:
            try:
                layers = pipeline_stage_layers(num_layers, pp, first, last)
            except ParallelLayoutError:
                continue
            try:
                virtual_pipeline_size(layers, num_micro_batches, None, virtual_stages)
            except ParallelLayoutError as error:
                virtual_error = virtual_error or error
                continue
            costs = [sum(chunks) for chunks in _chunk_costs(layers, flops, virtual_stages or 1)]
            splits.append(PipelineSplit(first, last, layers, costs))
    if not splits and virtual_error is not None:
        raise virtual_error
    if not splits:
        raise ValueError(f"{num_layers} global layers cannot be split over {pp} pipeline stages "
                         f"(each needs at least 1): use --pipeline-model-parallel-size "
                         f"{num_layers} or less")
    return splits


def _chunk_costs(layers: list[int], flops: FlopBreakdown,
                 virtual_stages: int) -> list[list[float]]:
    """Training FLOPs per step of each model chunk of each pipeline stage ([stage][chunk]): the
    stage's layers cut evenly into `virtual_stages` chunks, the local encoder on the first chunk
    of the first stage, the decoder, head and encoder replica on the last chunk of the last."""
    per_layer = flops.global_ / sum(layers)
    costs = [[n / virtual_stages * per_layer] * virtual_stages for n in layers]
    costs[0][0] += flops.encoder + flops.cross_attention / 2
    costs[-1][-1] += flops.decoder + flops.cross_attention / 2 + flops.head + flops.encoder
    return costs


def _simulate_split(split: PipelineSplit, pp: int, flops: FlopBreakdown, virtual_stages: int,
                    num_micro_batches: int) -> ScheduleTiming:
    """Megatron's schedule over the split's virtual stages, in units of FLOPs: one micro-batch's
    forward on a chunk takes a third of its training FLOPs / micro-batches, the backward twice
    that (training = 3 x forward, as `flops` counts)."""
    chunks = _chunk_costs(split.layers, flops, virtual_stages)
    per_micro_batch = [chunks[stage][chunk] / num_micro_batches
                       for chunk in range(virtual_stages) for stage in range(pp)]
    return simulate([cost / 3 for cost in per_micro_batch],
                    [cost * 2 / 3 for cost in per_micro_batch], pp, num_micro_batches)


def pipeline_bubble(pp: int, virtual_stages: int, num_micro_batches: int) -> float:
    """The (interleaved) 1F1B schedule's idle share of a training step, with stages of equal
    time: (p - 1) / (v m + p - 1). Narayanan et al. 2021 give the bubble as a fraction of the
    ideal compute time, (p - 1) / m, divided by v when interleaved; over the whole step (ideal
    time plus bubble) that is this expression."""
    return (pp - 1) / (virtual_stages * num_micro_batches + pp - 1)


def format_pipeline_split(split: PipelineSplit, virtual_stages: int | None,
                          num_micro_batches: int | None) -> str:
    """The suggested flags, the stages' shares of the FLOPs and, with the micro-batches known,
    the simulated bubble and the equal-stage formula's."""
    pp = len(split.layers)
    flags = " ".join(f"--decoder-{side}-pipeline-num-layers {n}"
                     for side, n in (("first", split.first), ("last", split.last))
                     if n is not None)
    shares = ", ".join(f"{c / sum(split.costs):.0%}" for c in split.costs)
    lines = [f"pipeline split over {pp} stages: {flags or '(even)'}; layers {split.layers}, "
             f"share of the step's FLOPs per stage {shares}"]
    if num_micro_batches is None:
        lines.append("pipeline bubble: give --micro-batch-size (and --data-parallel-size) to "
                     "estimate it")
        return "\n".join(lines)
    v = virtual_stages or 1
    if split.timing is not None:
        lines.append(
            f"pipeline bubble: {split.timing.bubble:.1%} of a step idle, megatron's "
            f"{'interleaved ' if v > 1 else ''}1F1B schedule simulated over these stages (time "
            f"proportional to FLOPs, backward = 2 x forward, p2p not counted); the split is the "
            f"one with the shortest simulated step")
    else:  # no step is shorter than its busiest stage's work
        imbalance = 1 - sum(split.costs) / (pp * max(split.costs))
        lines.append(
            f"pipeline bubble: at least {imbalance:.1%} of a step idle (the stages' imbalance); "
            f"not simulated: a step of {num_micro_batches:,} micro-batches has "
            f"{simulated_passes(pp, v, num_micro_batches):,} passes, more than the planner "
            f"simulates ({MAX_SIMULATED_PASSES:,}); check --global-batch-size is in rows")
    lines += [
        f"  equal-stage formula (p - 1) / (v m + p - 1) = ({pp} - 1) / ({v} x "
        f"{num_micro_batches} + {pp} - 1) = {pipeline_bubble(pp, v, num_micro_batches):.1%} "
        f"(p stages, v virtual stages per rank, m micro-batches per step; holds only for "
        f"stages of equal time)",
    ]
    return "\n".join(lines)


def pipeline_split_dict(split: PipelineSplit, virtual_stages: int | None,
                        num_micro_batches: int | None) -> dict:
    """The split and its bubbles for --out (the bubbles None without the micro-batches)."""
    pp, v = len(split.layers), virtual_stages or 1
    return {
        "pipeline_model_parallel_size": pp,
        "num_virtual_stages_per_pipeline_rank": v,
        "micro_batches_per_step": num_micro_batches,
        "decoder_first_pipeline_num_layers": split.first,
        "decoder_last_pipeline_num_layers": split.last,
        "layers_per_stage": split.layers,
        "flops_per_stage": split.costs,
        "bubble_simulated": split.timing.bubble if split.timing is not None else None,
        "bubble_equal_stages": (pipeline_bubble(pp, v, num_micro_batches)
                                if num_micro_batches is not None else None),
    }


def micro_batches_per_step(args: argparse.Namespace) -> int | None:
    """--global-batch-size / (--micro-batch-size x --data-parallel-size); None without
    --micro-batch-size."""
    if args.micro_batch_size is None:
        return None
    for flag in ("micro_batch_size", "data_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, flag)}")
    rows = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % rows:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size x --data-parallel-size = {rows}; change one of them")
    return args.global_batch_size // rows


def _check_tool_flags(args: argparse.Namespace) -> None:
    """The flags checked before any planning: a bad --out would fail only after the tables."""
    if args.pipeline_model_parallel_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be at least 1, got "
                         f"{args.pipeline_model_parallel_size}")
    if args.num_virtual_stages_per_pipeline_rank is not None and args.micro_batch_size is None:
        raise ValueError("--num-virtual-stages-per-pipeline-rank needs --micro-batch-size: the "
                         "interleaved schedule takes the micro-batches per step in groups of "
                         "--pipeline-model-parallel-size")
    if args.out is not None and not args.out.parent.is_dir():
        raise ValueError(f"--out {args.out}: directory {args.out.parent} does not exist; create "
                         "it or write elsewhere")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_tool_flags(args)
        config = model_config(args)
        lst = ModelShape.from_model_config(config)
        budget = Budget(flops=args.budget_flops, steps=args.budget_steps, reference=args.reference)
        step = StepShape(args.seq_length, args.global_batch_size, args.tokens_per_patch,
                         args.max_tokens)
        plans = [plan(budget, lst, lst.baseline_of(), mode, step)
                 for mode in dict.fromkeys(args.control)]  # a mode named twice: one table
        num_micro_batches = micro_batches_per_step(args)
        pipelined = (args.pipeline_model_parallel_size > 1
                     or args.num_virtual_stages_per_pipeline_rank is not None)
        split = (balanced_pipeline_split(config.global_model.num_layers,
                                         args.pipeline_model_parallel_size,
                                         plans[0].lst.flops_per_step,
                                         args.num_virtual_stages_per_pipeline_rank,
                                         num_micro_batches)
                 if pipelined else None)
    except ValueError as error:  # ModelConfigError and ParallelLayoutError are ValueErrors too
        print(f"plan_compute: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(format_plan(p) for p in plans))
    virtual_stages = args.num_virtual_stages_per_pipeline_rank
    if split is not None:
        print("\n" + format_pipeline_split(split, virtual_stages, num_micro_batches))
    if args.out is not None:
        pipeline = ({"pipeline": pipeline_split_dict(split, virtual_stages, num_micro_batches)}
                    if split is not None else {})
        try:  # atomically: a write that fails leaves the file as it was, not half a JSON
            replace_file_durably(args.out, json.dumps({
                "model": {"preset": args.preset, "shape": dataclasses.asdict(lst)},
                "plans": [p.as_dict() for p in plans],
                **pipeline,
            }, indent=2) + "\n")
        except OSError as error:
            print(f"plan_compute: cannot write --out {args.out} ({error.strerror or error}); "
                  f"the plans are printed above", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
