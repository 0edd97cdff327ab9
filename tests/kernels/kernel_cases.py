"""Shared cases and brute-force oracles for the kernel tests (written from the rules, in loops)."""

import math

import torch
from lst_kernels import decoder_key_ranges, encoder_key_ranges, patch_ids_from_lengths


def random_patch_lengths(
    generator: torch.Generator, batch: int, num_patches: int, max_length: int = 6
) -> torch.Tensor:
    """`[B, P]` int32 lengths with zero-length and length-1 patches mixed in and ragged rows
    (random trailing zero padding)."""
    lengths = torch.randint(0, max_length + 1, (batch, num_patches), generator=generator)
    lengths[torch.rand(batch, num_patches, generator=generator) < 0.2] = 1
    for b in range(batch):
        used = int(torch.randint(1, num_patches + 1, (1,), generator=generator))
        lengths[b, used:] = 0
    return lengths.int()


def model_key_ranges(lengths: torch.Tensor, num_tokens: int, direction: str, k: int,
                     window: int):
    """The model's cross-attention ranges for patch lengths `[B, P]`: (start, end, number of
    queries, number of keys). "decoder": the tokens see the P * k global slots; "encoder": the
    slots see the tokens."""
    num_patches = lengths.shape[1]
    if direction == "decoder":
        ids = patch_ids_from_lengths(lengths[:, 1:], num_tokens)
        start, end = decoder_key_ranges(ids, k, window, num_patches)
        return start, end, num_tokens, num_patches * k
    start, end = encoder_key_ranges(lengths, k, window, num_tokens)
    return start, end, num_patches * k, num_tokens


def brute_patch_ids(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The reference rule literally: last patch whose exclusive start is <= i, where the total
    length counts as the start of patch P."""
    batch, num_patches = patch_lengths.shape
    ids = torch.empty(batch, num_tokens, dtype=torch.long)
    for b in range(batch):
        starts = [0]
        for length in patch_lengths[b].tolist():
            starts.append(starts[-1] + length)
        for i in range(num_tokens):
            ids[b, i] = max(p for p in range(num_patches + 1) if starts[p] <= i)
    return ids


def brute_segment_pool(x: torch.Tensor, patch_lengths: torch.Tensor, reduce: str) -> torch.Tensor:
    """Pool each patch's own tokens (ids from `brute_patch_ids`) in float64; empty -> 0."""
    batch, num_tokens, dim = x.shape
    ids = brute_patch_ids(patch_lengths, num_tokens)
    out = torch.zeros(batch, patch_lengths.shape[1], dim, dtype=torch.float64)
    for b in range(batch):
        for p in range(patch_lengths.shape[1]):
            rows = x[b, ids[b] == p].double()
            if len(rows) == 0:
                continue
            out[b, p] = {
                "max": lambda r: r.amax(0),
                "mean": lambda r: r.mean(0),
                "sum": lambda r: r.sum(0),
            }[reduce](rows)
    return out


def dense_attention(q, k, v, visible: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention with a dense `[B, Sq, Sk]` boolean mask in float64; rows with no visible
    key give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


def range_mask(start: torch.Tensor, end: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`[B, Sq, Sk]` mask of `start <= j < end`."""
    keys = torch.arange(num_keys)
    return (keys >= start[..., None].long()) & (keys < end[..., None].long())


def encoder_dense_mask(patch_ids: torch.Tensor, k: int, window: int, num_patches: int):
    """Reference rule: slot s (patch q = s // k) sees token i iff pid[i] <= q < pid[i] + W.
    `[B, P * k, N]`."""
    q = (torch.arange(num_patches * k) // k)[None, :, None]
    pid = patch_ids[:, None, :]
    return (pid <= q) & (q < pid + window)


def decoder_dense_mask(decoder_patch_ids: torch.Tensor, k: int, window: int, num_patches: int):
    """Reference rule: token i (decoder patch j) sees slots of patch q iff q <= j < q + W.
    `[B, N, P * k]`."""
    q = (torch.arange(num_patches * k) // k)[None, None, :]
    j = decoder_patch_ids[:, :, None]
    return (q <= j) & (j < q + window)


def dense_grouped_attention(q, k, v, visible: torch.Tensor, scale: float | None = None):
    """`dense_attention` with k/v of G heads for q's H (grouped-query attention), head by head:
    query head h against key/value head `h // (H / G)`. `[B, Sq, H, d]` in float64."""
    group_size = q.shape[2] // k.shape[2]
    heads = []
    for h in range(q.shape[2]):
        g = h // group_size
        heads.append(dense_attention(q[:, :, h : h + 1], k[:, :, g : g + 1], v[:, :, g : g + 1],
                                     visible, scale))
    return torch.cat(heads, dim=2)
