"""Triton flash-style attention over one contiguous key range per query (forward and backward).

Query i sees keys `[key_start[i], key_end[i])`. No mask tensor: visibility is recomputed from the
two range vectors inside every tile, and only key blocks that a query block can see are visited.
Grouped-query attention: k and v have G heads for the H query heads (G divides H, G == H is plain
multi-head), query head h reads key/value head `h // (H / G)` through its pointer, so no kernel
copies k or v.

- forward (grid: query blocks x batch*heads): online softmax over key blocks in
  `[min start, max end)` of the query block; saves the base-2 logsumexp per query (+inf for a query
  with an empty range, whose output is 0).
- backward, FlashAttention-2 style in two atomics-free passes that recompute the probabilities:
  dQ per query block (grid: query blocks x batch*heads, same key loop as the forward), and dK/dV
  per key block (grid: key blocks x batch*kv heads), looping over the H/G query heads of its
  group and, for each, the queries that can see the block, summing into one dK/dV tile that is
  written once. For monotone ranges those queries are contiguous: query i sees key j iff
  `key_end[i] > j` (a suffix) and `key_start[i] <= j` (a prefix), found by `searchsorted`; for
  non-monotone ranges the pass falls back to all queries, masked, so it stays correct. A pass
  whose gradients autograd does not ask for (frozen queries, or frozen keys and values) is
  skipped.
Axis 1 of every grid holds batch x heads rows, which CUDA caps at 65535 (`MAX_GRID_ROWS`): more
rows take several launches, each told its first row; row offsets are int64 in the kernels.
Saved for the backward: q, k, v, the output, the log-sum-exp `[B, H, Sq]` and the clipped ranges
`[B, Sq]`. Memory: O(Sq + Sk) per head (output, logsumexp, per-key query bounds); no `[Sq, Sk]`
tensor.
Softmax statistics and accumulators are fp32 (fp64 for fp64 inputs: `ACC_DTYPE`).
"""

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import accumulator, dot_precision, head_block, use_autotune
from .last_call import LastCall
from .segment_pool_reference import accumulation_dtype

LOG2E = 1.4426950408889634


# `first_row` is 0 for most launches and a multiple of MAX_GRID_ROWS past it: not specialized on,
# so those launches reuse one compilation.
_ROW_OFFSET_JIT = triton.jit(do_not_specialize=["first_row"])


@triton.jit
def _query_block(ks_ptr, ke_ptr, first_row, num_heads, group_size, num_queries, num_keys,
                 head_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where program (i, r) of a forward or dQ launch works: row `first_row + r` = b * H + h
    (int64, as b and the statistics' offsets), head h and its kv head, queries
    `[i * BLOCK_M, (i + 1) * BLOCK_M)`, channels, their masks, the queries' ranges, and the
    key span `[lo, hi)` any of them sees, lo rounded down to a key block."""
    row = (first_row + tl.program_id(1)).to(tl.int64)
    b = row // num_heads
    h = (row % num_heads).to(tl.int32)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < num_queries
    d_ok = offs_d < head_dim
    ks = tl.load(ks_ptr + b * num_queries + offs_m, mask=m_ok, other=0)
    ke = tl.load(ke_ptr + b * num_queries + offs_m, mask=m_ok, other=0)
    nonempty = ks < ke
    lo = tl.min(tl.where(nonempty, ks, num_keys), axis=0)
    hi = tl.max(tl.where(nonempty, ke, 0), axis=0)
    lo = (lo // BLOCK_N) * BLOCK_N
    return row, b, h, h // group_size, offs_m, offs_d, m_ok, d_ok, ks, ke, lo, hi


@_ROW_OFFSET_JIT
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ks_ptr, ke_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    num_heads, group_size, num_queries, num_keys, head_dim, scale_log2, first_row,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row, b, h, kv_head, offs_m, offs_d, m_ok, d_ok, ks, ke, lo, hi = _query_block(
        ks_ptr, ke_ptr, first_row, num_heads, group_size, num_queries, num_keys, head_dim,
        BLOCK_M, BLOCK_N, BLOCK_D)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    row_max = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < num_keys
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2  # [M, N], base-2 logits
        visible = (offs_n[None, :] >= ks[:, None]) & (offs_n[None, :] < ke[:, None])
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps shift 0, so exp2(-inf - 0) = 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(seen, row_max + tl.log2(tl.where(seen, row_sum, 1.0)), float("inf"))
    tl.store(lse_ptr + row * num_queries + offs_m, lse, mask=m_ok)


@_ROW_OFFSET_JIT
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, ks_ptr, ke_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    num_heads, group_size, num_queries, num_keys, head_dim, scale, scale_log2, first_row,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row, b, h, kv_head, offs_m, offs_d, m_ok, d_ok, ks, ke, lo, hi = _query_block(
        ks_ptr, ke_ptr, first_row, num_heads, group_size, num_queries, num_keys, head_dim,
        BLOCK_M, BLOCK_N, BLOCK_D)
    md_ok = m_ok[:, None] & d_ok[None, :]

    stats = row * num_queries + offs_m
    lse = tl.load(lse_ptr + stats, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stats, mask=m_ok, other=0.0)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :], mask=md_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nd_ok = (offs_n < num_keys)[None, :] & d_ok[:, None]
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=nd_ok, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None], mask=nd_ok, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        visible = (offs_n[None, :] >= ks[:, None]) & (offs_n[None, :] < ke[:, None])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)  # [M, N]
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dq_ptrs = dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs
    tl.store(dq_ptrs + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=md_ok)


@_ROW_OFFSET_JIT
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, ks_ptr, ke_ptr,
    first_query_ptr, end_query_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    num_heads, group_size, num_queries, num_keys, head_dim, scale, scale_log2, first_row,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (key block, batch x kv head): it sums the gradients of the `group_size`
    # query heads that read this kv head, so each dK/dV element is written once, without atomics.
    num_kv_heads = num_heads // group_size
    row = (first_row + tl.program_id(1)).to(tl.int64)  # b * G + kv head
    b = row // num_kv_heads
    kv_head = (row % num_kv_heads).to(tl.int32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < num_keys
    d_ok = offs_d < head_dim
    nd_ok = n_ok[:, None] & d_ok[None, :]
    # Queries that may see this key block: [min first_query, max end_query) over its keys.
    first_query = tl.load(first_query_ptr + b * num_keys + offs_n, mask=n_ok, other=num_queries)
    end_query = tl.load(end_query_ptr + b * num_keys + offs_n, mask=n_ok, other=0)
    lo = (tl.min(first_query, axis=0) // BLOCK_M) * BLOCK_M
    hi = tl.max(end_query, axis=0)

    k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :], mask=nd_ok, other=0.0)  # [N, D]
    v = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=nd_ok, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for h in range(kv_head * group_size, (kv_head + 1) * group_size):  # the group's query heads
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        stat_base = (b * num_heads + h) * num_queries
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < num_queries
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=md_ok,
                        other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=md_ok,
                         other=0.0)
            lse = tl.load(lse_ptr + stat_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + stat_base + offs_m, mask=m_ok, other=0.0)
            ks = tl.load(ks_ptr + b * num_queries + offs_m, mask=m_ok, other=0)
            ke = tl.load(ke_ptr + b * num_queries + offs_m, mask=m_ok, other=0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # [N, M]
            visible = (offs_n[:, None] >= ks[None, :]) & (offs_n[:, None] < ke[None, :])
            pt = tl.where(visible, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [N, M]
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = (dk_ptr + b * stride_dkb + kv_head * stride_dkh
               + offs_n[:, None] * stride_dks)
    tl.store(dk_ptrs + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=nd_ok)
    dv_ptrs = (dv_ptr + b * stride_dvb + kv_head * stride_dvh
               + offs_n[:, None] * stride_dvs)
    tl.store(dv_ptrs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=nd_ok)


def _tile_configs() -> list[triton.Config]:
    """The autotuner's candidates; `_tiles_for_the_head` picks those it tries for a launch."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in [
            (64, 64, 4, 2), (128, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 2),
            (32, 64, 4, 2), (32, 32, 4, 1),
        ]
    ]


def _tiles_for_the_head(configs: list[triton.Config], named_args: dict, **meta
                        ) -> list[triton.Config]:
    """The autotuner's early prune (Triton passes the launch's constexprs as `meta`): head
    blocks of 1 KiB or more (fp32 heads of 129-256 channels, fp64 heads of 65-128: a 256- or
    128-wide `BLOCK_D`) take the 32-query tiles, the only ones whose backward fits sm_90's 227 KiB
    of shared memory there (the larger tiles need 208-676 KiB in fp32 and 224-710 KiB in fp64:
    the forward's 64 x 64 at two stages fits, at 208 and 224, the backward's need 264 or more;
    the three kernels share one config list); every other launch takes the larger tiles, which
    fit (bf16 up to head dim 256: 196 KiB at most) and run faster. Each config tried costs a
    compilation, and one that does not fit costs it for nothing."""
    if "BLOCK_D" not in meta:  # a Triton that passes no constexprs: try every config
        return configs
    wide = meta["BLOCK_D"] * _element_bytes(meta) >= 1024
    return [config for config in configs if (config.kwargs["BLOCK_M"] == 32) == wide]


def _element_bytes(meta: dict) -> int:
    """Bytes of one input element of a launch, from its constexprs: 8 (fp64 accumulation), 4
    (fp32: exact dot products) or 2 (half precision)."""
    if meta.get("ACC_DTYPE") == tl.float64:
        return 8
    return 4 if meta["PRECISION"] == "ieee" else 2


_TUNE_KEY = ["head_dim", "PRECISION"]
_PRUNE = {"early_config_prune": _tiles_for_the_head}
_fwd_tuned = triton.autotune(_tile_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _attn_fwd_kernel)
_dq_tuned = triton.autotune(_tile_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _attn_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(_tile_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _attn_bwd_dkdv_kernel)

# Tiles when not autotuning, i.e. under the interpreter (tiny, so CPU tests take seconds).
_FIXED_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}


# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1 programs). The batch x heads rows go
# on axis 1, so a launch takes at most this many and more rows take several launches.
MAX_GRID_ROWS = 65535


def _launch(tuned, plain, blocks_along: str, length: int, rows: int, args, meta,
            autotune: bool):
    """Launch `tuned` (autotuned) or `plain` with `_FIXED_TILES` over ceil(length / tile) x
    `rows` programs, `blocks_along` naming the tile on axis 0, in launches of at most
    `MAX_GRID_ROWS` rows, each told its first row (`first_row`, the kernels' last argument before
    the constexprs)."""
    for first_row in range(0, rows, MAX_GRID_ROWS):
        launch_rows = min(MAX_GRID_ROWS, rows - first_row)
        if autotune:
            grid = functools.partial(_tuned_grid, length, blocks_along, launch_rows)
            tuned[grid](*args, first_row, **meta)
        else:
            grid = (triton.cdiv(length, _FIXED_TILES[blocks_along]), launch_rows)
            plain[grid](*args, first_row, **meta, **_FIXED_TILES)


def _tuned_grid(length: int, blocks_along: str, rows: int, config: dict) -> tuple[int, int]:
    """The grid of an autotuned launch for the tiles of `config`."""
    return triton.cdiv(length, config[blocks_along]), rows


def _strides(*tensors: torch.Tensor) -> list[int]:
    """Batch, sequence and head strides of each `[B, S, H, d]` tensor, in order: the kernels'
    `stride_*b, stride_*s, stride_*h` (the channel stride is 1)."""
    return [s for t in tensors for s in t.stride()[:3]]


def clamp_ranges(key_start: torch.Tensor, key_end: torch.Tensor, num_keys: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges `[B, Sq]` of any integer dtype clipped to `[0, Sk]` with end >= start: two `[B, Sq]`
    int32, contiguous (monotone stays monotone). Clipped in int64: a narrower dtype (int8, uint8,
    int16) cannot hold an Sk past its range, which `clamp` refuses."""
    start = key_start.long().clamp(0, num_keys)
    end = torch.maximum(key_end.long().clamp(0, num_keys), start)
    return start.int().contiguous(), end.int().contiguous()


def queries_per_key(key_start: torch.Tensor, key_end: torch.Tensor, num_keys: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key j, the query range `[first, end)` that contains every query seeing j:
    two `[B, Sk]` int32, from the `[B, Sq]` int32 ranges of `clamp_ranges`. Exact for
    non-decreasing ranges, all queries otherwise. No host sync."""
    batch, num_queries = key_start.shape
    keys = torch.arange(num_keys, device=key_start.device, dtype=key_start.dtype)
    keys = keys.expand(batch, num_keys).contiguous()
    first = torch.searchsorted(key_end, keys, right=True, out_int32=True)  # first i: end[i] > j
    end = torch.searchsorted(key_start, keys, right=True, out_int32=True)  # first i: start[i] > j
    monotone = ((key_start.diff(dim=1) >= 0) & (key_end.diff(dim=1) >= 0)).all(dim=1, keepdim=True)
    first = torch.where(monotone, first, 0)
    end = torch.where(monotone, end, num_queries)
    return first.contiguous(), end.contiguous()


# Every layer of a stack passes the same range tensors: prepared once, not in each layer.
prepared_ranges = LastCall(clamp_ranges)
prepared_queries_per_key = LastCall(queries_per_key)


class PatchCrossAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: `apply(q, k, v, key_start, key_end, scale)`; shapes as in
    `lst_kernels.patch_cross_attention` (q `[B, Sq, H, d]`, k/v `[B, Sk, G, d]`, G dividing H,
    and the float `scale`, checked there). Differentiable once: a double backward raises."""

    @staticmethod
    def forward(ctx, q, k, v, key_start, key_end, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        batch, num_queries, heads, head_dim = q.shape
        num_keys = k.shape[1]
        group_size = heads // k.shape[2]  # query heads per key/value head
        start, end = prepared_ranges(key_start, key_end, num_keys)  # [B, Sq] int32 each
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Sq, H, d]
        # fp32 statistics and accumulators (fp64 for fp64 inputs: gradcheck).
        stats_dtype = accumulation_dtype(q.dtype)
        # log2 of each query's softmax normaliser, sum over its keys of exp(scale * q . k), +inf
        # for an empty range: [B, H, Sq].
        lse = torch.empty(batch, heads, num_queries, dtype=stats_dtype, device=q.device)
        meta = dict(PRECISION=dot_precision(q.dtype), ACC_DTYPE=accumulator(q.dtype),
                    BLOCK_D=head_block(head_dim))
        if q.numel() and num_keys:
            args = (q, k, v, out, lse, start, end, *_strides(q, k, v, out),
                    heads, group_size, num_queries, num_keys, head_dim, scale * LOG2E)
            _launch(_fwd_tuned, _attn_fwd_kernel, "BLOCK_M", num_queries, batch * heads, args,
                    meta, use_autotune(q))
        else:
            out.zero_()
            lse.fill_(float("inf"))
        ctx.save_for_backward(q, k, v, out, lse, start, end)
        ctx.scale, ctx.meta = scale, meta
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # Only the passes autograd asks for run: dQ for q, dK/dV for k or v (frozen keys and
        # values, or frozen queries, skip one); the gradients not asked for are None.
        q, k, v, out, lse, start, end = ctx.saved_tensors
        batch, num_queries, heads, head_dim = q.shape
        num_keys, kv_heads = k.shape[1], k.shape[2]
        group_size = heads // kv_heads
        wants_q, wants_k, wants_v = ctx.needs_input_grad[:3]
        if q.numel() == 0 or num_keys == 0:
            grads = (torch.zeros_like(t) if wanted else None
                     for t, wanted in zip((q, k, v), (wants_q, wants_k, wants_v), strict=True))
            return *grads, None, None, None
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        # delta_i = sum_d dO_i * O_i: [B, H, Sq] in the dtype of lse.
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1).transpose(1, 2)
        delta = delta.contiguous()
        scales = (ctx.scale, ctx.scale * LOG2E)
        tuned = use_autotune(q)
        dq = dk = dv = None
        if wants_q:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            dq_args = (q, k, v, grad_out, dq, lse, delta, start, end,
                       *_strides(q, k, v, grad_out, dq), heads, group_size, num_queries,
                       num_keys, head_dim, *scales)
            _launch(_dq_tuned, _attn_bwd_dq_kernel, "BLOCK_M", num_queries, batch * heads,
                    dq_args, ctx.meta, tuned)
        if wants_k or wants_v:  # one pass computes both
            dk = torch.empty_like(k, memory_format=torch.contiguous_format)  # [B, Sk, G, d]
            dv = torch.empty_like(v, memory_format=torch.contiguous_format)
            # [B, Sk] int32 each: the queries each key's block loops over.
            first_query, end_query = prepared_queries_per_key(start, end, num_keys)
            dkdv_args = (q, k, v, grad_out, dk, dv, lse, delta, start, end, first_query,
                         end_query, *_strides(q, k, v, grad_out, dk, dv), heads, group_size,
                         num_queries, num_keys, head_dim, *scales)
            _launch(_dkdv_tuned, _attn_bwd_dkdv_kernel, "BLOCK_N", num_keys, batch * kv_heads,
                    dkdv_args, ctx.meta, tuned)
        return dq, dk if wants_k else None, dv if wants_v else None, None, None, None
