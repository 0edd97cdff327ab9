"""Interleaving: the layout distribution, hand-checked layouts, and a loop re-implementation of the
reference's span/silence rules compared on random documents."""

import itertools

import numpy as np
import pytest
from document_cases import SPACE_ID, VOCAB, random_aligned_document
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_lst.data.documents import AlignedDocument
from megatron_lst.data.interleave import (
    BlockLayout,
    InterleaveConfig,
    InterleavedDocument,
    Interleaver,
    draw_block_layout,
)
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH

V = VOCAB
BOS, EOS, T, S = V.bos_id, V.eos_id, V.text_marker, V.speech_marker


def u(*values):
    return [V.unit_offset + x for x in values]


# Segments: SIL(a0-a2) w1[10](b0 b1) w2[11 12](c0) SIL(d0-d4) w3[13](e0-e2) w4[14](f0) SIL(g0)
#           w5[15](h0 h1) SIL(i0 i1), units numbered 0..19 in order.
HAND = AlignedDocument(
    text_ids=np.array([10, 11, 12, 13, 14, 15], dtype=np.int32),
    unit_ids=np.arange(20, dtype=np.int32),
    seg_text_len=np.array([0, 1, 2, 0, 1, 1, 0, 1, 0], dtype=np.int32),
    seg_unit_len=np.array([3, 2, 1, 5, 3, 1, 1, 2, 2], dtype=np.int32),
)


def layout(speech, words):
    return BlockLayout(np.array(speech), np.array(words))


def test_hand_layout_speech_first():
    doc = Interleaver(V, SPACE_ID).layout(HAND, layout([True, False, True], [2, 2, 1]))
    # Block 1 keeps the leading silence whole (document start) and the first ceil(5/2) = 3 units
    # of the silence it shares with the text block; block 3 keeps ceil(1/2) = 1 unit of the shared
    # silence and the final silence whole (document end). The text block ends with the space.
    assert doc.tokens.tolist() == [BOS, S, *u(0, 1, 2, 3, 4, 5, 6, 7, 8), T, 13, 14, SPACE_ID,
                                   S, *u(15, 16, 17, 18, 19), EOS]
    assert doc.unit_group_lengths.tolist() == [3, 2, 1, 3, 1, 2, 2]
    assert doc.unit_group_is_silence.tolist() == [True, False, False, True, True, False, True]
    assert (doc.modality == MODALITY_SPEECH).tolist() == [
        t == S or t >= V.unit_offset for t in doc.tokens.tolist()]
    assert doc.unit_mask.tolist() == [t >= V.unit_offset for t in doc.tokens.tolist()]


def test_hand_layout_text_first():
    doc = Interleaver(V, SPACE_ID).layout(HAND, layout([False, True, False], [2, 2, 1]))
    # The speech block takes the last ceil(5/2) = 3 units of the silence before it; w3, w4 and
    # the first ceil(1/2) of the silence after it. The last text block has no trailing space.
    assert doc.tokens.tolist() == [BOS, T, 10, 11, 12, SPACE_ID, S, *u(8, 9, 10, 11, 12, 13, 14, 15),
                                   T, 15, EOS]
    assert doc.unit_group_lengths.tolist() == [3, 3, 1, 1]
    assert doc.unit_group_is_silence.tolist() == [True, False, False, True]
    without_space = Interleaver(V, None).layout(HAND, layout([False, True, False], [2, 2, 1]))
    assert SPACE_ID not in without_space.tokens.tolist()
    assert len(without_space) == len(doc) - 1


def test_document_without_words_is_one_speech_block():
    doc = AlignedDocument(np.zeros(0, np.int32), np.array([4, 5, 6], np.int32),
                          np.array([0, 0], np.int32), np.array([1, 2], np.int32))
    out = Interleaver(V, SPACE_ID)(doc, np.random.default_rng(0))
    assert out.tokens.tolist() == [BOS, S, *u(4, 5, 6), EOS]
    assert out.unit_group_lengths.tolist() == [1, 2]


def test_text_document():
    out = Interleaver(V, SPACE_ID).text_document(np.array([7, 8, 9], np.int32))
    assert out.tokens.tolist() == [BOS, T, 7, 8, 9, EOS]
    assert (out.modality == 0).all() and not out.unit_mask.any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="space_id 60 is not a text piece id"):
        Interleaver(V, 60)
    with pytest.raises(ValueError, match="covers 4 words but the document has 5"):
        Interleaver(V, SPACE_ID).layout(HAND, layout([True, False], [2, 2]))
    with pytest.raises(ValueError, match="min_text_words"):
        InterleaveConfig(min_text_words=10, max_text_words=5)


@settings(max_examples=200, deadline=None)
@given(num_words=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_block_layout_distribution(num_words, seed):
    out = draw_block_layout(num_words, np.random.default_rng(seed))
    lengths, speech = out.num_words.tolist(), out.is_speech.tolist()
    assert sum(lengths) == num_words and min(lengths) >= 1
    assert all(a != b for a, b in itertools.pairwise(speech))  # alternating
    hi = max(2, min(30, int(0.6 * num_words)))
    lo = max(2, min(5, hi))
    # Every block but the last (which is cut to fit, or takes a short tail) follows the rule.
    for k in range(len(lengths) - 1):
        if not speech[k]:
            assert lo <= lengths[k] <= hi
        elif k > 0:
            assert lengths[k] == max(2, lengths[k - 1] // 2)
        else:
            assert max(2, lo // 2) <= lengths[k] <= max(2, hi // 2)
    if len(lengths) > 1:
        assert lengths[-1] >= 3


def test_speech_only_fraction_lays_out_whole_documents_as_speech():
    config = InterleaveConfig(speech_only_fraction=0.25)
    layouts = [draw_block_layout(40, np.random.default_rng([7, i]), config) for i in range(2000)]
    whole = [len(out.num_words) == 1 and out.is_speech[0] for out in layouts]
    assert all(out.num_words.tolist() == [40] for out, w in zip(layouts, whole, strict=True) if w)
    # One block of all 40 words happens only by the speech-only draw (the others alternate).
    assert abs(np.mean(whole) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 2000)
    # The tokens: BOS, <s>, every unit of the document, EOS.
    doc = Interleaver(V, SPACE_ID, InterleaveConfig(speech_only_fraction=1.0))(
        HAND, np.random.default_rng(0))
    assert doc.tokens.tolist() == [BOS, S, *u(*range(20)), EOS]
    with pytest.raises(ValueError, match="speech_only_fraction must be in"):
        InterleaveConfig(speech_only_fraction=1.5)


def test_first_block_modality_is_a_fair_coin():
    first_speech = [draw_block_layout(50, np.random.default_rng([4, i])).is_speech[0]
                    for i in range(2000)]
    assert abs(np.mean(first_speech) - 0.5) < 5 * np.sqrt(0.25 / 2000)


def reference_loop(doc: AlignedDocument, out_layout: BlockLayout, space_id):
    """The reference's `_take_span` and `_slice_frames_half_sil`, segment by segment."""
    words = ["[SIL]" if n == 0 else "w" for n in doc.seg_text_len]
    pieces = np.split(doc.text_ids, np.cumsum(doc.seg_text_len)[:-1])
    frames = np.split(doc.unit_ids, np.cumsum(doc.seg_unit_len)[:-1])
    tokens, end = [BOS], 0
    blocks = list(zip(out_layout.is_speech.tolist(), out_layout.num_words.tolist(), strict=True))
    for k, (speech, count) in enumerate(blocks):
        start, i, taken = end, end, 0
        while i < len(words) and taken < count:
            taken += words[i] != "[SIL]"
            i += 1
        while i < len(words) and words[i] == "[SIL]":
            i += 1
        if start > 0 and words[start - 1] == "[SIL]":
            start -= 1
        end = i
        if not speech:
            tokens += [T] + [int(p) for s in range(start, end) for p in pieces[s]]
            tokens += [space_id] if k < len(blocks) - 1 else []
            continue
        span = [list(frames[s]) for s in range(start, end)]
        if words[start] == "[SIL]" and start > 0 and end - start > 1:
            span[0] = span[0][len(span[0]) // 2:]
        if words[end - 1] == "[SIL]" and end < len(words):
            span[-1] = span[-1][:len(span[-1]) - len(span[-1]) // 2]
        tokens += [S] + [V.unit_offset + int(x) for seg in span for x in seg]
    return tokens + [EOS]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_segments=st.integers(1, 120),
       silence_rate=st.sampled_from([0.0, 0.3, 0.6, 0.9]))
def test_interleaving_matches_reference_loop(seed, num_segments, silence_rate):
    rng = np.random.default_rng(seed)
    doc = random_aligned_document(rng, num_segments, silence_rate)
    interleaver = Interleaver(V, SPACE_ID)
    out = interleaver(doc, np.random.default_rng([seed, 1]))
    num_words = int((doc.seg_text_len > 0).sum())
    if num_words == 0:
        assert out.tokens.tolist() == [BOS, S, *(doc.unit_ids + V.unit_offset).tolist(), EOS]
        return
    drawn = draw_block_layout(num_words, np.random.default_rng([seed, 1]))
    assert out.tokens.tolist() == reference_loop(doc, drawn, SPACE_ID)
    # Groups cover exactly the units, in order.
    assert out.unit_group_lengths.sum() == out.unit_mask.sum()
    assert (out.unit_group_lengths > 0).all()
    # Same (seed, epoch, document) -> same layout.
    again = interleaver(doc, np.random.default_rng([seed, 1]))
    np.testing.assert_array_equal(again.tokens, out.tokens)


def test_epochs_give_different_layouts():
    doc = random_aligned_document(np.random.default_rng(5), 150, 0.3)
    interleaver = Interleaver(V, SPACE_ID)
    layouts = {tuple(interleaver(doc, np.random.default_rng([0, epoch, 7])).tokens.tolist())
               for epoch in range(6)}
    assert len(layouts) == 6


def test_from_tokens_groups_without_silence_flags_are_words():
    units = [VOCAB.unit_offset + u for u in range(3)]
    tokens = [VOCAB.bos_id, VOCAB.speech_marker, *units, VOCAB.eos_id]
    doc = InterleavedDocument.from_tokens(tokens, VOCAB, [1, 2])
    assert doc.unit_group_is_silence.tolist() == [False, False]
    with pytest.raises(ValueError, match="2 unit groups but 1 silence flags"):
        InterleavedDocument.from_tokens(tokens, VOCAB, [1, 2], [True])
