"""Collapsing repeated units inside each word keeps the alignment exact."""

import numpy as np
import pytest

from megatron_lst.demo_corpus.alignment import AlignmentError, deduplicate_runs


def test_runs_collapse_within_segments_only():
    units = np.array([5, 5, 5, 7, 7, 7, 7, 2, 2, 9])
    segments = [("[SIL]", 2), ("cat", 5), ("sat", 3)]  # 5 5 | 5 7 7 7 7 | 2 2 9
    kept, counts = deduplicate_runs(units, segments)
    # The run of 5s crosses the silence/word boundary: one 5 stays on each side.
    np.testing.assert_array_equal(kept, [5, 5, 7, 2, 9])
    assert counts == [("[SIL]", 1), ("cat", 2), ("sat", 2)]
    assert sum(n for _, n in counts) == len(kept)


def test_a_segment_of_one_repeated_unit_keeps_one():
    kept, counts = deduplicate_runs(np.array([3, 3, 3, 3]), [("a", 1), ("b", 3)])
    np.testing.assert_array_equal(kept, [3, 3])
    assert counts == [("a", 1), ("b", 1)]


def test_segments_that_do_not_cover_the_units_are_refused():
    with pytest.raises(AlignmentError, match="segments hold 3 units but the utterance has 4"):
        deduplicate_runs(np.array([1, 2, 3, 4]), [("a", 3)])


@pytest.mark.slow
def test_deduplicated_corpus_reads_back_the_same_through_both_input_forms(tmp_path):
    pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed")
    from megatron_lst.data.document_parsing import parse_reference_line
    from megatron_lst.data.textgrid_corpus import read_textgrid_corpus
    from megatron_lst.demo_corpus.build import DemoCorpusConfig, build_demo_corpus
    from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer

    config = DemoCorpusConfig(speech_documents=6, text_documents=12, eval_items=4, num_units=16,
                              tokenizer_vocab_size=300, workers=1, deduplicate_units=True)
    corpus = build_demo_corpus(tmp_path, config=config, progress=False)
    tokenizer = load_text_tokenizer(corpus.paths["tokenizer"])
    lines = corpus.paths["speech_train"].read_text().splitlines()
    from_jsonl = [parse_reference_line(line, tokenizer, 16, "x")[0] for line in lines]
    from_textgrid = [s.document for s in read_textgrid_corpus(
        corpus.paths["textgrid_train"], corpus.paths["units_train"], tokenizer, num_units=16)]
    for a, b in zip(from_jsonl, from_textgrid, strict=True):
        np.testing.assert_array_equal(a.unit_ids, b.unit_ids)
        np.testing.assert_array_equal(a.seg_unit_len, b.seg_unit_len)  # exact: 1 unit = 1/25 s
        repeats = np.flatnonzero(a.unit_ids[1:] == a.unit_ids[:-1]) + 1
        word_starts = np.cumsum(np.concatenate([[0], a.seg_unit_len[:-1]]))
        assert set(repeats) <= set(word_starts)  # a unit repeats only across a boundary
    train = corpus.summary["speech"]["train"]
    assert train["units"] < 0.98 * 25 * train["seconds"]  # fewer than the raw 25 Hz frames
