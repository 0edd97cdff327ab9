"""Triton segment pooling: atomics-free forward over contiguous patches, gather backward.

Forward: one program per (batch row x patch, channel block) walks its patch's tokens BLOCK_T rows
at a time and writes the patch once. Max also writes, per channel, the offset of the first arg-max
inside its patch, in the narrowest integer type that holds any offset below N (uint8 for N <= 256,
int16 for N <= 32768, else int32): at bf16 that keeps max's extra traffic to 1-2 bytes a value.
Backward: one program per (token block, channel block) gathers each token's patch gradient, scaled
by 1/length for mean and kept only at the arg-max for max, so every gradient element is written
exactly once: no memset, no atomics, deterministic. Saved for it: the patch lengths, the spans
(`[B, P]` int32 each) and, for max, the arg-max offsets; not x, and not the token -> patch map,
which the backward rebuilds from the lengths.
"""

import torch
import triton
import triton.language as tl

from ._triton_utils import accumulator, use_autotune
from .ranges import patch_ids_from_lengths, patch_spans
from .segment_pool_reference import REDUCTIONS

# The kernels' REDUCE constant: 0 max, 1 mean, 2 sum.
_REDUCE_CODE = {name: code for code, name in enumerate(REDUCTIONS)}


@triton.jit
def _segment_pool_fwd_kernel(
    x_ptr, start_ptr, end_ptr, out_ptr, argmax_ptr,
    num_patches, dim,
    stride_xb, stride_xn, stride_ob, stride_op,
    REDUCE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * P + p
    b = row // num_patches
    p = row % num_patches
    start = tl.load(start_ptr + row).to(tl.int32)
    end = tl.load(end_ptr + row).to(tl.int32)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    offs_t = tl.arange(0, BLOCK_T)
    x_row = x_ptr + b.to(tl.int64) * stride_xb

    if REDUCE == 0:
        best = tl.full([BLOCK_D], float("-inf"), ACC_DTYPE)
        best_token = tl.zeros([BLOCK_D], tl.int32) + start
    else:
        total = tl.zeros([BLOCK_D], ACC_DTYPE)
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + offs_t
        ok = (tok < end)[:, None] & d_ok[None, :]
        ptrs = x_row + tok.to(tl.int64)[:, None] * stride_xn + offs_d[None, :]
        if REDUCE == 0:
            xt = tl.load(ptrs, mask=ok, other=float("-inf")).to(ACC_DTYPE)  # [T, D]
            block_best = tl.max(xt, axis=0)
            block_token = t0 + tl.argmax(xt, axis=0, tie_break_left=True).to(tl.int32)
            # Strictly greater: an earlier block keeps ties, so the first arg-max wins.
            better = block_best > best
            best_token = tl.where(better, block_token, best_token)
            best = tl.where(better, block_best, best)
        else:
            xt = tl.load(ptrs, mask=ok, other=0.0).to(ACC_DTYPE)
            total += tl.sum(xt, axis=0)

    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + p.to(tl.int64) * stride_op + offs_d
    if REDUCE == 0:
        result = tl.where(end > start, best, 0.0)
        offset = (best_token - start).to(argmax_ptr.dtype.element_ty)
        tl.store(argmax_ptr + row.to(tl.int64) * dim + offs_d, offset, mask=d_ok)
    elif REDUCE == 1:
        result = total / tl.maximum(end - start, 1).to(ACC_DTYPE)
    else:
        result = total
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _segment_pool_bwd_kernel(
    grad_out_ptr, token_patch_ptr, start_ptr, end_ptr, argmax_ptr, grad_x_ptr,
    num_tokens, num_patches, dim,
    stride_gb, stride_gp, stride_xb, stride_xn,
    REDUCE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blocks_per_row = tl.cdiv(num_tokens, BLOCK_N)
    b = tl.program_id(0) // blocks_per_row
    tok = (tl.program_id(0) % blocks_per_row) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tok < num_tokens
    d_ok = offs_d < dim
    patch = tl.load(token_patch_ptr + b * num_tokens + tok, mask=tok_ok, other=num_patches)
    owned = tok_ok & (patch < num_patches)  # tokens past the patches get no gradient
    patch = tl.where(owned, patch, 0).to(tl.int64)
    load_ok = owned[:, None] & d_ok[None, :]
    g = tl.load(
        grad_out_ptr + b.to(tl.int64) * stride_gb + patch[:, None] * stride_gp + offs_d[None, :],
        mask=load_ok, other=0.0,
    ).to(ACC_DTYPE)  # [N, D]
    if REDUCE == 0:
        row = b.to(tl.int64) * num_patches + patch
        offset = tl.load(argmax_ptr + row[:, None] * dim + offs_d[None, :], mask=load_ok, other=0)
        patch_start = tl.load(start_ptr + row, mask=owned, other=0)
        g = tl.where(offset.to(tl.int32) == (tok - patch_start)[:, None], g, 0.0)
    elif REDUCE == 1:
        row = b * num_patches + patch
        length = (tl.load(end_ptr + row, mask=owned, other=1)
                  - tl.load(start_ptr + row, mask=owned, other=0))
        g = g / tl.maximum(length, 1).to(ACC_DTYPE)[:, None]
    ptrs = (grad_x_ptr + b.to(tl.int64) * stride_xb + tok.to(tl.int64)[:, None] * stride_xn
            + offs_d[None, :])
    tl.store(ptrs, g.to(grad_x_ptr.dtype.element_ty), mask=tok_ok[:, None] & d_ok[None, :])


def _configs(rows: str, sizes: list[tuple[int, int, int]]) -> list[triton.Config]:
    """Autotune candidates: (rows per step, channel block, warps)."""
    return [triton.Config({rows: r, "BLOCK_D": d}, num_warps=w) for r, d, w in sizes]


_fwd_tuned = triton.autotune(
    _configs("BLOCK_T", [(4, 256, 2), (4, 512, 4), (8, 512, 4), (4, 1024, 4), (8, 1024, 8)]),
    key=["dim", "REDUCE"],
)(_segment_pool_fwd_kernel)
_bwd_tuned = triton.autotune(
    _configs("BLOCK_N", [(16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 512, 8), (64, 256, 8)]),
    key=["dim", "REDUCE"],
)(_segment_pool_bwd_kernel)

# Blocks when not autotuning, i.e. under the interpreter (tiny, so CPU tests take seconds).
_FIXED_FWD_BLOCKS = {"BLOCK_T": 2, "BLOCK_D": 32}
_FIXED_BWD_BLOCKS = {"BLOCK_N": 16, "BLOCK_D": 32}


def argmax_offset_dtype(num_tokens: int) -> torch.dtype:
    """Narrowest integer dtype holding every in-patch offset `0 .. num_tokens - 1`."""
    if num_tokens <= 256:
        return torch.uint8
    return torch.int16 if num_tokens <= 2**15 else torch.int32


def segment_pool_forward(
    x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, reduce: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x `[B, N, D]` (last dim contiguous), start/end `[B, P]` int32 -> pooled `[B, P, D]` and,
    for max, each channel's first arg-max offset in its patch `[B, P, D]` (else None)."""
    batch, _, dim = x.shape
    num_patches = start.shape[1]
    out = x.new_empty(batch, num_patches, dim)
    argmax = None
    if reduce == "max":
        argmax = torch.empty(out.shape, dtype=argmax_offset_dtype(x.shape[1]), device=x.device)
    if out.numel() == 0:
        return out, argmax
    # Mean and sum store no arg-max: `out` stands in for its pointer, which they never touch.
    args = (
        x, start, end, out, argmax if argmax is not None else out,
        num_patches, dim, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
    )
    meta = dict(REDUCE=_REDUCE_CODE[reduce], ACC_DTYPE=accumulator(x.dtype))
    if use_autotune(x):
        grid = lambda cfg: (batch * num_patches, triton.cdiv(dim, cfg["BLOCK_D"]))  # noqa: E731
        _fwd_tuned[grid](*args, **meta)
    else:
        blocks = _FIXED_FWD_BLOCKS
        grid = (batch * num_patches, triton.cdiv(dim, blocks["BLOCK_D"]))
        _segment_pool_fwd_kernel[grid](*args, **meta, **blocks)
    return out, argmax


def segment_pool_backward(
    grad_out: torch.Tensor,
    token_patch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    argmax: torch.Tensor | None,
    reduce: str,
    x_dtype: torch.dtype,
) -> torch.Tensor:
    """grad_out `[B, P, D]`, token_patch `[B, N]` int32 (P for unowned tokens), the forward's
    start/end `[B, P]` int32 and, for max, its arg-max offsets `[B, P, D]` -> grad_x `[B, N, D]`
    in `x_dtype`."""
    batch, num_patches, dim = grad_out.shape
    num_tokens = token_patch.shape[1]
    grad_out = grad_out.contiguous()
    grad_x = torch.empty(batch, num_tokens, dim, dtype=x_dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    # Mean and sum read no arg-max: `token_patch` stands in for its pointer.
    args = (
        grad_out, token_patch, start, end, argmax if argmax is not None else token_patch, grad_x,
        num_tokens, num_patches, dim,
        grad_out.stride(0), grad_out.stride(1), grad_x.stride(0), grad_x.stride(1),
    )
    meta = dict(REDUCE=_REDUCE_CODE[reduce], ACC_DTYPE=accumulator(x_dtype))
    if use_autotune(grad_out):
        grid = lambda cfg: (  # noqa: E731
            batch * triton.cdiv(num_tokens, cfg["BLOCK_N"]), triton.cdiv(dim, cfg["BLOCK_D"])
        )
        _bwd_tuned[grid](*args, **meta)
    else:
        blocks = _FIXED_BWD_BLOCKS
        grid = (batch * triton.cdiv(num_tokens, blocks["BLOCK_N"]),
                triton.cdiv(dim, blocks["BLOCK_D"]))
        _segment_pool_bwd_kernel[grid](*args, **meta, **blocks)
    return grad_x


class SegmentPoolFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton segment pool: `apply(x, patch_lengths, reduce)`.
    Differentiable once: a double backward raises."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, patch_lengths: torch.Tensor, reduce: str) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        # [B, P] int32 each: the patches' token spans, clipped to N.
        start, end = (s.int().contiguous() for s in patch_spans(patch_lengths, x.shape[1]))
        out, argmax = segment_pool_forward(x, start, end, reduce)  # [B, P, D] each (argmax: max)
        ctx.save_for_backward(patch_lengths, start, end, argmax)
        ctx.reduce, ctx.num_tokens, ctx.x_dtype = reduce, x.shape[1], x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        patch_lengths, start, end, argmax = ctx.saved_tensors
        # [B, N] int32: rebuilt here rather than saved from the forward.
        token_patch = patch_ids_from_lengths(patch_lengths, ctx.num_tokens).int().contiguous()
        grad_x = segment_pool_backward(
            grad_out, token_patch, start, end, argmax, ctx.reduce, ctx.x_dtype
        )
        return grad_x, None, None
