"""Public patch cross-attention: softmax attention over one contiguous key range per query."""

import torch

from .backend import resolve_backend
from .patch_attention_reference import (
    check_attention_inputs,
    patch_cross_attention_reference,
    softmax_scale,
)

# The largest head dim the Triton kernel takes: past it (a 512-wide head block) no tile fits
# sm_90's 227 KiB of shared memory per block in fp32.
TRITON_MAX_HEAD_DIM = 256
# The same for fp64 inputs (gradcheck): past 128 the backward's smallest tile (32 x 32) needs
# 256 KiB (dQ) and 320 KiB (dK/dV), so no config the autotuner tries could run.
TRITON_MAX_FP64_HEAD_DIM = 128


def patch_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention where query i of row b sees keys `key_start[b,i] <= j < key_end[b,i]`.

    q `[B, Sq, H, d]`, k/v `[B, Sk, G, d]`, key_start/key_end `[B, Sq]` int -> `[B, Sq, H, d]` in
    q's dtype (fp32 softmax and accumulation, fp64 for fp64 inputs). G == H is multi-head
    attention; G < H (G dividing H) grouped-query attention, query head h reading key/value head
    `h // (H / G)`, with no copy of k or v (their gradients come back `[B, Sk, G, d]`). A query
    with an empty range outputs 0 and gets zero gradients. Ranges from `decoder_key_ranges` /
    `encoder_key_ranges` are non-decreasing in i, which lets the Triton kernel skip key blocks;
    any other ranges are still computed correctly. `scale`, a finite positive Python float,
    defaults to 1/sqrt(d); another value is refused (NaN or inf would make every output NaN).
    backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch"; see
    `lst_kernels.backend`. The Triton kernel takes d <= `TRITON_MAX_HEAD_DIM` (256), in fp64
    d <= `TRITON_MAX_FP64_HEAD_DIM` (128); a larger head is refused (ValueError).
    """
    check_attention_inputs(q, k, v, key_start, key_end)
    scale = softmax_scale(scale, q.shape[-1])
    if resolve_backend(backend, q, k, v, key_start, key_end) == "torch":
        return patch_cross_attention_reference(q, k, v, key_start, key_end, scale)
    fp64 = q.dtype == torch.float64
    max_head_dim = TRITON_MAX_FP64_HEAD_DIM if fp64 else TRITON_MAX_HEAD_DIM
    if q.shape[-1] > max_head_dim:
        raise ValueError(
            f"head dim {q.shape[-1]} is larger than the Triton patch attention kernel takes "
            f"{'in fp64 ' if fp64 else ''}({max_head_dim}: its tiles would not fit in GPU shared "
            "memory); use backend='torch' (LST_KERNEL_BACKEND=torch for a model) or heads of at "
            f"most {max_head_dim}"
        )
    from .patch_attention_triton import PatchCrossAttentionFunction

    if not q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # The Triton interpreter computes half-precision `tl.dot` wrongly: run it in fp32.
        out = PatchCrossAttentionFunction.apply(q.float(), k.float(), v.float(), key_start,
                                                key_end, scale)
        return out.to(q.dtype)
    return PatchCrossAttentionFunction.apply(q, k, v, key_start, key_end, scale)
