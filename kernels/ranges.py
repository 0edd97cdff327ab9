"""Token <-> patch bookkeeping shared by segment pooling and patch cross-attention.

All helpers are pure, vectorised and free of host synchronisation. They implement the LST
reference trainer's rules (see docs/architecture.md#the-batch-contract):

- boundaries `c = [0, cumsum(patch_lengths)]` (`[B, P + 1]`); patch p owns tokens `[c[p], c[p+1])`;
- lengths are >= 0. CPU lengths are checked (ValueError); CUDA ones are not, since that would
  sync the host: there a negative length counts as 0, so the boundaries never decrease and the
  kernels never index outside their rows;
- the patch id of token i is the last patch whose start is <= i, i.e. `#{c <= i} - 1`. Zero-length
  patches own no token; tokens at or beyond the total length get the id P (a patch that does not
  exist, so they are pooled nowhere and attended by no slot).

Because patch ids are non-decreasing in the token index, every attention query sees one contiguous
key range `[start, end)`, which is all the attention kernel needs.
"""

import torch


def _check_integer_rows(
    name: str, tensor: torch.Tensor, layout: str,
    shape: tuple[int | None, int | None] = (None, None),
) -> None:
    """Refuse anything but a 2-D integer `tensor` of `shape` (None: any size), naming it and its
    `layout`. Shapes and dtypes only: no host synchronisation."""
    if tensor.dim() != 2 or any(
        n is not None and n != m for n, m in zip(shape, tensor.shape, strict=True)
    ):
        sizes = ", ".join("?" if n is None else str(n) for n in shape)
        wanted = layout if shape == (None, None) else f"{layout} = [{sizes}]"
        raise ValueError(f"{name} must be {wanted}, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _check_document_starts(document_starts: torch.Tensor, batch: int,
                           num_tokens: int | None = None) -> None:
    """`document_starts` must be `[B, N + 1]` (the output of `document_starts`), B = `batch`."""
    columns = None if num_tokens is None else num_tokens + 1
    _check_integer_rows("document_starts", document_starts,
                        "[B, N + 1] (see document_starts(tokens, eos_id))", (batch, columns))


def _check_lengths(patch_lengths: torch.Tensor) -> None:
    _check_integer_rows("patch_lengths", patch_lengths, "[B, P]")
    if patch_lengths.device.type == "cpu":  # free on the host; on CUDA it would sync
        _refuse_negative_lengths(patch_lengths)


def _refuse_negative_lengths(patch_lengths: torch.Tensor) -> None:
    negative_rows = (patch_lengths < 0).any(dim=1).nonzero().flatten()
    if len(negative_rows):
        raise ValueError(
            f"patch_lengths must be >= 0, got negative lengths in rows {negative_rows[:8].tolist()}"
        )


def patch_boundaries(patch_lengths: torch.Tensor) -> torch.Tensor:
    """Boundaries `[B, P + 1]` (int64): 0, then the inclusive cumulative patch lengths.

    Non-decreasing: a negative length (unchecked on CUDA) counts as 0.
    """
    _check_lengths(patch_lengths)
    cumulative = patch_lengths.long().clamp(min=0).cumsum(dim=-1)  # [B, P]
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
    decoder_patch_ids: torch.Tensor, num_slots_per_patch: int, window: int, num_patches: int,
    document_first_patch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot range `[start, end)` each decoder token attends: two `[B, N]` int32.

    A token with decoder patch j sees the k slots of every global patch q with `q <= j < q + W`,
    q in `[0, P)`: slots `[max(j - W + 1, 0) * k, (min(j, P - 1) + 1) * k)`, empty when no such q.
    With `document_first_patch` (`[B, N]`, `token_document_first_patch`) only the patches of the
    token's own document: q >= that patch as well (empty for a document's first token when its
    first patch is still open).
    """
    _check_window(num_slots_per_patch, window)
    _check_integer_rows("decoder_patch_ids", decoder_patch_ids, "[B, N]")
    j = decoder_patch_ids.long()  # [B, N]
    first = j - window + 1
    if document_first_patch is not None:
        _check_integer_rows("document_first_patch", document_first_patch,
                            "[B, N] (like decoder_patch_ids)", tuple(j.shape))
        first = torch.maximum(first, document_first_patch.long())
    first = first.clamp(min=0, max=num_patches)
    last_excl = torch.maximum((j + 1).clamp(min=0, max=num_patches), first)
    start = (first * num_slots_per_patch).int()
    end = (last_excl * num_slots_per_patch).int()
    return start, end


def encoder_key_ranges(
    patch_lengths: torch.Tensor, num_slots_per_patch: int, window: int, num_tokens: int,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token range `[start, end)` each encoder query slot attends: two `[B, P * k]` int32.

    Slot s belongs to patch q = s // k and sees tokens i with `patch_id[i] <= q < patch_id[i] + W`,
    i.e. the tokens of patches `q - W + 1 .. q`: `[c[max(q - W + 1, 0)], c[q + 1])` clipped to N.
    With `document_starts` (`[B, N + 1]`, see `document_starts`) the range starts no earlier than
    the first position of patch q's document.
    """
    _check_window(num_slots_per_patch, window)
    bounds = patch_boundaries(patch_lengths).clamp(max=num_tokens)  # [B, P + 1]
    num_patches = patch_lengths.shape[1]
    q = torch.arange(num_patches, device=bounds.device)  # [P]
    # index_select and a slice: the same values as advanced indexing, which on CPU costs 10-1000x
    start = bounds.index_select(1, (q - window + 1).clamp(min=0))  # [B, P]
    end = bounds[:, 1:]  # [B, P]: c[q + 1]
    if document_starts is not None:
        _check_document_starts(document_starts, bounds.shape[0], num_tokens)
        start = torch.maximum(start, document_starts.gather(1, bounds[:, :-1]))
    start = start.repeat_interleave(num_slots_per_patch, dim=1).int()  # [B, P * k]
    end = end.repeat_interleave(num_slots_per_patch, dim=1).int()
    return start, end


# --- documents in packed rows ---------------------------------------------------------------
# A row may pack several documents. Positions 0..N of a row of N inputs (N: the row's last
# target) each belong to one: an EOS ends its document and the token after it starts the next.
# Attention never crosses a document start, and since document starts are non-decreasing in the
# position too, every range above stays one contiguous range once cut at the query's document
# start (`max(start, document start)`).


def document_starts(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """First position of the document of every position 0..N: `[B, N + 1]` int64.

    tokens `[B, N]`: position i > 0 starts a document iff `tokens[i - 1] == eos_id` (position N,
    the row's last target, included); position 0 always does.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tuple(tokens.shape)}")
    batch, num_tokens = tokens.shape
    positions = torch.arange(num_tokens + 1, device=tokens.device).expand(batch, -1)  # [B, N+1]
    starts_here = torch.ones(batch, num_tokens + 1, dtype=torch.bool, device=tokens.device)
    starts_here[:, 1:] = tokens == eos_id
    return torch.where(starts_here, positions, 0).cummax(dim=1).values  # [B, N + 1]


def sliding_window_key_starts(token_document_starts: torch.Tensor, window: int) -> torch.Tensor:
    """First key of every query of a causal sliding window cut at documents: `[B, N]` int64.

    token_document_starts `[B, N]` (`document_starts(...)[:, :N]`): query i sees keys
    `[max(i - W + 1, document start of i), i]`.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    _check_integer_rows("token_document_starts", token_document_starts,
                        "[B, N] (document_starts(tokens, eos_id)[:, :N])")
    num_tokens = token_document_starts.shape[1]
    positions = torch.arange(num_tokens, device=token_document_starts.device)  # [N]
    return torch.maximum(positions - window + 1, token_document_starts.long())


def patch_document_starts(patch_lengths: torch.Tensor, document_starts: torch.Tensor
                          ) -> torch.Tensor:
    """First patch of the document of every patch: `[B, P]` int64.

    A patch's document is that of its first position (clipped to N, which zero-length trailing
    patches start at); patches never span two documents, so the document's first patch is the
    one that starts at the document's first position.
    """
    _check_lengths(patch_lengths)
    _check_document_starts(document_starts, patch_lengths.shape[0])
    num_tokens = document_starts.shape[1] - 1
    first_token, _ = patch_spans(patch_lengths, num_tokens)  # [B, P]
    first_token_document = document_starts.gather(1, first_token)  # [B, P]
    ids = patch_ids_from_lengths(patch_lengths, num_tokens + 1)  # [B, N + 1]
    return ids.gather(1, first_token_document)


def token_document_first_patch(patch_lengths: torch.Tensor, document_starts: torch.Tensor
                               ) -> torch.Tensor:
    """First patch of the document of every input token: `[B, N]` int64 (`document_starts`
    `[B, N + 1]`)."""
    _check_lengths(patch_lengths)
    _check_document_starts(document_starts, patch_lengths.shape[0])
    num_tokens = document_starts.shape[1] - 1
    ids = patch_ids_from_lengths(patch_lengths, num_tokens + 1)  # [B, N + 1]
    return ids.gather(1, document_starts[:, :num_tokens])
