"""Fixed patching rules: hand cases, loop references and the invariants on random documents."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from patching_cases import VOCAB, patch_starts, random_interleaved

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.patching.patchers import (
    PatchingError,
    aligned_patch_lengths,
    static_patch_lengths,
    token_patch_lengths,
)
from megatron_lst.tokenizer.vocab import MODALITY_TEXT

V = VOCAB
S, T, BOS, EOS = V.speech_marker, V.text_marker, V.bos_id, V.eos_id


def units(n):
    return list(range(V.unit_offset, V.unit_offset + n))


def doc(tokens, groups=None, silences=None):
    return InterleavedDocument.from_tokens(np.array(tokens), V, groups, silences)


def static_loop(doc, p):
    """The reference's `static_patch_lengths`, token by token."""
    out, run = [], 0
    for speech in doc.modality == 1:
        if speech:
            run += 1
            if run == p:
                out.append(p)
                run = 0
        else:
            if run:
                out.append(run)
                run = 0
            out.append(1)
    if run:
        out.append(run)
    return out


def aligned_loop(doc):
    """The reference's `aligned_patch_lengths`: non-units 1, each unit run cut by its groups."""
    groups = iter(doc.unit_group_lengths.tolist())
    out, i, n = [], 0, len(doc)
    while i < n:
        if not doc.unit_mask[i]:
            out.append(1)
            i += 1
            continue
        start = i
        while i < n and doc.unit_mask[i]:
            i += 1
        taken = 0
        while taken < i - start:
            g = next(groups)
            out.append(g)
            taken += g
        assert taken == i - start
    return out


def test_static_hand_case():
    d = doc([BOS, S, *units(9), T, 5, 6, S, *units(3), EOS])
    assert static_patch_lengths(d, 4).tolist() == [1, 4, 4, 2, 1, 1, 1, 4, 1]
    assert static_patch_lengths(d, 1).tolist() == [1] * len(d)
    assert token_patch_lengths(d).tolist() == [1] * len(d)


def test_aligned_hand_cases():
    tokens = [BOS, S, *units(9), T, 5, EOS]
    d = doc(tokens, [3, 2, 4], [False, True, False])
    assert aligned_patch_lengths(d).tolist() == [1, 1, 3, 2, 4, 1, 1, 1]
    assert aligned_patch_lengths(d, "merged").tolist() == [1, 1, 3, 6, 1, 1, 1]

    # silence word silence word silence: leading/middle silences join the next word, the
    # trailing one joins the last word.
    d = doc([BOS, S, *units(10), EOS], [2, 3, 1, 2, 2], [True, False, True, False, True])
    assert aligned_patch_lengths(d, "merged").tolist() == [1, 1, 5, 5, 1]
    # A run of silences only is one patch; runs never merge across a text block.
    d = doc([BOS, S, *units(3), T, 7, S, *units(4), EOS], [1, 2, 4], [True, True, False])
    assert aligned_patch_lengths(d, "merged").tolist() == [1, 1, 3, 1, 1, 1, 4, 1]
    assert aligned_patch_lengths(d, "separate").tolist() == [1, 1, 1, 2, 1, 1, 1, 4, 1]


def test_aligned_rejects_inconsistent_groups():
    with pytest.raises(PatchingError, match="cover 5 units but it has 6"):
        aligned_patch_lengths(doc([BOS, S, *units(6), EOS], [2, 3], [False, False]))
    with pytest.raises(PatchingError, match="spans two speech runs"):
        aligned_patch_lengths(doc([BOS, S, *units(2), T, S, *units(2), EOS], [1, 2, 1],
                                  [False, False, False]))
    with pytest.raises(PatchingError, match="silence must be one of"):
        aligned_patch_lengths(doc([BOS, EOS], [], []), "drop")
    with pytest.raises(PatchingError, match="patch size must be >= 1"):
        static_patch_lengths(doc([BOS, EOS]), 0)


def check_invariants(d, lengths):
    assert lengths.dtype == np.int32
    assert (lengths >= 1).all()
    assert lengths.sum() == len(d)
    patch_of_token = np.repeat(np.arange(len(lengths)), lengths)
    starts = patch_starts(lengths)
    # No patch mixes modalities.
    for a, n in zip(starts, lengths, strict=True):
        assert len(set(d.modality[a:a + n].tolist())) == 1
    # Text tokens are patches of one; <s> starts its patch.
    text = d.modality == MODALITY_TEXT
    assert (lengths[patch_of_token[text]] == 1).all()
    marker = np.flatnonzero(d.tokens == S)
    assert np.isin(marker, starts).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), p=st.integers(1, 6))
def test_static_matches_reference_loop(seed, p):
    d = random_interleaved(np.random.default_rng(seed))
    lengths = static_patch_lengths(d, p)
    assert lengths.tolist() == static_loop(d, p)
    check_invariants(d, lengths)
    assert lengths.max() <= p


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_aligned_matches_reference_loop(seed):
    d = random_interleaved(np.random.default_rng(seed))
    separate = aligned_patch_lengths(d, "separate")
    assert separate.tolist() == aligned_loop(d)
    check_invariants(d, separate)
    check_invariants(d, token_patch_lengths(d))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_merged_joins_whole_groups_around_one_word(seed):
    d = random_interleaved(np.random.default_rng(seed))
    merged = aligned_patch_lengths(d, "merged")
    check_invariants(d, merged)
    # Boundaries of merged patches are a subset of the separate ones (groups are never split).
    assert set(patch_starts(merged)) <= set(patch_starts(aligned_patch_lengths(d, "separate")))
    # Each speech run gives max(1, its words) unit patches.
    group_start = np.flatnonzero(d.unit_mask)[np.cumsum(d.unit_group_lengths)
                                             - d.unit_group_lengths]
    unit_positions = np.flatnonzero(d.unit_mask)
    run_breaks = np.flatnonzero(np.diff(unit_positions) != 1)
    run_of_group = np.searchsorted(unit_positions[run_breaks], group_start, side="left")
    starts = set(patch_starts(merged).tolist())
    for run in np.unique(run_of_group):
        in_run = run_of_group == run
        words = int((~d.unit_group_is_silence[in_run]).sum())
        unit_patches = sum(int(g) in starts for g in group_start[in_run])
        assert unit_patches == max(1, words)
