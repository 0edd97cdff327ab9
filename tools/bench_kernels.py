"""Microbenchmarks for the LST kernels: segment pooling and patch cross-attention, fwd+bwd.

Compares our kernels with what the LST reference does (`scatter_reduce` pooling, dense-mask SDPA
and flex_attention with a block mask) and with `index_reduce`. Reports time, achieved GB/s (pool,
over the minimal traffic: read tokens + write patches forward, read patch grads + write token grads
backward) or TFLOP/s (attention, over the useful unmasked work: 4*d*H per visible (query, key)
pair forward, 3.5x that for fwd+bwd with the backward's recomputation, FlashAttention's
convention), peak memory, and the ratio of each alternative to ours. Prints a table, writes JSON.

    python tools/bench_kernels.py --device cuda --out benchmarks/results/h200.json
    python tools/bench_kernels.py --device cpu --quick    # PyTorch paths only, reduced shapes

CUDA shapes are the paper's: N = 8192 and 32768 tokens per row (pooling: 2^20 tokens per call,
width 1024; attention: one row, P = N/4 patches, W = 512 patches, k = 2, 1024 wide as 16 heads of
64 or 8 of 128), bf16. `flex_attention` is compiled once, at one shape (the decoder direction at
the largest N, head dim 64): every new shape would cost another compilation.

On CPU only PyTorch code runs (our reference path, labelled `[torch-ref]`); the Triton kernels,
flex_attention and the card's copy/matmul rates are CUDA-only.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from lst_kernels import (
    decoder_key_ranges,
    encoder_key_ranges,
    patch_cross_attention,
    patch_ids_from_lengths,
    segment_pool,
)


@dataclass
class PoolShape:
    batch: int
    tokens: int  # N per row
    dim: int
    lengths: str  # "mean4": uniform 1..7; "aligned": half 1s (text), half uniform 1..20 (words)
    reduce: str


@dataclass
class AttentionShape:
    direction: str  # "decoder": tokens over patch slots; "encoder": slots over tokens
    batch: int
    tokens: int
    patches: int
    slots: int  # k
    window: int  # W, in patches
    heads: int
    head_dim: int


@dataclass
class Result:
    kernel: str
    shape: dict
    impl: str
    first_call_ms: float | None = None  # first forward + first fwd+bwd: compilation, autotuning
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    rate: float | None = None  # GB/s (pool) or TFLOP/s (attention), fwd+bwd
    rate_unit: str = ""
    peak_mib: float | None = None
    note: str = ""
    ratios: dict = field(default_factory=dict)  # alternative impl -> {"time": x, "memory": y}
    of_card: float | None = (
        None  # rate / card copy bandwidth (pool) or bf16 matmul rate (attention)
    )


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median wall time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated by one call of `fn` above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(forward: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    """A closure running forward and backward (gradients returned, never accumulated)."""

    def run():
        out = forward(*inputs)
        return torch.autograd.grad(out, inputs, grad)

    return run


def measure(kernel, shape, impl, forward, inputs, device, warmup, iters) -> Result:
    start = time.perf_counter()
    with torch.no_grad():
        probe = forward(*inputs)
    grad = torch.randn_like(probe)
    del probe
    step = fwd_bwd(forward, inputs, grad)
    step()
    _sync(device)
    first_call_ms = (time.perf_counter() - start) * 1e3

    def fwd_only():
        with torch.no_grad():
            return forward(*inputs)

    return Result(
        kernel=kernel,
        shape=asdict(shape),
        impl=impl,
        first_call_ms=first_call_ms,
        fwd_ms=time_ms(fwd_only, device, warmup, iters),
        fwd_bwd_ms=time_ms(step, device, warmup, iters),
        peak_mib=peak_mib(step, device),
    )


# ---------------------------------------------------------------------------------------------
# card rates


def card_rates(device: str) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and dense bf16 matmul rate (TFLOP/s)."""
    if device != "cuda":
        return {}
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, 3, 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = time_ms(lambda: a @ b, device, 3, 20)
    return {
        "copy_GBps": 2 * src.numel() / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9,
    }


# ---------------------------------------------------------------------------------------------
# segment pool


def draw_lengths(kind: str, batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """`[B, P]` lengths summing to exactly `tokens` per row (zero-padded right)."""
    # `tokens` draws of >= 1 always suffice; the patch that crosses the end is cut.
    if kind == "mean4":
        draws = torch.randint(1, 8, (batch, tokens), generator=generator)
    else:
        text = torch.rand(batch, tokens, generator=generator) < 0.5
        draws = torch.where(text, 1, torch.randint(1, 21, (batch, tokens), generator=generator))
    starts = draws.cumsum(1) - draws
    inside = starts < tokens
    lengths = torch.where(inside, torch.minimum(draws, tokens - starts), 0)
    return lengths[:, : int(inside.sum(1).max())].int()


def scatter_reduce_pool(x, patch_ids, num_patches, reduce):
    """The LST reference: scatter_reduce(include_self=False) into zeros."""
    index = patch_ids[..., None].expand(-1, -1, x.shape[-1])
    name = {"max": "amax", "mean": "mean", "sum": "sum"}[reduce]
    zeros = x.new_zeros(x.shape[0], num_patches, x.shape[-1])
    return zeros.scatter_reduce(1, index, x, name, include_self=False)


def index_reduce_pool(x, flat_ids, num_patches, reduce):
    """Pooling through `index_reduce` / `index_add` over flattened (row, patch) indices."""
    batch, tokens, dim = x.shape
    flat_x = x.reshape(batch * tokens, dim)
    zeros = x.new_zeros(batch * num_patches, dim)
    if reduce == "sum":
        out = zeros.index_add(0, flat_ids, flat_x)
    else:
        with warnings.catch_warnings():  # "index_reduce() is in beta"
            warnings.simplefilter("ignore", UserWarning)
            out = zeros.index_reduce(
                0, flat_ids, flat_x, {"max": "amax", "mean": "mean"}[reduce], include_self=False
            )
    return out.view(batch, num_patches, dim)


def bench_pool(shape: PoolShape, device: str, dtype, warmup, iters) -> list[Result]:
    generator = torch.Generator().manual_seed(0)
    lengths = draw_lengths(shape.lengths, shape.batch, shape.tokens, generator).to(device)
    num_patches = lengths.shape[1]
    x = torch.randn(
        shape.batch, shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True
    )
    patch_ids = patch_ids_from_lengths(lengths, shape.tokens)
    flat_ids = (
        patch_ids + torch.arange(shape.batch, device=device)[:, None] * num_patches
    ).flatten()
    ours = "segment_pool[triton]" if device == "cuda" else "segment_pool[torch-ref]"
    candidates = {
        ours: lambda t: segment_pool(t, lengths, shape.reduce),
        "scatter_reduce (LST ref)": lambda t: scatter_reduce_pool(
            t, patch_ids, num_patches, shape.reduce
        ),
        "index_reduce": lambda t: index_reduce_pool(t, flat_ids, num_patches, shape.reduce),
    }
    # Minimal traffic: tokens read + patches written (fwd), patch grads read + token grads written.
    elem = x.element_size()
    useful_bytes = 2 * shape.batch * (shape.tokens + num_patches) * shape.dim * elem
    results = []
    for impl, forward in candidates.items():
        try:
            result = measure("segment_pool", shape, impl, forward, [x], device, warmup, iters)
            result.rate = useful_bytes / result.fwd_bwd_ms / 1e6
            result.rate_unit = "GB/s"
        except (RuntimeError, NotImplementedError) as error:  # e.g. an op without a backward
            result = Result("segment_pool", asdict(shape), impl, note=f"failed: {error}"[:200])
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# patch cross-attention


def attention_problem(shape: AttentionShape, device: str, dtype):
    """q, k, v and the model's key ranges for one direction, on aligned-like patch lengths."""
    generator = torch.Generator().manual_seed(1)
    lengths = draw_lengths("mean4", shape.batch, shape.tokens, generator)
    lengths = lengths[:, : shape.patches]
    if lengths.shape[1] < shape.patches:
        lengths = F.pad(lengths, (0, shape.patches - lengths.shape[1]))
    lengths = lengths.to(device)
    slots = shape.patches * shape.slots
    if shape.direction == "decoder":
        ids = patch_ids_from_lengths(lengths[:, 1:], shape.tokens)
        start, end = decoder_key_ranges(ids, shape.slots, shape.window, shape.patches)
        num_queries, num_keys = shape.tokens, slots
    else:
        start, end = encoder_key_ranges(lengths, shape.slots, shape.window, shape.tokens)
        num_queries, num_keys = slots, shape.tokens

    def draw(n):
        return torch.randn(
            shape.batch,
            n,
            shape.heads,
            shape.head_dim,
            device=device,
            dtype=dtype,
            requires_grad=True,
        )

    return draw(num_queries), draw(num_keys), draw(num_keys), start, end


def dense_mask(start, end, num_keys):
    keys = torch.arange(num_keys, device=start.device)
    return (keys >= start[..., None]) & (keys < end[..., None])  # [B, Sq, Sk]


def bench_attention(shape: AttentionShape, device: str, dtype, warmup, iters,
                    with_flex: bool = False) -> list[Result]:
    q, k, v, start, end = attention_problem(shape, device, dtype)
    num_keys = k.shape[1]
    visible_pairs = int((end - start).clamp(min=0).sum())
    useful_flops = 3.5 * 4 * shape.head_dim * shape.heads * visible_pairs
    mask = dense_mask(start, end, num_keys)[:, None]  # [B, 1, Sq, Sk], built once, not timed

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)

    ours = (
        "patch_cross_attention[triton]" if device == "cuda" else "patch_cross_attention[torch-ref]"
    )
    candidates = {
        ours: lambda q, k, v: patch_cross_attention(q, k, v, start, end),
        "dense-mask SDPA": sdpa,
    }
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b, q_idx]) & (kv_idx < end[b, q_idx])

        block_mask = create_block_mask(
            visible, shape.batch, None, q.shape[1], num_keys, device=device
        )
        compiled = torch.compile(flex_attention)

        def flex(q, k, v):
            out = compiled(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask
            )
            return out.transpose(1, 2)

        candidates["flex_attention (LST ref GPU)"] = flex
    results = []
    for impl, forward in candidates.items():
        try:
            result = measure(
                "patch_cross_attention", shape, impl, forward, [q, k, v], device, warmup, iters
            )
            result.rate = useful_flops / result.fwd_bwd_ms / 1e9
            result.rate_unit = "TFLOP/s"
        except (RuntimeError, torch.OutOfMemoryError) as error:
            result = Result(
                "patch_cross_attention", asdict(shape), impl, note=f"failed: {error}"[:200]
            )
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# shapes, report


def shapes(device: str, quick: bool, tiny: bool = False):
    """(pool shapes, attention shapes, the attention shape timed against flex_attention)."""
    if tiny:  # smoke runs: every path at toy sizes
        pool = [PoolShape(2, 512, 64, "aligned", "max")]
        attn = [AttentionShape(d, batch=1, tokens=256, patches=64, slots=2, window=16, heads=2,
                               head_dim=32) for d in ("decoder", "encoder")]
        return pool, attn, attn[0] if device == "cuda" else None
    if device == "cuda" and not quick:
        pool_tokens, dims, width = [8192, 32768], [1024], 1024
        token_counts, head_dims, windows, slot_counts = [8192, 32768], [64, 128], [512], [2]
        pool_batch = {n: 2**20 // n for n in pool_tokens}  # 1M tokens, 2 GiB of bf16 per call
    else:
        pool_tokens, dims, width = [4096], [256], 256
        token_counts, head_dims, windows, slot_counts = [2048], [64], [1, 64], [1, 2]
        pool_batch = {4096: 4}
        if quick:
            windows, slot_counts = windows[-1:], slot_counts[:1]
    pool = [
        PoolShape(pool_batch[n], n, d, lengths, reduce)
        for n in pool_tokens
        for d in dims
        for lengths in ("mean4", "aligned")
        for reduce in (("max", "mean") if not quick else ("max",))
    ]
    attn = [
        AttentionShape(direction, batch=1, tokens=n, patches=n // 4, slots=k, window=w,
                       heads=width // head_dim, head_dim=head_dim)
        for n in token_counts
        for head_dim in head_dims
        for direction in ("decoder", "encoder")
        for k in slot_counts
        for w in windows
    ]
    flex_shape = next((a for a in reversed(attn) if a.direction == "decoder"
                       and a.head_dim == head_dims[0]), None) if device == "cuda" else None
    return pool, attn, flex_shape


def add_ratios(results: list[Result]) -> None:
    """For each shape, each alternative's time and memory relative to our kernel."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(json.dumps([r.kernel, r.shape], sort_keys=True), []).append(r)
    for group in groups.values():
        ours, others = group[0], group[1:]
        for other in others:
            if ours.fwd_bwd_ms and other.fwd_bwd_ms:
                ratio = {"time": other.fwd_bwd_ms / ours.fwd_bwd_ms}
                if ours.peak_mib and other.peak_mib:
                    ratio["memory"] = other.peak_mib / ours.peak_mib
                ours.ratios[other.impl] = ratio


def add_card_fractions(results: list[Result], rates: dict) -> None:
    """Each rate as a fraction of the card's: copy bandwidth for pooling, bf16 matmul for attention."""
    if not rates:
        return
    for r in results:
        if r.rate is not None:
            card = rates["copy_GBps"] if r.kernel == "segment_pool" else rates["bf16_matmul_TFLOPs"]
            r.of_card = r.rate / card


def print_table(results: list[Result], rates: dict) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    if rates:
        print(
            f"card: copy {rates['copy_GBps']:.0f} GB/s, bf16 matmul {rates['bf16_matmul_TFLOPs']:.0f} TFLOP/s"
        )
    header = f"{'kernel / shape':58} {'impl':32} {'fwd ms':>9} {'f+b ms':>9} {'rate':>14} {'peak MiB':>9}  vs ours"
    print(header)
    print("-" * len(header))
    for r in results:
        s = r.shape
        if r.kernel == "segment_pool":
            label = f"pool {s['reduce']} B{s['batch']} N{s['tokens']} D{s['dim']} {s['lengths']}"
        else:
            label = (
                f"attn {s['direction']} N{s['tokens']} P{s['patches']} k{s['slots']} "
                f"W{s['window']} H{s['heads']}x{s['head_dim']}"
            )
        rate = f"{fmt(r.rate, '.0f' if r.rate and r.rate >= 100 else '.3g')} {r.rate_unit}"
        ratios = ", ".join(
            ([f"{r.of_card:.0%} of card"] if r.of_card is not None else [])
            + [
                f"{name}: {v['time']:.1f}x time"
                + (f" {v['memory']:.1f}x mem" if "memory" in v else "")
                for name, v in r.ratios.items()
            ]
        )
        print(
            f"{label:58} {r.impl:32} {fmt(r.fwd_ms, '9.3f')} {fmt(r.fwd_bwd_ms, '9.3f')} "
            f"{rate:>14} {fmt(r.peak_mib, '9.1f')}  {ratios or r.note}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="one shape per kernel, few iterations")
    parser.add_argument("--tiny", action="store_true",
                        help="toy shapes, few iterations: a smoke run of every path")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu")

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    warmup, iters = ((1, 2) if args.tiny else (2, 5) if args.quick or args.device == "cpu"
                     else (5, 20))
    torch.manual_seed(0)
    rates = card_rates(args.device)
    pool_shapes, attention_shapes, flex_shape = shapes(args.device, args.quick, args.tiny)
    results = []
    for shape in pool_shapes:
        results += bench_pool(shape, args.device, dtype, warmup, iters)
    for shape in attention_shapes:
        results += bench_attention(shape, args.device, dtype, warmup, iters,
                                   with_flex=shape == flex_shape)
    add_ratios(results)
    add_card_fractions(results, rates)
    print_table(results, rates)

    if args.out:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        report = {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or "cpu",
            "paths": "Triton kernels"
            if args.device == "cuda"
            else "PyTorch reference paths only (CPU)",
            "dtype": str(dtype),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "torch": torch.__version__,
            "triton": triton_version,
            "card": rates,
            "results": [asdict(r) for r in results],
        }
        from megatron_lst.checkpoint.durable_files import replace_file_durably

        replace_file_durably(args.out, json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
