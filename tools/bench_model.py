"""Training-step benchmark of LST against the token baseline at equal global positions per step.

For each model preset and token count N it times full training steps (forward, backward, Adam) of
- LST on speech-heavy rows with static p=4 patching (about N/3.1 patches per row, as in the
  reference's timing setup: text runs of 2..6 one-token patches between speech runs of 20..60
  units cut into patches of 4), and
- the token baseline with the same global transformer over P tokens per row, P = LST's patch
  count (compute-controlled comparison: equal steps, equal global positions),
and reports step time (wall clock, and the process's CPU time, which busy shared hosts distort
less), raw tokens per second (B*N for LST, B*P for the baseline), peak memory (CUDA: max
allocated; CPU: the process's peak resident set) and its growth over the idle model ("step
peak"), and for LST the share of the step spent in the local encoder, the global transformer and
the local decoder (+ output head and loss), measured by cutting the graph between the parts in one
extra step. Every measurement runs in a fresh process so peaks do not leak between runs. It runs
on CUDA (bf16 by default) or CPU (fp32): the whole model and the batch live on `--device`.

Each step's exact FLOPs (`megatron_lst.training.flops`, attention included) give the achieved
GFLOP/s and the FLOP ceiling of the comparison: LST's raw tokens/s over the baseline's can reach
at most (N / P) x (baseline FLOPs / LST FLOPs) per global position, the ratio both would show if
they ran at the same FLOP/s. At the tiny and medium sizes the local models are a large share of
the work, so that ceiling is low (about 0.75x and 1.4x); it passes 2x only when the global model
dominates (about 2.1x for paper-1b and 2.8x for the 7b preset at N = 4096).

    python tools/bench_model.py                          # tiny and medium, N = 1024 and 4096
    python tools/bench_model.py --presets medium --tokens 1024 2048 4096 --json bench.json
    python tools/bench_model.py --device cuda --presets paper-1b --tokens 4096 --batch-size 4

Every comparison printed is between measurements of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass

VOCAB_SIZE = 1020
DTYPES = {"float32", "bfloat16"}


@dataclass
class Result:
    model: str  # "lst" or "baseline"
    preset: str
    tokens_per_row: int  # N for LST; P for the baseline
    patches_per_row: int
    batch: int
    step_seconds: float  # wall clock
    cpu_step_seconds: float  # process CPU time (all threads): steadier than wall time on busy hosts
    raw_tokens_per_second: float
    peak_memory_mb: float  # CUDA: max allocated; CPU: peak resident set of the process
    step_peak_mb: float  # peak memory minus that of the built, idle model
    step_flops: float  # forward + backward FLOPs of one step (training.flops, exact)
    shares: dict[str, float] | None = None  # LST: encoder / global / decoder fractions


def speech_heavy_batch(batch: int, num_tokens: int, patch_size: int, seed: int):
    """Rows of N tokens with the batch contract (sum of patch lengths N+1, first patch 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = [1]
        while sum(lengths) < num_tokens + 1:
            text = int(torch.randint(2, 7, (1,), generator=generator))
            speech = int(torch.randint(20, 61, (1,), generator=generator))
            lengths += [1] * text + [patch_size] * (speech // patch_size)
            if speech % patch_size:
                lengths.append(speech % patch_size)
        total = 0
        for i, length in enumerate(lengths):  # cut the last patch so the row sums to N + 1
            if total + length >= num_tokens + 1:
                lengths = lengths[:i] + [num_tokens + 1 - total]
                break
            total += length
        rows.append(lengths)
    num_patches = max(len(r) for r in rows)
    patch_lengths = torch.zeros(batch, num_patches, dtype=torch.int32)
    for b, row in enumerate(rows):
        patch_lengths[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    tokens = torch.randint(0, VOCAB_SIZE, (batch, num_tokens + 1), generator=generator)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(batch, num_tokens),
        "patch_lengths": patch_lengths,
    }


def _memory_mb(device: str) -> float:
    """Memory in use now: CUDA allocated, or the process's resident set on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _part_shares(model, batch, device: str) -> dict[str, float]:
    """One step with the graph cut between the parts; each part's forward + backward time."""
    import torch

    from megatron_lst.models.loss import masked_token_mean

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    t0 = clock()
    token_states, global_input = model.encode(batch["tokens"], batch["patch_lengths"])
    t1 = clock()
    global_in = global_input.detach().requires_grad_()
    global_out = model.global_transformer(global_in)
    t2 = clock()
    states_in = token_states.detach().requires_grad_()
    global_cut = global_out.detach().requires_grad_()
    loss = masked_token_mean(
        model.decode(states_in, global_cut, batch["patch_lengths"], batch["labels"]),
        batch["loss_mask"],
    )
    t3 = clock()
    loss.backward()
    t4 = clock()
    global_out.backward(global_cut.grad)
    t5 = clock()
    torch.autograd.backward([token_states, global_input], [states_in.grad, global_in.grad])
    t6 = clock()
    parts = {"encoder": (t1 - t0) + (t6 - t5), "global": (t2 - t1) + (t5 - t4),
             "decoder+head": (t3 - t2) + (t4 - t3)}
    total = sum(parts.values())
    model.zero_grad(set_to_none=True)
    return {name: seconds / total for name, seconds in parts.items()}


def measure(kind: str, preset_name: str, num_tokens: int, args) -> Result:
    """One configuration, in a fresh process (see `run_isolated`)."""
    import torch

    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from megatron_lst.models import LSTModel, TokenBaselineModel, preset
    from megatron_lst.models.loss import masked_token_mean
    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.training.flops import ModelShape, flops_per_batch

    initialize_parallel(seed=0)
    config = preset(preset_name, VOCAB_SIZE)
    device, dtype = args.device, getattr(torch, args.dtype)
    lst_batch = speech_heavy_batch(args.batch_size, num_tokens, args.patch_size, seed=0)
    num_patches = int((lst_batch["patch_lengths"] > 0).sum(1).max())
    shape = ModelShape.from_model_config(config)
    if kind == "lst":
        model = LSTModel(config, config.transformer_config(), transformer_impl="local")
        batch = lst_batch
        step_flops = flops_per_batch(shape, lst_batch["patch_lengths"], num_tokens).total
    else:
        step_flops = flops_per_batch(
            shape.baseline_of(), torch.ones(args.batch_size, num_patches, dtype=torch.int32),
            num_patches,
        ).total
        model = TokenBaselineModel(config, config.transformer_config(), transformer_impl="local")
        tokens = torch.randint(0, VOCAB_SIZE, (args.batch_size, num_patches + 1))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": torch.ones(args.batch_size, num_patches), "patch_lengths": None}
    # megatron builds the global transformer on the current CUDA device; the rest is built on CPU
    model = model.to(device=device, dtype=dtype)
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        optimizer.zero_grad(set_to_none=True)
        per_token = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
        masked_token_mean(per_token, batch["loss_mask"]).backward()
        optimizer.step()

    synchronize()
    idle = _memory_mb(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    shares = _part_shares(model, batch, device) if kind == "lst" else None
    peak = _peak_memory_mb(device)
    destroy_parallel()
    tokens_per_row = batch["tokens"].shape[1]
    return Result(
        model=kind, preset=preset_name, tokens_per_row=tokens_per_row, patches_per_row=num_patches,
        batch=args.batch_size, step_seconds=seconds, cpu_step_seconds=cpu_seconds,
        raw_tokens_per_second=args.batch_size * tokens_per_row / seconds,
        peak_memory_mb=peak, step_peak_mb=peak - idle, step_flops=step_flops, shares=shares,
    )


def _child(queue, kind, preset_name, num_tokens, args):
    queue.put(measure(kind, preset_name, num_tokens, args))


def run_isolated(kind: str, preset_name: str, num_tokens: int, args) -> Result:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, kind, preset_name, num_tokens, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def report(results: list[Result]) -> None:
    print(f"{'model':9}{'preset':9}{'N/row':>7}{'P/row':>7}{'step s':>9}{'cpu s':>8}{'raw tok/s':>11}"
          f"{'GFLOP/s':>9}{'peak MB':>9}{'step MB':>9}  shares (encoder / global / decoder+head)")
    for r in results:
        shares = " / ".join(f"{v:.0%}" for v in r.shares.values()) if r.shares else ""
        print(f"{r.model:9}{r.preset:9}{r.tokens_per_row:>7}{r.patches_per_row:>7}"
              f"{r.step_seconds:>9.3f}{r.cpu_step_seconds:>8.3f}{r.raw_tokens_per_second:>11.0f}"
              f"{r.step_flops / r.step_seconds / 1e9:>9.1f}{r.peak_memory_mb:>9.0f}"
              f"{r.step_peak_mb:>9.0f}  {shares}")
    by_key = {(r.model, r.preset, r.patches_per_row): r for r in results}
    for r in results:
        if r.model != "lst":
            continue
        base = by_key.get(("baseline", r.preset, r.patches_per_row))
        if base:
            cpu_ratio = (r.tokens_per_row / r.cpu_step_seconds) / (
                base.tokens_per_row / base.cpu_step_seconds)
            ceiling = (r.tokens_per_row / base.tokens_per_row) * (base.step_flops / r.step_flops)
            print(f"{r.preset} N={r.tokens_per_row}: LST raw tokens/s = "
                  f"{r.raw_tokens_per_second / base.raw_tokens_per_second:.2f}x the baseline's "
                  f"(per CPU second: {cpu_ratio:.2f}x; FLOP ceiling at equal FLOP/s: "
                  f"{ceiling:.2f}x)")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096], help="N per row")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype; default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"

    results = []
    for preset_name in args.presets:
        for num_tokens in args.tokens:
            for kind in ("lst", "baseline"):
                results.append(run_isolated(kind, preset_name, num_tokens, args))
                print(f"done: {kind} {preset_name} N={num_tokens}", flush=True)
    report(results)
    if args.json:
        machine = {
            "processor": _cpu_model(), "logical_cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__,
        }
        summary = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]), "machine": machine, "args": vars(args),
            "results": [asdict(r) for r in results],
        }
        from megatron_lst.checkpoint.durable_files import replace_file_durably

        replace_file_durably(args.json, json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
