"""Public segment pooling: `[B, N, D]` token states -> `[B, P, D]` patch states."""

import torch

from .backend import resolve_backend
from .segment_pool_reference import check_segment_pool_inputs, segment_pool_reference


def segment_pool(
    x: torch.Tensor, patch_lengths: torch.Tensor, reduce: str = "max", backend: str = "auto"
) -> torch.Tensor:
    """Max, mean or sum of `x [B, N, D]` over the contiguous patches of `patch_lengths [B, P]`.

    patch_lengths is zero-padded on the right; tokens past its row sum are ignored and a patch that
    reaches past N is clipped. Returns x's dtype, accumulates in fp32 (fp64 for fp64 inputs); an
    empty patch gives 0. Max routes its gradient to the first arg-max of each channel. A NaN in a
    patch makes its max NaN on the PyTorch path; the Triton kernel may skip it (the interpreter
    does). Deterministic with Triton and on CPU; the PyTorch path on CUDA sums with `index_add`
    (float atomics) unless `torch.use_deterministic_algorithms(True)` is set.
    backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch"; see `lst_kernels.backend`.
    """
    check_segment_pool_inputs(x, patch_lengths, reduce)
    if resolve_backend(backend, x, patch_lengths) == "torch":
        return segment_pool_reference(x, patch_lengths, reduce)
    from .segment_pool_triton import SegmentPoolFunction

    return SegmentPoolFunction.apply(x, patch_lengths, reduce)
