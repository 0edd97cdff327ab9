"""The whole build on a tiny corpus: every output readable by the project's own readers."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed "
                    "(pip install 'megatron-lst[data]')")

from tool_modules import load_tool  # noqa: E402

from megatron_lst.data.document_parsing import parse_reference_line  # noqa: E402
from megatron_lst.data.textgrid_corpus import read_textgrid_corpus  # noqa: E402
from megatron_lst.demo_corpus import build as build_module  # noqa: E402
from megatron_lst.demo_corpus.alignment import SILENCE  # noqa: E402
from megatron_lst.demo_corpus.build import DemoCorpusConfig, build_demo_corpus  # noqa: E402
from megatron_lst.demo_corpus.stories import normalize_words  # noqa: E402
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer  # noqa: E402

TINY = DemoCorpusConfig(speech_documents=6, text_documents=12, eval_items=4, num_units=16,
                        tokenizer_vocab_size=300, workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), config=TINY, progress=False)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_speech_documents_read_back_through_both_input_forms(corpus):
    tokenizer = load_text_tokenizer(corpus.paths["tokenizer"])
    lines = corpus.paths["speech_train"].read_text().splitlines()
    assert len(lines) == corpus.summary["speech"]["train"]["documents"] == 5
    from_jsonl = [parse_reference_line(line, tokenizer, TINY.num_units, "x")[0] for line in lines]
    from_textgrid = [s.document for s in read_textgrid_corpus(
        corpus.paths["textgrid_train"], corpus.paths["units_train"], tokenizer,
        num_units=TINY.num_units)]
    ids = sorted(json.loads(line)["file_id"] for line in lines)
    assert [json.loads(line)["file_id"] for line in lines] == ids  # same order as the TextGrids
    for a, b in zip(from_jsonl, from_textgrid, strict=True):
        np.testing.assert_array_equal(a.unit_ids, b.unit_ids)
        np.testing.assert_array_equal(a.text_ids, b.text_ids)  # the same words in order
        # Both forms cut the units at the same word boundaries up to one frame of rounding.
        words_a = np.cumsum(a.seg_unit_len)[a.seg_text_len > 0]
        words_b = np.cumsum(b.seg_unit_len)[b.seg_text_len > 0]
        assert np.abs(words_a - words_b).max() <= 1


def test_units_and_silences_look_like_speech(corpus):
    record = _lines(corpus.paths["speech_train"])[0]
    units = [int(u) for part in record["interleaved"].split("<LST MODE SEP>HUBERT")[1:]
             for u in part.split("<LST MODE SEP>")[0].split()]
    assert len(set(units)) > TINY.num_units // 2  # the codebook is used, not one cluster
    summary = corpus.summary
    assert 5 < summary["units_per_word"] < 11  # eSpeak speaks ~3.7 words/s, 25 units/s
    assert 1.0 < summary["patches_per_word_aligned"] < 1.5
    assert summary["patches_per_word_static4"] == pytest.approx(
        summary["speech"]["train"]["static_patches"] / summary["speech"]["train"]["words"])


@pytest.mark.parametrize("name,num_endings", [("storycloze", 2), ("topic", 2), ("hellaswag", 4)])
def test_eval_items(corpus, name, num_endings):
    items = _lines(corpus.paths[f"eval_{name}"])
    assert len(items) == TINY.eval_items
    train_text = {json.loads(line)["text"]
                  for line in corpus.paths["text_train"].read_text().splitlines()}
    for item in items:
        assert set(item) == {"id", "voice", "context", "endings", "label"}
        assert len(item["endings"]) == num_endings and 0 <= item["label"] < num_endings
        for spoken in [item["context"]] + item["endings"]:
            assert sum(n for _, n in spoken["segments"]) == len(spoken["units"])
            assert [w for w, _ in spoken["segments"] if w != SILENCE] == spoken["text"].split()
            assert all(0 <= u < TINY.num_units for u in spoken["units"])
            assert spoken["text"].split() == normalize_words(spoken["text"])
        assert not any(item["context"]["text"] in text for text in train_text)


def test_rerun_is_cached_and_a_new_codebook_reuses_the_speech(corpus, monkeypatch):
    def no_synthesis(*args, **kwargs):
        raise AssertionError("speech was synthesised again")

    monkeypatch.setattr(build_module, "synthesize_utterances", no_synthesis)
    again = build_demo_corpus(corpus.out_dir, config=replace(TINY, workers=2), progress=False)
    assert again.summary == corpus.summary
    fewer_units = build_demo_corpus(corpus.out_dir, config=replace(TINY, num_units=12),
                                    progress=False)
    assert fewer_units.summary["config"]["num_units"] == 12
    assert np.load(fewer_units.paths["codebook"]).shape == (12, 78)


@pytest.mark.parametrize("summary", ['{"key": "0123', "[]", b"\xff\xfe"],
                         ids=["cut-short", "no-object", "not-utf8"])
def test_an_unreadable_summary_is_built_again(tmp_path, monkeypatch, summary):
    """A summary.json cut short (a build killed as it wrote it) or edited by hand stopped every
    later build with a JSON traceback (or an AttributeError); the outputs are built again."""
    path = tmp_path / "summary.json"
    path.write_bytes(summary.encode() if isinstance(summary, str) else summary)

    class BuiltAgain(Exception):
        pass

    def text_stage(config):
        raise BuiltAgain

    monkeypatch.setattr(build_module, "_text_stage", text_stage)
    with pytest.raises(BuiltAgain):
        build_demo_corpus(tmp_path, config=TINY, progress=False)


@pytest.mark.parametrize("theirs", ["units/utt1.npy", "text/corpus.jsonl", "codebook.npy"])
def test_outputs_no_build_wrote_are_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                             theirs):
    """`--out-dir` named a folder holding a user's `units/` or `text/`: the build replaced the
    output folders whole (rmtree), losing them."""
    (tmp_path / theirs).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / theirs).write_text("not the demo's")
    monkeypatch.setattr(build_module, "_text_stage",
                        lambda config: pytest.fail("the build started"))
    tool = load_tool("build_demo_corpus")
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--out-dir", str(tmp_path), "--no-progress"])
    assert str(stopped.value.code) == (
        f"error: --out-dir: {tmp_path} holds {theirs.split('/')[0]}, which no demo corpus build "
        f"wrote; the build would replace them: give a new or empty output directory")
    assert (tmp_path / theirs).read_text() == "not the demo's"


def test_an_earlier_builds_outputs_are_replaced(corpus, tmp_path):
    """A build stopped while writing its outputs (no summary yet) is finished by the next one."""
    shutil.copytree(corpus.out_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "summary.json").unlink()
    again = build_demo_corpus(tmp_path, config=TINY, progress=False)  # from the caches
    assert again.summary["key"] == corpus.summary["key"]


@pytest.mark.parametrize("damage", ["features.npy", "utterances.json", "codebook.npy"])
def test_a_damaged_cache_is_built_again(corpus, tmp_path, caplog, damage):
    """A cache whose file was cut short (a full disk, before np.save's writes were checked) or
    deleted stopped every later build with a traceback."""
    shutil.copytree(corpus.out_dir / "cache", tmp_path / "cache")
    before = build_demo_corpus(tmp_path, config=TINY, progress=False)  # from the caches
    codebook = Path(before.paths["codebook"]).read_bytes()
    (damaged,) = [path for path in (tmp_path / "cache").glob(f"*/{damage}")
                  if damage != "codebook.npy" or path.read_bytes() == codebook]
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / "summary.json").unlink()
    again = build_demo_corpus(tmp_path, config=TINY, progress=False)
    assert f"{damaged.parent}: damaged cache" in caplog.text
    assert ({k: v for k, v in again.summary.items() if k != "seconds"}
            == {k: v for k, v in before.summary.items() if k != "seconds"})
    assert Path(again.paths["codebook"]).read_bytes() == codebook


def test_user_text_files_replace_the_stories_but_not_the_held_out_sets(tmp_path):
    path = tmp_path / "book.txt"
    paragraphs = [" ".join(f"word{p}x{i}" for i in range(30)) for p in range(20)]
    path.write_text("\n\n".join(paragraphs) + "\n\n" + " ".join(["long"] * 250))
    documents, eval_stories = build_module._text_stage(replace(TINY, text_files=(str(path),)))
    texts = [d.text for split in documents.values() for d in split]
    assert sorted(texts) == sorted(paragraphs + [" ".join(["long"] * 120)] * 2
                                   + [" ".join(["long"] * 10)])
    # 6 of 18 configured documents are speech: a third of the 23 paragraphs, at most 6.
    assert len(documents["speech_train"]) + len(documents["speech_valid"]) == 6
    assert len(eval_stories) == 3 * TINY.eval_items
    empty = tmp_path / "empty.txt"
    empty.write_text("\n -- \n")
    with pytest.raises(ValueError, match="hold no words"):
        build_module._text_stage(replace(TINY, text_files=(str(empty),)))
    short = tmp_path / "short.txt"
    short.write_text("one paragraph\n\nanother\n\na third")
    with pytest.raises(ValueError, match="hold 3 paragraphs; the build needs at least 4"):
        build_module._text_stage(replace(TINY, text_files=(str(short),)))


def test_user_text_files_are_read_by_the_input_files_rule(tmp_path, monkeypatch):
    """Each file was read whole, whatever it was: a FIFO blocked, and a file of any size was
    held in memory. Line ends read as before (universal newlines)."""
    paragraphs = [" ".join(f"word{p}x{i}" for i in range(5)) for p in range(6)]
    for newline in ("\n", "\r\n", "\r"):
        path = tmp_path / "book.txt"
        path.write_bytes((2 * newline).join(paragraphs).encode())
        assert build_module._paragraphs([str(path)]) == paragraphs
    monkeypatch.setattr(build_module, "MAX_LARGE_TEXT_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError, match=rf"^{path}: is {path.stat().st_size:,} bytes, more "
                                         r"than any --text-files file"):
        build_module._paragraphs([str(path)])
    with pytest.raises(ValueError, match=rf"^{tmp_path}: is a directory, not a file"):
        build_module._paragraphs([str(tmp_path)])


def test_summary_table_names_every_figure(corpus):
    table = build_module.format_summary(corpus.summary)
    for label in ("audio (hours)", "units per word", "static p=4", "aligned",
                  "storycloze: items / endings-only 3-gram acc (chance)", "time: speech (s)"):
        assert label in table


@pytest.mark.parametrize("flags, message", [
    (["--scale", "-1"], "scale must be a positive number, got -1.0"),
    # found only when the document counts were rounded, after nothing was checked
    (["--scale", "nan"], "scale must be a positive number, got nan"),
    (["--scale", "inf"], "scale must be a positive number, got inf"),
    (["--eval-items", "0"], "eval_items must be at least 1, got 0"),
    # found only inside k-means, after the synthesis
    (["--num-units", "-3"], "num_units must be at least 1, got -3"),
    (["--tokenizer-vocab-size", "0"], "tokenizer_vocab_size must be at least 1, got 0"),
])
def test_tool_refuses_a_bad_config_as_a_usage_error(tmp_path, capsys, flags, message):
    tool = load_tool("build_demo_corpus")
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--out-dir", str(tmp_path / "corpus"), *flags])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()
