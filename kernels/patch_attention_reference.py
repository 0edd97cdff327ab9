"""PyTorch reference for patch cross-attention over per-query contiguous key ranges.

Query i of batch row b attends keys `key_start[b, i] <= j < key_end[b, i]` in every head; a query
with an empty range outputs 0 and receives no gradient. Grouped-query attention: k and v may have
G heads for q's H (G dividing H); query head h reads key/value head `h // (H / G)` (what
`repeat_interleave(H // G, dim=2)` of k and v would give, the reference LST's `repeat_kv` order),
without copying them: SDPA's `enable_gqa` takes the G heads as they are. Built from autograd ops
and chunked over queries, so no `[Sq, Sk]` mask or score matrix exists for the whole sequence:
each chunk of at most 256 queries runs PyTorch's scaled_dot_product_attention with an additive
mask over the keys between its smallest start and largest end (with ranges that grow with the
query, as the model's do, short chunks skip most of the keys no query of the chunk sees). Sizing
the chunks reads the ranges on the host (up to four reads per chunk: whether any query, and
whether every query, sees a key, and the chunk's key bounds), fine for the CPU path and a test
oracle, and one reason CUDA uses the Triton kernel.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from .segment_pool_reference import accumulation_dtype

# Upper bounds per chunk: attention elements (B * H * queries * keys), and queries.
SCORE_ELEMENTS_PER_CHUNK = 1 << 24
MAX_QUERY_CHUNK = 256


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
) -> None:
    """Refuse what the range attentions cannot compute: q, k, v that are not `[B, S, H, d]` of
    one floating dtype on one device, k and v of different shapes or of another batch or head
    dim than q, a head dim of 0, key/value heads that do not divide q's, and key_start/key_end
    that are not integer `[B, Sq]` on q's device. Reads shapes and dtypes only: no host sync."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [B, S, H, d]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    batch, num_queries, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim"
        )
    if head_dim == 0:
        raise ValueError(f"q, k, v have head dim 0 (shape {tuple(q.shape)}); heads need channels")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"k/v have {kv_heads} heads, which do not divide q's {heads} heads; give k and v one "
            "head per query head, or a number of heads that divides them (grouped-query attention)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, bound in (("key_start", key_start), ("key_end", key_end)):
        if bound.shape != (batch, num_queries):
            raise ValueError(
                f"{name} must be [B, Sq] = {(batch, num_queries)}, got {tuple(bound.shape)}"
            )
        if bound.is_floating_point() or bound.is_complex() or bound.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {bound.dtype}")
        if bound.device != q.device:
            raise ValueError(f"{name} is on {bound.device} but q is on {q.device}; move it")


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The scale of the attention logits: `scale`, or 1/sqrt(head_dim) for None. Refuses one
    that is not a finite positive real number: NaN or infinity would silently give NaN outputs,
    0 or less uniform or inverted attention. A Python number, so checking it reads no device."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(
            f"scale must be a Python float (or None for 1/sqrt(head dim)), got "
            f"{type(scale).__name__}; pass float(scale)"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"scale must be a finite number > 0 (the logits' multiplier, 1/sqrt(head dim) = "
            f"{1.0 / math.sqrt(head_dim):.4g} by default), got {scale}; pass None for the default"
        )
    return float(scale)


def patch_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Range-restricted softmax attention: q `[B, Sq, H, d]`, k/v `[B, Sk, G, d]` (G divides H;
    query head h reads key/value head `h // (H / G)`) -> like q.

    Computes in fp32 (fp64 for fp64 inputs) and returns q's dtype. `scale` (a finite positive
    Python float) defaults to 1/sqrt(d).
    The output depends on q, k and v even when no query sees a key (zero output and gradients).
    """
    check_attention_inputs(q, k, v, key_start, key_end)
    batch, num_queries, heads, head_dim = q.shape
    num_keys = k.shape[1]
    scale = softmax_scale(scale, head_dim)
    compute_dtype = accumulation_dtype(q.dtype)
    start = key_start.long().clamp(0, num_keys)  # [B, Sq]
    end = torch.maximum(key_end.long().clamp(0, num_keys), start)
    scores_per_query = max(1, batch * heads * num_keys)
    chunk = max(1, min(MAX_QUERY_CHUNK, SCORE_ELEMENTS_PER_CHUNK // scores_per_query))

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
        key = torch.arange(k0, k1, device=q.device)  # [s]
        visible = (key >= chunk_start[..., None]) & (key < chunk_end[..., None])  # [B, c, s]
        # A query that sees nothing attends the chunk's first key instead (so the softmax stays
        # finite), and its output is replaced by 0 below, which also zeroes its gradients.
        visible[..., 0] |= ~nonempty
        mask = torch.zeros(visible.shape, dtype=compute_dtype, device=q.device)
        mask.masked_fill_(~visible, float("-inf"))  # [B, c, s]
        out = F.scaled_dot_product_attention(
            q[:, q0:q1].transpose(1, 2).to(compute_dtype),  # [B, H, c, d]
            k[:, k0:k1].transpose(1, 2).to(compute_dtype),  # [B, G, s, d]
            v[:, k0:k1].transpose(1, 2).to(compute_dtype),
            attn_mask=mask[:, None],  # [B, 1, c, s]
            scale=scale,
            enable_gqa=k.shape[2] != heads,
        ).transpose(1, 2)  # [B, c, H, d]
        if not bool(nonempty.all()):
            out = torch.where(nonempty[..., None, None], out, 0.0)
        outputs.append(out.to(q.dtype))
    out = torch.cat(outputs, dim=1) if outputs else torch.zeros_like(q)  # [B, Sq, H, d]
    if not out.requires_grad:
        # No query sees a key (or Sq == 0): nothing above used q, k or v. Empty sums (exactly 0)
        # keep them in the graph with zero gradients, as on the Triton path.
        out = out + (q[:, :0].sum() + k[:, :0].sum() + v[:, :0].sum()).to(out.dtype)
    return out
