"""PyTorch reference for segment pooling: plain autograd ops, CPU fallback and test oracle.

Semantics equal the LST reference's `patch_reduce` (a `scatter_reduce(..., include_self=False)`
into zeros): a patch pools exactly its own tokens, so an all-negative patch gives its (negative)
max and an empty patch gives 0. Max routes its gradient to the first arg-max of each channel (the
reference's `scatter_reduce` would split it between ties).
"""

import torch

from .ranges import patch_ids_from_lengths, patch_spans

REDUCTIONS = ("max", "mean", "sum")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def check_segment_pool_inputs(x: torch.Tensor, patch_lengths: torch.Tensor, reduce: str) -> None:
    """Refuse an unknown `reduce`, an x that is not a floating `[B, N, D]`, patch_lengths that are
    not `[B, P]` with x's B, or the two on different devices. Shapes, dtypes and devices only (no
    host synchronisation); the lengths' integer dtype and signs are checked by `patch_spans`."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if patch_lengths.dim() != 2 or patch_lengths.shape[0] != x.shape[0]:
        raise ValueError(
            f"patch_lengths must be [B, P] with B = x.shape[0] = {x.shape[0]}, "
            f"got shape {tuple(patch_lengths.shape)}"
        )
    if patch_lengths.device != x.device:
        raise ValueError(
            f"patch_lengths is on {patch_lengths.device} but x is on {x.device}; move one of them"
        )


def _flat_patch_rows(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row of every token in a `[B * (P + 1), ...]` table of patches: `[B * N]` int64, token i of
    batch row b at `b * (P + 1) + patch id`; tokens past the total length land in row b's extra
    patch P, which the callers drop."""
    batch, num_patches = patch_lengths.shape
    ids = patch_ids_from_lengths(patch_lengths, num_tokens)  # [B, N], in 0..P
    offsets = torch.arange(batch, device=ids.device)[:, None] * (num_patches + 1)  # [B, 1]
    return (ids + offsets).flatten()


def first_argmax(x: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
    """Token index of the first per-channel maximum of every patch: `[B, P, D]` int64.

    A patch holding a NaN gets its first NaN (max propagates NaN); empty patches get N (no
    token). Computed without gradient; used to gather the max.
    """
    batch, num_tokens, dim = x.shape
    num_patches = patch_lengths.shape[1]
    with torch.no_grad():
        row = _flat_patch_rows(patch_lengths, num_tokens)  # [B * N]
        values = x.reshape(batch * num_tokens, dim)  # [B * N, D]
        index = row[:, None].expand(-1, dim)  # [B * N, D], a view
        patch_max = values.new_full((batch * (num_patches + 1), dim), float("-inf"))
        patch_max = patch_max.scatter_reduce(0, index, values, "amax")  # [B * (P + 1), D]
        token = torch.arange(num_tokens, device=x.device).repeat(batch)[:, None]  # [B * N, 1]
        # A NaN makes its patch's max NaN (amax propagates it), which equals nothing: NaN
        # tokens are candidates too, so the NaN is pooled rather than another patch's value.
        is_max = (values == patch_max[row]) | values.isnan()
        candidate = torch.where(is_max, token, num_tokens)  # [B * N, D]
        argmax = torch.full_like(patch_max, num_tokens, dtype=torch.long)
        argmax = argmax.scatter_reduce(0, index, candidate, "amin")
    return argmax.view(batch, num_patches + 1, dim)[:, :num_patches]


def segment_pool_reference(
    x: torch.Tensor, patch_lengths: torch.Tensor, reduce: str = "max"
) -> torch.Tensor:
    """Pool `x [B, N, D]` over the contiguous patches of `patch_lengths [B, P]` -> `[B, P, D]`.

    Accumulates in fp32 (fp64 for fp64 inputs) and returns x's dtype. Tokens past
    `sum(patch_lengths[b])` are ignored; a patch that reaches past N is clipped to N.
    """
    check_segment_pool_inputs(x, patch_lengths, reduce)
    batch, num_tokens, dim = x.shape
    num_patches = patch_lengths.shape[1]
    xa = x.to(accumulation_dtype(x.dtype))
    start, end = patch_spans(patch_lengths, num_tokens)  # [B, P] each
    count = (end - start)[..., None]  # [B, P, 1]

    if reduce == "max":
        if num_tokens == 0:  # every patch is empty; the (empty) sum keeps x in the graph
            return xa.sum(dim=1, keepdim=True).expand(batch, num_patches, dim).to(x.dtype)
        argmax = first_argmax(xa, patch_lengths)  # [B, P, D]
        pooled = xa.gather(1, argmax.clamp(max=num_tokens - 1))
        return torch.where(count > 0, pooled, 0.0).to(x.dtype)

    row = _flat_patch_rows(patch_lengths, num_tokens)  # [B * N]
    total = xa.new_zeros(batch * (num_patches + 1), dim)
    total = total.index_add(0, row, xa.reshape(batch * num_tokens, dim))
    total = total.view(batch, num_patches + 1, dim)[:, :num_patches]  # [B, P, D]
    if reduce == "mean":
        total = total / count.clamp(min=1)
    return total.to(x.dtype)
