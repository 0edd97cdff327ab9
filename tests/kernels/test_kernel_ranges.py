"""Range helpers equal dense masks built from the reference rules, edge cases included."""

import pytest
import torch
from kernel_cases import (
    brute_patch_ids,
    decoder_dense_mask,
    encoder_dense_mask,
    random_patch_lengths,
    range_mask,
)
from lst_kernels import (
    decoder_key_ranges,
    encoder_key_ranges,
    patch_document_starts,
    patch_ids_from_lengths,
    patch_spans,
    sliding_window_key_starts,
    token_document_first_patch,
)

# Lengths whose sum is below N, equal to N + 1 (the trainer contract) and above; zero-length
# patches first, inside and trailing.
EDGE_LENGTHS = torch.tensor(
    [[1, 3, 0, 0, 2, 4, 0], [0, 2, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 2], [5, 0, 9, 1, 0, 0, 3]],
    dtype=torch.int32,
)


def _cases():
    generator = torch.Generator().manual_seed(0)
    yield EDGE_LENGTHS, 8
    for _ in range(6):
        lengths = random_patch_lengths(generator, batch=3, num_patches=9)
        num_tokens = int(lengths.sum(1).max()) + int(
            torch.randint(-3, 3, (1,), generator=generator)
        )
        yield lengths, max(num_tokens, 1)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"N{c[1]}")
def test_patch_ids_follow_reference_rule(case):
    lengths, num_tokens = case
    ids = patch_ids_from_lengths(lengths, num_tokens)
    assert ids.dtype == torch.long
    torch.testing.assert_close(ids, brute_patch_ids(lengths, num_tokens), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"N{c[1]}")
def test_patch_spans_hold_exactly_the_tokens_of_each_patch(case):
    lengths, num_tokens = case
    start, end = patch_spans(lengths, num_tokens)
    ids = brute_patch_ids(lengths, num_tokens)
    owned = ids[:, None, :] == torch.arange(lengths.shape[1])[None, :, None]  # [B, P, N]
    torch.testing.assert_close(range_mask(start, end, num_tokens), owned, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("window", [1, 2, 3, 64])
def test_encoder_ranges_equal_dense_mask(k, window):
    for lengths, num_tokens in _cases():
        num_patches = lengths.shape[1]
        start, end = encoder_key_ranges(lengths, k, window, num_tokens)
        assert start.dtype == end.dtype == torch.int32
        assert start.shape == (lengths.shape[0], num_patches * k)
        dense = encoder_dense_mask(brute_patch_ids(lengths, num_tokens), k, window, num_patches)
        torch.testing.assert_close(range_mask(start, end, num_tokens), dense, rtol=0, atol=0)
        assert (start.diff(dim=1) >= 0).all() and (end.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("window", [1, 2, 3, 64])
def test_decoder_ranges_equal_dense_mask(k, window):
    for lengths, num_tokens in _cases():
        num_patches = lengths.shape[1]
        # Decoder patch ids: the same rule on patch_lengths[:, 1:] (ids run up to P - 1).
        decoder_ids = patch_ids_from_lengths(lengths[:, 1:], num_tokens)
        start, end = decoder_key_ranges(decoder_ids, k, window, num_patches)
        assert start.dtype == end.dtype == torch.int32
        dense = decoder_dense_mask(decoder_ids, k, window, num_patches)
        torch.testing.assert_close(range_mask(start, end, num_patches * k), dense, rtol=0, atol=0)
        assert (start.diff(dim=1) >= 0).all() and (end.diff(dim=1) >= 0).all()


def test_decoder_ranges_of_ids_beyond_the_patches_are_empty_or_clipped():
    ids = torch.tensor([[0, 3, 4, 9]])
    start, end = decoder_key_ranges(ids, num_slots_per_patch=2, window=2, num_patches=4)
    torch.testing.assert_close(start, torch.tensor([[0, 4, 6, 8]], dtype=torch.int32))
    torch.testing.assert_close(end, torch.tensor([[2, 8, 8, 8]], dtype=torch.int32))


def test_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"window"):
        encoder_key_ranges(EDGE_LENGTHS, 1, 0, 8)
    with pytest.raises(ValueError, match=r"num_slots_per_patch"):
        decoder_key_ranges(torch.zeros(1, 3, dtype=torch.long), 0, 1, 4)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        patch_ids_from_lengths(torch.ones(3, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match=r"integer"):
        patch_ids_from_lengths(torch.ones(1, 3), 4)
    negative = torch.tensor([[1, 3, 2], [1, 5, -3]], dtype=torch.int32)
    for helper in (
        patch_ids_from_lengths,
        patch_spans,
        lambda lengths, n: encoder_key_ranges(lengths, 1, 2, n),
    ):
        with pytest.raises(ValueError, match=r"patch_lengths must be >= 0.*rows \[1\]"):
            helper(negative, 6)


def test_helpers_name_malformed_patch_ids_and_document_starts():
    # Each was read without a word (float ids truncated, a [B, 1] or one-row tensor broadcast over
    # the batch, a [B, N] document_starts read as a row one token shorter) or failed deep inside
    # (an index error in a gather; on CUDA a device-side assert).
    lengths = torch.tensor([[2, 3, 1], [1, 1, 4]])
    starts = torch.zeros(2, 6, dtype=torch.long)  # [B, N + 1], N = 5
    ids = patch_ids_from_lengths(lengths[:, 1:], 5)  # [B, N]
    with pytest.raises(TypeError, match=r"decoder_patch_ids must be an integer tensor, got "
                                        r"torch.float32"):
        decoder_key_ranges(ids.float(), 2, 2, 3)
    with pytest.raises(ValueError, match=r"decoder_patch_ids must be \[B, N\], got shape \(5,\)"):
        decoder_key_ranges(ids[0], 2, 2, 3)
    for first_patch in (ids[:, :1], ids[:1], starts):
        with pytest.raises(ValueError, match=r"document_first_patch must be \[B, N\] \(like "
                                             rf"decoder_patch_ids\) = \[2, 5\], got shape "
                                             rf"\({first_patch.shape[0]}, "):
            decoder_key_ranges(ids, 2, 2, 3, first_patch)
    for bad in (starts[:, :5], starts[:1], starts[:, :, None]):
        with pytest.raises(ValueError, match=r"document_starts must be \[B, N \+ 1\] \(see "
                                             r"document_starts\(tokens, eos_id\)\) = \[2, 6\]"):
            encoder_key_ranges(lengths, 2, 2, 5, bad)
    with pytest.raises(TypeError, match=r"document_starts must be an integer tensor"):
        encoder_key_ranges(lengths, 2, 2, 5, starts.float())
    with pytest.raises(TypeError, match=r"token_document_starts must be an integer tensor"):
        sliding_window_key_starts(starts[:, :5].float(), 3)
    for helper in (patch_document_starts, token_document_first_patch):
        with pytest.raises(ValueError, match=r"document_starts must be .* = \[2, \?\], got "
                                             r"shape \(1, 6\)"):
            helper(lengths, starts[:1])
        with pytest.raises(ValueError, match=r"patch_lengths must be \[B, P\]"):
            helper(lengths[0], starts)


# --- packed documents ---------------------------------------------------------------------------

EOS = 2


def _packed(seed):
    """Rows of patches of 1..4 tokens, some ending with EOS (every EOS ends its patch), two
    trailing zero-length patches; tokens `[B, N]`, lengths `[B, P]` summing to N + 1."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (3, 24), generator=generator)
    lengths[:, 0], lengths[:, -2:] = 1, 0
    num_tokens = int(lengths.sum(1).max()) - 1
    lengths[:, -3] += num_tokens + 1 - lengths.sum(1)
    tokens = torch.randint(3, 9, (3, num_tokens), generator=generator)
    ends = lengths.cumsum(1) - 1
    for b, q in ((torch.rand(3, 24, generator=generator) < 0.25) & (ends < num_tokens)).nonzero().tolist():
        tokens[b, ends[b, q]] = EOS
    return tokens, lengths.int()


def test_document_starts_by_the_rule():
    from lst_kernels import document_starts

    tokens, _ = _packed(0)
    starts = document_starts(tokens, EOS)
    for b in range(tokens.shape[0]):
        current = 0
        for i in range(tokens.shape[1] + 1):
            if i > 0 and tokens[b, i - 1] == EOS:
                current = i
            assert starts[b, i] == current


@pytest.mark.parametrize("window", [1, 2, 5, 100])
@pytest.mark.parametrize("seed", range(3))
def test_document_cut_ranges_equal_the_rule_masks(window, seed):
    """Each range cut at the document start is exactly the rule's dense mask (so it is
    contiguous): local window, encoder pooling, decoder cross-attention and global attention."""
    from lst_kernels import (
        document_starts,
        patch_document_starts,
        sliding_window_key_starts,
        token_document_first_patch,
    )
    from patching.document_rule import (
        decoder_mask,
        encoder_mask,
        global_mask,
        self_attention_mask,
    )

    tokens, lengths = _packed(seed)
    batch, num_tokens = tokens.shape
    num_patches, k = lengths.shape[1], 2
    starts = document_starts(tokens, EOS)
    arange = torch.arange
    start = sliding_window_key_starts(starts[:, :-1], window)
    end = arange(1, num_tokens + 1).expand(batch, -1)
    assert torch.equal(range_mask(start, end, num_tokens), self_attention_mask(tokens, EOS, window))
    start, end = encoder_key_ranges(lengths, k, window, num_tokens, starts)
    assert torch.equal(range_mask(start, end, num_tokens), encoder_mask(tokens, EOS, lengths, window, k))
    ids = patch_ids_from_lengths(lengths[:, 1:], num_tokens)
    start, end = decoder_key_ranges(ids, k, window, num_patches,
                                    token_document_first_patch(lengths, starts))
    assert torch.equal(range_mask(start, end, num_patches * k),
                       decoder_mask(tokens, EOS, lengths, window, k))
    start = patch_document_starts(lengths, starts)
    end = arange(1, num_patches + 1).expand(batch, -1)
    assert torch.equal(range_mask(start, end, num_patches), global_mask(tokens, EOS, lengths))


def test_encoder_ranges_take_no_advanced_indexing():
    """The same values as `bounds[:, q - W + 1]` and `bounds[:, q + 1]`, without aten.index
    (10-1000x slower than index_select on a CPU)."""
    from models.host_syncs import count_aten_ops

    lengths = random_patch_lengths(torch.Generator().manual_seed(0), 3, 12)  # [3, 12]
    with count_aten_ops() as ops:
        start, end = encoder_key_ranges(lengths, 2, 3, 40)
    assert ops[torch.ops.aten.index.Tensor] == 0
    bounds = torch.nn.functional.pad(lengths.long().cumsum(-1), (1, 0)).clamp(max=40)
    q = torch.arange(lengths.shape[1])
    assert torch.equal(start, bounds[:, (q - 2).clamp(min=0)].repeat_interleave(2, dim=1).int())
    assert torch.equal(end, bounds[:, q + 1].repeat_interleave(2, dim=1).int())
