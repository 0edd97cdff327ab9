"""Parity with the reference implementation on its own sample (fixtures/reference_lst).

- Static p=4 and aligned patching of the reference's token rows give its patch lengths, row
  contract (padding joined to the last patch) included. Aligned patching needs each speech run's
  per-word frame counts: they are rebuilt from the source lines of `mls.chunk.00.on_the_fly` by
  locating each run's units in the line's frames and cutting at the word and `[SIL]` boundaries.
- Interleaving: for the whole documents of `inputs_ragged.json`, laying the document out with the
  reference's block layout (read back from its tokens) gives its exact tokens, except that the
  reference lost the first block (its bug), which we keep.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.data.dataset import pad_row
from megatron_lst.data.interleave import BlockLayout, InterleavedDocument, Interleaver
from megatron_lst.patching.patchers import aligned_patch_lengths, static_patch_lengths
from megatron_lst.tokenizer.vocab import JointVocab

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"
VOCAB = JointVocab(512)  # the fixtures' 512-piece SentencePiece model


def fixture(name):
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES / name


def load_inputs(name):
    return json.loads(fixture(f"inputs_{name}.json").read_text())


def source_lines():
    return fixture("mls.chunk.00.on_the_fly").read_text().splitlines()


def reference_rows(inputs):
    """Each row as the reference cut it: x's real tokens plus the last target, [L + 1]."""
    x, y, mask = (np.array(inputs[k]) for k in ("tokens", "targets", "mask"))
    for b in range(len(x)):
        n = int(mask[b].sum())
        yield b, np.concatenate([x[b, :n], y[b, n - 1:n]])


def reference_words(line):
    """(word or "[SIL]", frames) pairs of one reference line, in order."""
    pairs = []
    for part in json.loads(line)["interleaved"].split("<LST MODE SEP>")[1:]:
        head, _, payload = part.partition(" ")
        if head == "TEXT":
            pairs.append([payload.strip(), np.zeros(0, dtype=np.int64)])
        else:
            pairs[-1][1] = np.array(payload.split(), dtype=np.int64)
    return pairs


def groups_from_source(row, line):
    """Per-word unit groups of every speech run of `row`, cut from the source line's frames."""
    pairs = reference_words(line)
    frames = np.concatenate([f for _, f in pairs])
    bounds = np.cumsum([0] + [len(f) for _, f in pairs])
    is_silence = np.array([w == "[SIL]" for w, _ in pairs])
    unit_positions = np.flatnonzero(VOCAB.is_unit(row))
    runs = np.split(unit_positions, np.flatnonzero(np.diff(unit_positions) != 1) + 1)
    lengths, silences, search_from = [], [], 0
    for run in runs:
        units = VOCAB.ids_to_units(row[run])
        start = next(s for s in range(search_from, len(frames) - len(units) + 1)
                     if np.array_equal(frames[s:s + len(units)], units))
        end = search_from = start + len(units)
        pieces = np.diff(np.clip(bounds, start, end))
        lengths += pieces[pieces > 0].tolist()
        silences += is_silence[pieces > 0].tolist()
    return np.array(lengths), np.array(silences)


@pytest.mark.parametrize("name", ["static", "ragged"])
def test_static_patching_matches_reference(name):
    inputs = load_inputs(name)
    assert inputs["patching"] == "lst_static"
    expected = np.array(inputs["patch_lengths"])
    num_tokens, num_patches = np.array(inputs["tokens"]).shape[1], expected.shape[1]
    for b, row in reference_rows(inputs):
        doc = InterleavedDocument.from_tokens(row, VOCAB)
        sample = pad_row(row, doc.modality, static_patch_lengths(doc, 4), num_tokens, num_patches)
        np.testing.assert_array_equal(sample["patch_lengths"].numpy(), expected[b], f"row {b}")
        np.testing.assert_array_equal(sample["tokens"].numpy(), inputs["tokens"][b])
        np.testing.assert_array_equal(sample["labels"].numpy()[:len(row) - 1],
                                      np.array(inputs["targets"][b])[:len(row) - 1])
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), inputs["mask"][b])


def test_aligned_patching_matches_reference():
    inputs = load_inputs("aligned")
    assert inputs["patching"] == "lst_align"
    lines = source_lines()
    expected = np.array(inputs["patch_lengths"])
    num_tokens, num_patches = np.array(inputs["tokens"]).shape[1], expected.shape[1]
    for b, row in reference_rows(inputs):
        lengths, silences = groups_from_source(row, lines[inputs["lines"][b]])
        doc = InterleavedDocument.from_tokens(row, VOCAB, lengths, silences)
        sample = pad_row(row, doc.modality, aligned_patch_lengths(doc, "separate"), num_tokens,
                         num_patches)
        np.testing.assert_array_equal(sample["patch_lengths"].numpy(), expected[b], f"row {b}")


def runs_of(row):
    """[(is_speech, tokens after the marker)] of a BOS ... EOS row."""
    body = row[1:-1]
    markers = np.flatnonzero((body == VOCAB.text_marker) | (body == VOCAB.speech_marker))
    ends = np.append(markers[1:], len(body))
    return [(body[m] == VOCAB.speech_marker, body[m + 1:e]) for m, e in zip(markers, ends, strict=True)]


def reference_layout(doc, row, space_id):
    """The reference's block layout of `doc`, read back from its tokens (first block lost)."""
    word_segments = np.flatnonzero(~doc.is_silence)
    text_off = doc.text_offsets()
    word_text_start = text_off[word_segments]  # [W]
    runs = runs_of(row)
    blocks = []  # (is_speech, first word, end word or None)
    for k, (speech, ids) in enumerate(runs):
        if speech:
            first_unit = int(np.flatnonzero([
                np.array_equal(doc.unit_ids[s:s + len(ids)], VOCAB.ids_to_units(ids))
                for s in range(len(doc.unit_ids) - len(ids) + 1)])[0])
            segment = int(np.searchsorted(doc.unit_offsets(), first_unit, side="right")) - 1
            # The run opens in its first word, or in the half silence just before it.
            blocks.append((True, int(np.searchsorted(word_segments, segment)), None))
            continue
        pieces = ids[:-1] if k < len(runs) - 1 else ids
        assert k == len(runs) - 1 or ids[-1] == space_id
        first = next(w for w in range(len(word_segments)) if np.array_equal(
            doc.text_ids[word_text_start[w]:word_text_start[w] + len(pieces)], pieces))
        end = int(np.searchsorted(word_text_start, word_text_start[first] + len(pieces)))
        blocks.append((False, first, end))
    starts = [first for _, first, _ in blocks] + [len(word_segments)]
    num_words = [starts[0]] + [b - a for a, b in itertools.pairwise(starts)]
    is_speech = [not blocks[0][0]] + [speech for speech, _, _ in blocks]
    for (speech, first, end), n in zip(blocks, num_words[1:], strict=True):
        assert speech or end - first == n
    return BlockLayout(np.array(is_speech), np.array(num_words))


def test_interleaving_matches_reference_tokens():
    document_parsing = pytest.importorskip("megatron_lst.data.document_parsing")
    text_tokenizer = pytest.importorskip("megatron_lst.tokenizer.text_tokenizer")
    tokenizer = text_tokenizer.load_text_tokenizer(fixture("spm.model"))
    interleaver = Interleaver(VOCAB, tokenizer.space_id)
    inputs = load_inputs("ragged")
    lines = source_lines()
    for b, row in reference_rows(inputs):
        assert row[-1] == VOCAB.eos_id  # whole documents
        doc, _ = document_parsing.parse_reference_line(lines[inputs["lines"][b]], tokenizer, 502,
                                                       f"row {b}")
        layout = reference_layout(doc, row, tokenizer.space_id)
        ours = interleaver.layout(doc, layout).tokens
        markers = np.flatnonzero((ours == VOCAB.text_marker) | (ours == VOCAB.speech_marker))
        # Ours keeps the first block (tokens 1 .. second marker); the rest is the reference's.
        np.testing.assert_array_equal(np.concatenate([ours[:1], ours[markers[1]:]]), row)
        assert markers[1] > 2  # the kept first block is not empty
