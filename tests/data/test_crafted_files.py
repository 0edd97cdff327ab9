"""Crafted input files at readers the fuzz test (test_input_fuzz.py) does not drive: each is
refused with the reader's own error naming the file, never a raw traceback of another type, nor
read as data it does not hold."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from document_cases import SPACE_ID, aligned_store
from input_cases import fifo_with_writer
from tool_modules import load_tool

from megatron_lst.audio import hubert
from megatron_lst.audio.units_record import UNITS_RECORD, check_units_fit, read_units_record
from megatron_lst.data.dataset import LSTDataset
from megatron_lst.data.document_parsing import parse_reference_line, parse_text_line
from megatron_lst.data.documents import DocumentError
from megatron_lst.evaluation.importers import import_main, read_hellaswag, read_storycloze
from megatron_lst.evaluation.items import ItemError
from megatron_lst.patching.curriculum import Patcher, PatchingConfig
from megatron_lst.training.metrics import METRICS_FILENAME, MetricsFile, read_metrics

CLOZE = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
         "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
         "s1,a.,b.,c.,d.,e.,f.,2\n")


def test_a_storycloze_path_that_is_a_fifo_is_refused_before_it_is_read(tmp_path, capsys):
    """Opened as text, a FIFO blocked the importer until a writer came, then its bytes were
    imported; every other reader of a whole file refuses one (the input-files rule)."""
    output = tmp_path / "items.jsonl"
    with fifo_with_writer(tmp_path / "cloze.csv", CLOZE.encode()) as fifo:
        assert import_main(["storycloze", str(fifo), "--output", str(output)]) == 2
    assert f"{fifo}: is a FIFO (named pipe), not a file" in capsys.readouterr().err
    assert not output.exists()


def test_a_storycloze_path_that_is_a_directory_says_what_to_pass(tmp_path, capsys):
    """It was "[Errno 21] Is a directory: '...'", saying neither what was expected nor what to
    do."""
    assert import_main(["storycloze", str(tmp_path), "--output",
                        str(tmp_path / "items.jsonl")]) == 2
    assert capsys.readouterr().err == (
        f"lst-import-eval: {tmp_path}: is a directory, not a file; pass the StoryCloze file as "
        f"a regular file\n")


def test_a_storycloze_file_not_utf8_is_named_with_its_line(tmp_path):
    """A UnicodeDecodeError giving a character position, caught only by the command line."""
    cloze = tmp_path / "cloze.csv"
    cloze.write_bytes(CLOZE.replace("e.,", "caf\xe9.,").encode("latin-1"))
    with pytest.raises(ItemError, match=rf"^{cloze} is not UTF-8 text \(byte 0xe9 on line 2\); "
                                        r"save it as UTF-8$"):
        read_storycloze(cloze)


# Lines of metrics.jsonl that are no metrics record: an iteration of Infinity or 1e400 was an
# OverflowError and a line nested too deeply a RecursionError, stopping the resumed run on the
# logging rank alone; one of "7", 2.5 or true was read as iteration 7, 2 or 1.
NO_RECORDS = ['{"iteration": Infinity}', '{"iteration": 1e400}', "[" * 100_000,
              '{"iteration": "7"}', '{"iteration": 2.5}', '{"iteration": true}',
              '{"iteration": -3}']


@pytest.mark.parametrize("line", NO_RECORDS, ids=range(len(NO_RECORDS)))
def test_a_metrics_line_that_is_no_record_is_named(tmp_path, line):
    path = tmp_path / METRICS_FILENAME
    path.write_text(f'{{"iteration": 1, "loss": 2.0}}\n{line}\n{{"iteration": 2}}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not a metrics record"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("line", NO_RECORDS, ids=range(len(NO_RECORDS)))
def test_resuming_sets_a_metrics_line_that_is_no_record_aside(tmp_path, line):
    path = tmp_path / METRICS_FILENAME
    original = f'{{"iteration": 1, "loss": 2.0}}\n{line}\n{{"iteration": 2}}\n'
    path.write_text(original)
    MetricsFile(path, start_iteration=2).close()
    assert [json.loads(kept) for kept in path.read_text().splitlines()] == [
        {"iteration": 1, "loss": 2.0}, {"iteration": 2}]
    assert (tmp_path / f"{METRICS_FILENAME}.damaged").read_text() == original


def test_a_row_index_cache_of_a_garbled_header_is_rebuilt(tmp_path, caplog):
    """numpy parses a .npy header as Python: a garbled one raised tokenize.TokenError, out of
    the dataset's build, where any other damage has the index built again."""
    store = aligned_store(6, 8)
    store.prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.json").write_text("{}")
    cache = tmp_path / "cache"

    def build() -> LSTDataset:
        return LSTDataset(store, 40, 24, 64, Patcher(PatchingConfig(mode="static", patch_size=4)),
                          11, space_id=SPACE_ID, index_cache_dir=cache)

    built = build()
    (cached,) = cache.glob("lst_rows_*.npy")
    intact = bytearray(cached.read_bytes())
    intact[10] ^= 0xFF  # the header's opening "{"
    cached.write_bytes(bytes(intact))
    rebuilt = build()
    assert f"{cached}: damaged row index" in caplog.text
    np.testing.assert_array_equal(rebuilt._heads, built._heads)
    np.testing.assert_array_equal(np.load(cached), built._heads)


@pytest.mark.parametrize("field, value, problem", [
    # passed over: no check of the codebook's size against --num-units
    ("num_units", "1000", "num_units '1000' is not a number of units"),
    ("num_units", 1000.0, "num_units 1000.0 is not a number of units"),
    ("num_units", True, "num_units True is not a number of units"),
    ("num_units", -3, "num_units -3 is not a number of units"),
    # advised "pass --frame-rate nan", a flag value no run takes
    ("frame_rate", float("nan"), "frame_rate nan is not a number of frames per second"),
    ("frame_rate", float("inf"), "frame_rate inf is not a number of frames per second"),
    ("frame_rate", "25", "frame_rate '25' is not a number of frames per second"),
    ("frame_rate", 0, "frame_rate 0 is not a number of frames per second"),
])
def test_a_units_record_field_of_another_type_is_refused_as_damaged(tmp_path, field, value,
                                                                    problem):
    record = {"model_dir": "/models/hubert", "layer": 6, "num_units": 500, "frame_rate": 25,
              "codebook_sha256": "0" * 64, field: value}
    (tmp_path / UNITS_RECORD).write_text(json.dumps(record))
    np.save(tmp_path / "a.npy", np.arange(3, dtype=np.int32))
    with pytest.raises(ValueError) as refused:
        check_units_fit(tmp_path, 502, 25)
    assert str(refused.value) == (
        f"{tmp_path / UNITS_RECORD} is damaged ({problem}), so the settings of the units beside "
        f"it are unknown; write to a new --units-dir, or delete the old units and "
        f"{UNITS_RECORD}")


def test_a_units_record_as_extracted_fits(tmp_path):
    (tmp_path / UNITS_RECORD).write_text(json.dumps({"num_units": 500, "frame_rate": 25.0}))
    check_units_fit(tmp_path, 502, 25)


# A JSON integer literal of more digits than Python converts (sys.get_int_max_str_digits) makes
# json.loads raise a plain ValueError, not the JSONDecodeError these readers caught.
HUGE_INTEGER = "1" * (sys.get_int_max_str_digits() + 1)


@pytest.mark.parametrize("parse, line", [
    (lambda line: parse_text_line(line, None, "text", "corpus.jsonl:7"),
     f'{{"text": "hello", "n": {HUGE_INTEGER}}}\n'),
    (lambda line: parse_reference_line(line, None, 20, "corpus.jsonl:7"),
     f'{{"interleaved": "", "file_id": {HUGE_INTEGER}}}\n'),
])
def test_a_corpus_line_with_an_integer_past_the_digit_limit_is_named(parse, line):
    with pytest.raises(DocumentError, match=r"^corpus\.jsonl:7: not a document \(it holds an "
                                            r"integer of more than \d+ digits") as refused:
        parse(line)
    assert refused.value.kind == "not valid JSON"  # tallied so by --skip-bad


def test_a_units_record_with_an_integer_past_the_digit_limit_is_damaged(tmp_path):
    path = tmp_path / UNITS_RECORD
    path.write_text(f'{{"num_units": {HUGE_INTEGER}}}')
    with pytest.raises(ValueError, match=rf"^{path} is damaged, so the settings"):
        read_units_record(path)


def test_a_tokenizer_corpus_line_with_an_integer_past_the_digit_limit_is_named(tmp_path):
    """It stopped tools/train_tokenizer.py with a ValueError traceback naming no file."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(f'{{"text": "hello world", "n": {HUGE_INTEGER}}}\n')
    with pytest.raises(SystemExit, match=rf"^{corpus}:1: not a text-jsonl line \(ValueError"):
        load_tool("train_tokenizer").main([
            "--input", str(corpus), "--input-format", "text-jsonl", "--vocab-size", "100",
            "--output", str(tmp_path / "spm.model")])
    assert not (tmp_path / "spm.model").exists()


def test_a_hubert_config_with_an_integer_past_the_digit_limit_is_left_to_transformers(tmp_path):
    """A config.json that holds no readable JSON object is transformers' to name; this one was
    a ValueError naming no file."""
    (tmp_path / "config.json").write_text(f'{{"model_type": "hubert", "x": {HUGE_INTEGER}}}')
    assert hubert._read_json_object(tmp_path / "config.json") is None


@pytest.mark.parametrize("label", [HUGE_INTEGER, "1²"])
def test_a_hellaswag_label_of_digits_int_refuses_is_no_ending_index(tmp_path, label):
    """str.isdigit took them for an index, then int() raised a ValueError traceback."""
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text(json.dumps({"ind": 1, "ctx": "a man", "endings": ["x", "y"],
                                     "label": label}) + "\n")
    with pytest.raises(ItemError, match=rf"^{hellaswag}:1: \"label\" '1.* is not an ending "
                                        r"index$"):
        read_hellaswag(hellaswag)


def test_an_alignment_count_past_the_digit_limit_is_named(tmp_path, capsys):
    """int() of it raised a ValueError traceback."""
    cloze = tmp_path / "cloze.csv"
    cloze.write_text(CLOZE)
    item = tmp_path / "units" / "s1"
    item.mkdir(parents=True)
    for part in ("context", "ending0", "ending1"):
        (item / f"{part}.units").write_text("1 2 3\n")
    (item / "context.align").write_text(f"a {HUGE_INTEGER}\n")
    assert import_main(["storycloze", str(cloze), "--units-dir", str(tmp_path / "units"),
                        "--output", str(tmp_path / "items.jsonl")]) == 2
    assert capsys.readouterr().err == (f"lst-import-eval: item 's1': {item / 'context.align'}:1 "
                                       f"must be \"word n_units\"\n")
