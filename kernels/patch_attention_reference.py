"""PyTorch reference for patch cross-attention over per-query contiguous key ranges.

Query i of batch row b attends keys `key_start[b, i] <= j < key_end[b, i]` in every head; a query
with an empty range outputs 0 and receives no gradient. Plain autograd ops, chunked over queries so
no `[Sq, Sk]` score matrix is ever built for the whole sequence: each chunk only scores the keys
between its smallest start and largest end. The chunk sizes need the ranges on the host (one sync
per chunk), which is fine for a CPU fallback and oracle but is why CUDA uses the Triton kernel.
"""

import math

import torch

# Upper bound on score elements (B * H * queries * keys) built per chunk.
SCORE_ELEMENTS_PER_CHUNK = 1 << 24


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor, key_end: torch.Tensor
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [B, S, H, d]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_queries, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and head dim"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, bound in (("key_start", key_start), ("key_end", key_end)):
        if bound.shape != (batch, num_queries):
            raise ValueError(f"{name} must be [B, Sq] = {(batch, num_queries)}, got {tuple(bound.shape)}")
        if bound.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {bound.dtype}")
        if bound.device != q.device:
            raise ValueError(f"{name} is on {bound.device} but q is on {q.device}; move it")


def patch_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Range-restricted softmax attention: q `[B, Sq, H, d]`, k/v `[B, Sk, H, d]` -> `[B, Sq, H, d]`.

    Computes in fp32 (fp64 for fp64 inputs) and returns q's dtype. `scale` defaults to 1/sqrt(d).
    """
    check_attention_inputs(q, k, v, key_start, key_end)
    batch, num_queries, heads, head_dim = q.shape
    num_keys = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    start = key_start.long().clamp(0, num_keys)  # [B, Sq]
    end = torch.maximum(key_end.long().clamp(0, num_keys), start)
    chunk = max(1, SCORE_ELEMENTS_PER_CHUNK // max(1, batch * heads * num_keys))

    outputs = []
    for q0 in range(0, num_queries, chunk):
        q1 = min(q0 + chunk, num_queries)
        chunk_start, chunk_end = start[:, q0:q1], end[:, q0:q1]  # [B, c]
        nonempty = chunk_end > chunk_start
        if not bool(nonempty.any()):
            outputs.append(q.new_zeros(batch, q1 - q0, heads, head_dim))
            continue
        k0 = int(chunk_start[nonempty].min())
        k1 = int(chunk_end[nonempty].max())
        qc = q[:, q0:q1].to(compute_dtype)  # [B, c, H, d]
        kc = k[:, k0:k1].to(compute_dtype)  # [B, s, H, d]
        vc = v[:, k0:k1].to(compute_dtype)
        key = torch.arange(k0, k1, device=q.device)  # [s]
        visible = (key >= chunk_start[..., None]) & (key < chunk_end[..., None])  # [B, c, s]
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale  # [B, H, c, s]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        # Row max as a constant shift; rows with no visible key keep shift 0 and weights 0.
        shift = scores.detach().amax(dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        weights = torch.exp(scores - shift)  # [B, H, c, s]
        norm = weights.sum(dim=-1, keepdim=True)
        probs = weights / torch.where(norm > 0, norm, 1.0)
        outputs.append(torch.einsum("bhqk,bkhd->bqhd", probs, vc).to(q.dtype))
    if not outputs:  # Sq == 0
        return torch.zeros_like(q)
    return torch.cat(outputs, dim=1)
