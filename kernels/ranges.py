"""Token <-> patch bookkeeping shared by segment pooling and patch cross-attention.

All helpers are pure, vectorised and free of host synchronisation. They implement the LST
reference trainer's rules (see docs/architecture.md#the-batch-contract and the reference fixtures' "Batch contract"):

- boundaries `c = [0, cumsum(patch_lengths)]` (`[B, P + 1]`); patch p owns tokens `[c[p], c[p+1])`;
- the patch id of token i is the last patch whose start is <= i, i.e. `#{c <= i} - 1`. Zero-length
  patches own no token; tokens at or beyond the total length get the id P (a patch that does not
  exist, so they are pooled nowhere and attended by no slot).

Because patch ids are non-decreasing in the token index, every attention query sees one contiguous
key range `[start, end)`, which is all the attention kernel needs.
"""

import torch


def _check_lengths(patch_lengths: torch.Tensor) -> None:
    if patch_lengths.dim() != 2:
        raise ValueError(
            f"patch_lengths must be [B, P], got shape {tuple(patch_lengths.shape)}"
        )
    if patch_lengths.is_floating_point() or patch_lengths.is_complex():
        raise TypeError(f"patch_lengths must be an integer tensor, got {patch_lengths.dtype}")


def patch_boundaries(patch_lengths: torch.Tensor) -> torch.Tensor:
    """Boundaries `[B, P + 1]` (int64): 0, then the inclusive cumulative patch lengths."""
    _check_lengths(patch_lengths)
    cumulative = patch_lengths.long().cumsum(dim=-1)  # [B, P]
    return torch.nn.functional.pad(cumulative, (1, 0))  # [B, P + 1]


def patch_spans(patch_lengths: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token span `[start, end)` of every patch, clipped to `num_tokens`: two `[B, P]` int64."""
    bounds = patch_boundaries(patch_lengths).clamp(max=num_tokens)  # [B, P + 1]
    return bounds[:, :-1], bounds[:, 1:]


def patch_ids_from_lengths(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Patch id of every token, `[B, N]` int64, by the reference rule.

    Token i gets the last patch whose exclusive cumulative start is <= i; tokens at or past
    `sum(patch_lengths[b])` get P. Lengths must be >= 0.
    """
    bounds = patch_boundaries(patch_lengths)  # [B, P + 1]
    tokens = torch.arange(num_tokens, device=bounds.device).expand(bounds.shape[0], num_tokens)
    # #{c <= i} - 1 over the sorted boundaries.
    return torch.searchsorted(bounds, tokens.contiguous(), right=True) - 1  # [B, N]


def _check_window(num_slots_per_patch: int, window: int) -> None:
    if num_slots_per_patch < 1:
        raise ValueError(f"num_slots_per_patch (k) must be >= 1, got {num_slots_per_patch}")
    if window < 1:
        raise ValueError(f"window (W, in patches) must be >= 1, got {window}")


def decoder_key_ranges(
    decoder_patch_ids: torch.Tensor, num_slots_per_patch: int, window: int, num_patches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot range `[start, end)` each decoder token attends: two `[B, N]` int32.

    A token with decoder patch j sees the k slots of every global patch q with `q <= j < q + W`,
    q in `[0, P)`: slots `[max(j - W + 1, 0) * k, (min(j, P - 1) + 1) * k)`, empty when no such q.
    """
    _check_window(num_slots_per_patch, window)
    j = decoder_patch_ids.long()  # [B, N]
    first = (j - window + 1).clamp(min=0, max=num_patches)
    last_excl = torch.maximum((j + 1).clamp(min=0, max=num_patches), first)
    start = (first * num_slots_per_patch).int()
    end = (last_excl * num_slots_per_patch).int()
    return start, end


def encoder_key_ranges(
    patch_lengths: torch.Tensor, num_slots_per_patch: int, window: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token range `[start, end)` each encoder query slot attends: two `[B, P * k]` int32.

    Slot s belongs to patch q = s // k and sees tokens i with `patch_id[i] <= q < patch_id[i] + W`,
    i.e. the tokens of patches `q - W + 1 .. q`: `[c[max(q - W + 1, 0)], c[q + 1])` clipped to N.
    """
    _check_window(num_slots_per_patch, window)
    bounds = patch_boundaries(patch_lengths).clamp(max=num_tokens)  # [B, P + 1]
    num_patches = patch_lengths.shape[1]
    q = torch.arange(num_patches, device=bounds.device)  # [P]
    start = bounds[:, (q - window + 1).clamp(min=0)]  # [B, P]
    end = bounds[:, q + 1]  # [B, P]
    start = start.repeat_interleave(num_slots_per_patch, dim=1).int()  # [B, P * k]
    end = end.repeat_interleave(num_slots_per_patch, dim=1).int()
    return start, end
