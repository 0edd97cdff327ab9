"""Benchmark full training steps of a `pretrain_lst.py` configuration (not a test).

    python tools/bench_step.py --steps 10 --warmup 2 --json step.json -- \
        --config examples/configs/tiny_cpu_lst.yaml
    python tools/bench_step.py --steps 10 -- --config examples/configs/paper_1b_lst.yaml \
        --seq-length 4096 --max-tokens 16384 --micro-batch-size 4 --global-batch-size 4

Everything after `--` is `lst-train` flags. Without `--data-path` the steps read a synthetic
corpus written to a temporary directory: random speech-text documents (words of 1-3 text pieces
and 4-16 units at 25 Hz, 20% silences of 2-10 units) and random text documents, blended 67/33
(text/speech; `--speech-share` changes it) and patched by the real data pipeline, so patch and
token counts are those of the configured patching mode.

The first `--warmup` steps are timed apart: the first one holds Triton's compilation and
autotuning and the allocator's growth (reported as `first_step_seconds`), and so does the set-up
(model, optimizer, row index: `setup_seconds`).

Each measured step is the training loop's own `train_step` (forward-backward schedule, gradient
reduction, optimizer). Reported, as JSON and a table: step time (median, min), tokens/s (real
tokens), global positions/s, peak memory (CUDA: max allocated; CPU: peak resident set of the
process), model TFLOP/s per device and MFU on GPUs whose peak is known, and the split of the step
between

    local encoder       (LST: token encoder + patch encoder + projection; baseline: embedding)
    global transformer  (the baseline's final norm belongs to megatron's block, so to it)
    local decoder       (LST only)
    head                the output layer
    loss                the vocab-parallel cross entropy and the start of backward
    gradient reduction  finalize_model_grads (data-parallel reduction, encoder replica, scaling)
    optimizer           optimizer.step (clipping, update)

each part's forward plus backward. The split comes from marks set by module hooks (forward pre/post
hooks, and gradient hooks on each part's output: backward reaches the head, the decoder, the global
transformer, then the encoder), timed with CUDA events on GPU and wall-clock on CPU, where PyTorch runs synchronously.
Time between marks not owned by a part (the schedule's own work) is reported as "other". The
split needs one pipeline stage (--pipeline-model-parallel-size 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

PARTS = ("local encoder", "global transformer", "local decoder", "head", "loss",
         "gradient reduction", "optimizer", "other")


# --- synthetic corpus --------------------------------------------------------------------

def write_synthetic_corpus(directory: Path, text_size: int, num_units: int,
                           speech_share: float = 0.33, seed: int = 0,
                           num_documents: int = 400) -> list[str]:
    """A speech and a text store under `directory`; returns the `--data-path` that blends them
    with weight `speech_share` on speech (only the stores with a positive weight)."""
    if not 0.0 <= speech_share <= 1.0:
        raise ValueError(f"speech_share={speech_share} must be in [0, 1]")
    from megatron_lst.data.documents import AlignedDocument
    from megatron_lst.data.indexed import DocumentWriter
    from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
    from megatron_lst.tokenizer.vocab import JointVocab

    vocab = JointVocab(text_size, num_units)
    rng = np.random.default_rng(seed)
    tokenizer = TokenizerInfo(path="synthetic", sha256="0" * 64, vocab_size=text_size)
    speech = DocumentWriter(directory / "speech", "aligned")
    speech_counts = Counts()
    for _ in range(num_documents):
        segments = int(rng.integers(40, 400))
        silence = rng.random(segments) < 0.2
        text_len = np.where(silence, 0, rng.integers(1, 4, segments)).astype(np.int32)
        unit_len = np.where(silence, rng.integers(2, 11, segments),
                            rng.integers(4, 17, segments)).astype(np.int32)
        doc = AlignedDocument(
            rng.integers(3, text_size, int(text_len.sum())).astype(np.int32),
            rng.integers(0, num_units, int(unit_len.sum())).astype(np.int32), text_len, unit_len)
        speech.add_aligned(doc)
        speech_counts.add(Counts(documents=1, segments=segments, text_pieces=len(doc.text_ids),
                                 units=len(doc.unit_ids)))
    speech.finalize(Manifest("aligned", vocab.to_dict(), tokenizer, num_units, 25.0,
                             speech_counts, ["synthetic"]))
    text = DocumentWriter(directory / "text", "text")
    text_counts = Counts()
    for _ in range(num_documents):
        ids = rng.integers(3, text_size, int(rng.integers(200, 2000))).astype(np.int32)
        text.add_text(ids)
        text_counts.add(Counts(documents=1, text_pieces=len(ids)))
    text.finalize(Manifest("text", vocab.to_dict(), tokenizer, num_units, None, text_counts,
                           ["synthetic"]))
    blend = [(1.0 - speech_share, directory / "text"), (speech_share, directory / "speech")]
    return [item for weight, store in blend if weight > 0 for item in (f"{weight:g}", str(store))]


# --- marks --------------------------------------------------------------------------------

class StepMarks:
    """Timestamps of named points of a step, in order (CUDA events on GPU, wall-clock on CPU)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.marks: list[tuple[str, object]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """Seconds from each mark to the next, summed by the part the mark opens."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for (label, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            seconds = (start.elapsed_time(end) / 1e3 if self.cuda else end - start)
            totals[label] += seconds
        self.marks.clear()
        return dict(totals)


def _model_parts(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(part, first module in forward order, last module in forward order) of one stage."""
    from megatron_lst.models import LSTModel

    if isinstance(module, LSTModel):
        encoder_end = module.global_input_projection or module.patch_encoder
        return [("local encoder", module.token_encoder, encoder_end),
                ("global transformer", module.global_transformer, module.global_transformer),
                ("local decoder", module.local_decoder, module.local_decoder),
                ("head", module.output_layer, module.output_layer)]
    return [("local encoder", module.embedding, module.embedding),  # the baseline (GPTModel)
            ("global transformer", module.decoder, module.decoder),
            ("head", module.output_layer, module.output_layer)]


def _mark_forward_end(marks: StepMarks, name: str, module, inputs, output) -> None:
    """Forward hook: the part's forward ends; its backward begins when the gradient of this
    output arrives (a tensor hook: module backward hooks clash with the in-place cross entropy)."""
    del module, inputs
    marks.mark("loss" if name == "head" else "other")
    tensor = output[0] if isinstance(output, tuple) else output
    if torch.is_grad_enabled() and tensor.requires_grad:
        tensor.register_hook(lambda grad: marks.mark(name))


def install_marks(module: torch.nn.Module, config, marks: StepMarks) -> None:
    """Hooks that mark where each part's forward and backward begin (see the module docstring).

    After a part's forward ends, "other" runs until the next part begins; after the head's
    forward, "loss" runs until backward reaches the head. Backward reaches the parts in
    reverse order; the encoder's backward runs until the next micro-batch's forward or until
    `finalize_model_grads`, which opens "gradient reduction".
    """
    for name, first, last in _model_parts(module):
        first.register_forward_pre_hook(lambda *_, name=name: marks.mark(name))
        last.register_forward_hook(partial(_mark_forward_end, marks, name))
    finalize = config.finalize_model_grads_func

    def marked_finalize(*args, **kwargs):
        marks.mark("gradient reduction")
        result = finalize(*args, **kwargs)
        marks.mark("optimizer")  # train_step calls optimizer.step() next
        return result

    config.finalize_model_grads_func = marked_finalize


# --- the benchmark -----------------------------------------------------------------------

@dataclass
class StepBenchmark:
    device: str
    steps: int
    setup_seconds: float
    """Model, optimizer, data and row index set-up, before the first step."""
    first_step_seconds: float
    """The first warm-up step: Triton compilation and autotuning, allocator growth."""
    median_step_seconds: float
    min_step_seconds: float
    tokens_per_step: float
    """Mean real (loss-counted) tokens per step."""
    global_positions_per_step: int
    tokens_per_second: float
    global_positions_per_second: float
    flops_per_step: float
    """Mean model training FLOPs per step (`training.flops`, attention included), all devices."""
    peak_memory_gib: float
    """CUDA: max allocated over the measured steps; CPU: peak resident set of the process."""
    tflops_per_device: float
    peak_tflops: float | None
    """The device's dense peak in the run's precision used for the MFU
    (`training.device_peak.device_peak_flops`: bf16/fp16, TF32 or FP32)."""
    mfu: float | None
    split_seconds: dict[str, float]
    """Median seconds per step of each part."""
    flags: list[str]
    versions: dict[str, str]


def run_benchmark(flags: Sequence[str], steps: int, warmup: int,
                  speech_share: float = 0.33) -> StepBenchmark:
    from megatron.core.utils import get_model_config, unwrap_model

    from megatron_lst.launch_environment import launch_world_size
    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.data_provider import build_loader
    from megatron_lst.training.device_peak import device_peak_flops, matmul_precision
    from megatron_lst.training.loop import setup, train_step

    if steps < 1 or warmup < 1:
        raise SystemExit("bench_step: --steps and --warmup must be >= 1 (the first step compiles)")
    with tempfile.TemporaryDirectory(prefix="bench_step_") as scratch:
        setup_start = time.perf_counter()
        args = parse_args(flags)
        if args.data_path is None:
            # The synthetic corpus has its own 32k-piece vocabulary and no tokenizer file.
            args.data_path = write_synthetic_corpus(Path(scratch), 32000, args.num_units,
                                                    speech_share)
            args.tokenizer_model = None
        args.train_iters = warmup + steps
        args.lr_decay_iters = None
        args.lr_warmup_iters = 0  # a config's warm-up can exceed the few steps timed here
        args.eval_interval = args.log_interval = 10**9
        args.save_interval = None
        args.save = args.load = None
        args = validate_args(args, launch_world_size())
        if args.pipeline_model_parallel_size != 1:
            raise SystemExit("bench_step: the per-part split needs "
                             "--pipeline-model-parallel-size 1")
        initialize_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
        try:
            state, datasets = setup(args, index_cache_dir=Path(scratch) / "rows")
            marks = StepMarks()
            install_marks(unwrap_model(state.model[0]), get_model_config(state.model[0]), marks)
            batches = iter(build_loader(datasets.train, args))
            setup_seconds = time.perf_counter() - setup_start
            warmup_seconds, results, splits = [], [], []
            for index in range(warmup + steps):
                if index == warmup and torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                step = train_step(state, batches)
                marks.mark("end")
                split = marks.durations()
                if index < warmup:
                    warmup_seconds.append(step.seconds)
                else:
                    results.append(step)
                    splits.append(split)
        finally:
            destroy_parallel()
    peak = device_peak_flops(precision=matmul_precision(args.bf16, args.fp16))
    return _summarise(args, flags, results, splits, peak,
                      setup_seconds=setup_seconds, first_step_seconds=warmup_seconds[0])


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "megatron-core"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


def _summarise(args, flags, results, splits, peak_flops, setup_seconds,
               first_step_seconds) -> StepBenchmark:
    from megatron_lst.launch_environment import launch_world_size

    seconds = [r.seconds for r in results]
    median = statistics.median(seconds)
    total_seconds = sum(seconds)
    flops_per_step = sum(r.flops.total for r in results) / len(results)
    flops_per_s = flops_per_step * len(results) / total_seconds / launch_world_size()
    positions_per_step = args.global_batch_size * args.seq_length
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        peak_memory = torch.cuda.max_memory_allocated() / 2**30
    else:
        device = "cpu"
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    split = {part: statistics.median(s.get(part, 0.0) for s in splits) for part in PARTS}
    return StepBenchmark(
        device=device, steps=len(results), setup_seconds=setup_seconds,
        first_step_seconds=first_step_seconds, median_step_seconds=median,
        min_step_seconds=min(seconds),
        tokens_per_step=sum(r.num_tokens for r in results) / len(results),
        global_positions_per_step=positions_per_step,
        tokens_per_second=sum(r.num_tokens for r in results) / total_seconds,
        global_positions_per_second=len(results) * positions_per_step / total_seconds,
        flops_per_step=flops_per_step, peak_memory_gib=peak_memory,
        tflops_per_device=flops_per_s / 1e12,
        peak_tflops=peak_flops / 1e12 if peak_flops else None,
        mfu=flops_per_s / peak_flops if peak_flops else None, split_seconds=split,
        flags=list(flags), versions=_versions())


def format_table(bench: StepBenchmark) -> str:
    mfu = (f"{100 * bench.mfu:.1f}% of {bench.peak_tflops:.0f} TFLOP/s (dense peak in the run's precision)"
           if bench.mfu is not None else "n/a (no known peak)")
    lines = [
        f"device                  {bench.device}",
        f"steps measured          {bench.steps}",
        f"set-up                  {bench.setup_seconds:.1f} s",
        f"first step              {bench.first_step_seconds:.1f} s (compilation, autotuning)",
        f"step time               {1e3 * bench.median_step_seconds:.1f} ms median, "
        f"{1e3 * bench.min_step_seconds:.1f} ms min",
        f"tokens/s                {bench.tokens_per_second:,.0f} "
        f"({bench.tokens_per_step:,.0f} per step)",
        f"global positions/s      {bench.global_positions_per_second:,.0f} "
        f"({bench.global_positions_per_step:,} per step)",
        f"peak memory             {bench.peak_memory_gib:.2f} GiB",
        f"model TFLOP/s/device    {bench.tflops_per_device:.3f}",
        f"MFU                     {mfu}",
        "split of a step (median ms, share of the median step):",
    ]
    for part, seconds in bench.split_seconds.items():
        share = seconds / bench.median_step_seconds if bench.median_step_seconds else 0.0
        lines.append(f"  {part:<22}{1e3 * seconds:>10.1f} ms  {100 * share:5.1f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s [-h] [--steps STEPS] [--warmup WARMUP] [--speech-share SPEECH_SHARE] "
              "[--json JSON] -- LST-TRAIN FLAGS",
        epilog="Everything after `--` is lst-train flags, e.g. -- --config "
               "examples/configs/tiny_cpu_lst.yaml; without --data-path the steps read a "
               "synthetic corpus.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--speech-share", type=float, default=0.33,
                        help="weight of speech in the synthetic corpus's blend (without "
                             "--data-path); 1 gives speech-only rows")
    parser.add_argument("--json", type=Path, help="write the result here")
    options = parser.parse_args(own)
    if not flags:
        parser.error("give lst-train flags after `--`, e.g. -- --config "
                     "examples/configs/tiny_cpu_lst.yaml")
    bench = run_benchmark(flags, options.steps, options.warmup, options.speech_share)
    print(format_table(bench))
    if options.json is not None:
        report = {"command": " ".join(["python", "tools/bench_step.py", *argv]),
                  **asdict(bench)}
        from megatron_lst.checkpoint.durable_files import replace_file_durably

        replace_file_durably(options.json, json.dumps(report, indent=1) + "\n")
    return 0


# The guard matters: megatron's checkpoint writer and data loader workers re-import this file.
if __name__ == "__main__":
    sys.exit(main())
