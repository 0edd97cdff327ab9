"""Loading and validating story-completion items: every bad item names its id and file:line."""

import json
from pathlib import Path

import numpy as np
import pytest
from eval_cases import NUM_UNITS, random_records, tokenizer, vocab

from megatron_lst.evaluation.eval_cli import eval_main
from megatron_lst.evaluation.items import ItemError, check_items_for_speech, load_items


def write(tmp_path, records, blank_first=False):
    path = tmp_path / "items.jsonl"
    lines = [""] if blank_first else []
    lines += [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_and_encodes_items(tmp_path):
    records = random_records(0, 3, num_endings=4)
    items = load_items(write(tmp_path, records), tokenizer(), vocab())
    assert [i.id for i in items] == [r["id"] for r in records]
    first, record = items[0], records[0]
    assert first.label == record["label"] and len(first.endings) == 4
    assert first.source.endswith("items.jsonl:1")
    assert first.context.text_ids.tolist() == tokenizer().encode(record["context"]["text"])
    assert first.space_id == tokenizer().space_id
    assert first.endings[1].text_ids.tolist() == tokenizer().encode(record["endings"][1]["text"])
    np.testing.assert_array_equal(first.endings[0].units, record["endings"][0]["units"])
    segments = record["context"]["segments"]
    assert first.context.segment_units.tolist() == [n for _, n in segments]
    assert first.context.segment_is_silence.tolist() == [w == "[SIL]" for w, _ in segments]


def test_whitespace_around_a_text_is_not_a_piece(tmp_path):
    """" the dog" encoded to a lone word-boundary piece, then "▁the": an ending's score counted
    an extra token, and T->S put a second boundary piece before <s>, a layout training never
    shows. The importers strip the benchmarks' texts; a hand-written file now reads the same."""
    record = random_records(3, 1)[0]
    spaced = json.loads(json.dumps(record))
    spaced["id"] = "spaced"
    spaced["context"]["text"] = " " + record["context"]["text"] + " \n"
    for ending in spaced["endings"]:
        ending["text"] = "\t" + ending["text"] + " "
    assert tokenizer().encode(spaced["endings"][0]["text"]) != tokenizer().encode(
        record["endings"][0]["text"])
    plain, padded = load_items(write(tmp_path, [record, spaced]), tokenizer(), vocab())
    for a, b in zip((plain.context, *plain.endings), (padded.context, *padded.endings),
                    strict=True):
        assert a.text_ids.tolist() == b.text_ids.tolist()


def test_text_only_items_load(tmp_path):
    record = {"id": 7, "context": {"text": "the girl ran"},
              "endings": [{"text": "home"}, {"text": "the cat"}], "label": 0}
    (item,) = load_items(write(tmp_path, [record]), tokenizer(), vocab())
    assert item.id == "7" and not item.context.has_speech and not item.endings[0].has_speech
    # The advice runs as written in a shell: `--modes T->T` unquoted redirected to a file "T".
    with pytest.raises(ItemError, match=r"cannot be scored S->S; evaluate text-only sets with "
                                        r"--modes tt \(T->T; the arrow needs quotes"):
        check_items_for_speech([item], "S->S")


def broken(change):
    record = random_records(1, 1)[0]
    change(record)
    return record


BAD_ITEMS = {
    "missing endings": (lambda r: r.pop("endings"), 'missing "endings"'),
    "one ending": (lambda r: r["endings"].pop(), "at least 2 endings, got 1"),
    "label out of range": (lambda r: r.update(label=2), "label 2 is not an ending index 0..1"),
    "negative label": (lambda r: r.update(label=-1), "label -1"),
    "unit out of range": (lambda r: r["endings"][1]["units"].__setitem__(3, NUM_UNITS),
                          f"ending 1: unit {NUM_UNITS} at position 3 is outside the codebook"),
    "negative unit": (lambda r: r["context"]["units"].__setitem__(0, -1), "context: unit -1"),
    "unit beyond int64": (lambda r: r["context"]["units"].__setitem__(2, 10**30),
                          f"context: unit {10**30} at position 2 is outside the codebook"),
    "segments do not cover units": (lambda r: r["context"]["units"].pop(),
                                    "context: segments cover"),
    "boolean segment count": (  # true counted as 1 unit
        lambda r: r["context"].update(units=[1, 2], segments=[["the", True], ["[SIL]", 1]]),
        'context: "segments" must be a list of [word, number of units >= 0]'),
    # numpy raised OverflowError on a count beyond int64, and int64 sums wrapped around: four
    # counts of 2**62 and one of 2 "covered" 2 units.
    "segment count beyond int64": (
        lambda r: r["context"].update(units=[1, 2], segments=[["the", 2**64], ["[SIL]", 2]]),
        f"context: segments cover {2**64 + 2} units but \"units\" has 2"),
    "segment counts summing past int64": (
        lambda r: r["context"].update(units=[1, 2], segments=[["w", 2**62]] * 4 + [["x", 2]]),
        f"context: segments cover {2**64 + 2} units but \"units\" has 2"),
    "empty text": (lambda r: r["endings"][0].update(text=" "), 'ending 0: "text" is missing'),
    # SentencePiece raised a RuntimeError naming neither the file nor the item.
    "lone surrogate in text": (lambda r: r["endings"][1].update(text="the \ud83d dog"),
                               "ending 1: \"text\" holds '\\ud83d' at character 4, half of a "
                               "UTF-16 surrogate pair"),
    "units on some parts only": (lambda r: r["endings"][0].pop("units") and
                                 r["endings"][0].pop("segments"), "some parts have \"units\""),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_item_names_item_and_line(tmp_path, case):
    change, message = BAD_ITEMS[case]
    records = random_records(2, 2) + [broken(change)]
    path = write(tmp_path, records, blank_first=True)
    with pytest.raises(ItemError) as error:
        load_items(path, tokenizer(), vocab())
    text = str(error.value)
    assert f"item 'item-1-0' ({path}:4)" in text, text
    assert message in text, text


def test_an_empty_id_is_refused_naming_the_line(tmp_path):
    records = random_records(1, 2) + [broken(lambda r: r.update(id=" "))]
    path = write(tmp_path, records)
    with pytest.raises(ItemError,
                       match=rf'{path}:{len(records)}: the item has no "id" \(a non-empty string'):
        load_items(path, tokenizer(), vocab())


def test_bad_json_and_duplicate_ids_name_the_line(tmp_path):
    path = write(tmp_path, random_records(3, 1) + ["{not json"])
    with pytest.raises(ItemError, match=rf"{path}:2: not a JSON object"):
        load_items(path, tokenizer(), vocab())
    path = write(tmp_path, random_records(3, 1) + ["[" * 100_000])  # RecursionError
    with pytest.raises(ItemError, match=rf"{path}:2: not an item \(JSON nested too deeply"):
        load_items(path, tokenizer(), vocab())
    # json.loads raised a ValueError naming no line on an integer past Python's digit limit.
    path = write(tmp_path, random_records(3, 1) + ['{"id": "x", "label": ' + "1" * 5000 + "}"])
    with pytest.raises(ItemError, match=rf"{path}:2: not an item \(it holds an integer of more "
                                        rf"than \d+ digits"):
        load_items(path, tokenizer(), vocab())
    # json.loads kept the last of a repeated key: the item was scored against label 1
    record = json.dumps(random_records(1, 1)[0])
    path = write(tmp_path, random_records(3, 1) + [record[:-1] + ', "label": 1}'])
    with pytest.raises(ItemError, match=rf"{path}:2: the key 'label' appears twice in one object "
                                        rf"\(JSON would keep the last one silently\); keep one"):
        load_items(path, tokenizer(), vocab())
    path = write(tmp_path, random_records(3, 1) * 2)
    with pytest.raises(ItemError, match=r"items.jsonl:2: the id .* is also the id of line 1"):
        load_items(path, tokenizer(), vocab())
    with pytest.raises(ItemError, match="holds no items"):
        load_items(write(tmp_path, []), tokenizer(), vocab())
    with pytest.raises(ItemError, match=rf"{tmp_path}: is a directory, not a file; pass the "
                                        rf"evaluation items file as a regular file"):
        load_items(tmp_path, tokenizer(), vocab())


def _lines(records) -> list[str]:
    return [json.dumps(record, ensure_ascii=False) for record in records]


# What each file holds (from three items' JSON lines) and what loading it says.
UNREADABLE_FILES = {
    # UnicodeDecodeError's "can't decode byte 0xff in position 0", naming no encoding or line.
    "utf-16": (lambda lines: "\n".join(lines).encode("utf-16"),
               "{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as "
               "UTF-8"),
    # "Expecting property name enclosed in double quotes", about a file JSON cannot be.
    "utf-16 without a byte-order mark": (
        lambda lines: "\n".join(lines).encode("utf-16-le"),
        "{path}:1: holds NUL characters, which JSON text never does: is the file UTF-16, or "
        "not text? Save it as UTF-8"),
    # The byte offset of a whole file, not its line.
    "latin-1 on line 3": (
        lambda lines: "\n".join([*lines[:2], lines[2].replace("the", "th\u00e9", 1)]).encode(
            "latin-1"),
        "{path}:3: byte 0xe9 is not UTF-8 (text in another encoding, or not text); save the "
        "file as UTF-8"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_FILES))
def test_a_file_that_is_not_utf8_names_its_encoding_or_line(tmp_path, case):
    write_file, message = UNREADABLE_FILES[case]
    path = tmp_path / "items.jsonl"
    path.write_bytes(write_file(_lines(random_records(6, 3))))
    with pytest.raises(ItemError) as error:
        load_items(path, tokenizer(), vocab())
    assert str(error.value) == message.format(path=path)


@pytest.mark.parametrize("join", [
    lambda lines: "\r\n".join(lines) + "\r\n",
    lambda lines: "\r".join(lines) + "\r",  # as text mode reads them, so must the bytes
    # Files saved with a BOM and joined with `cat`: "Unexpected UTF-8 BOM" on the second.
    lambda lines: "".join(f"\ufeff{line}\n" for line in lines),
], ids=["crlf", "cr", "a-bom-on-every-line"])
def test_crlf_cr_and_a_bom_on_every_line_read_as_an_editor_shows_them(tmp_path, join):
    records = random_records(7, 3)
    path = tmp_path / "items.jsonl"
    path.write_bytes(join(_lines(records)).encode("utf-8"))
    items = load_items(path, tokenizer(), vocab())
    assert [item.id for item in items] == [record["id"] for record in records]
    assert [item.source for item in items] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert items[2].context.text == records[2]["context"]["text"]


def test_a_stray_cr_inside_a_line_neither_splits_it_nor_shifts_the_line_numbers(tmp_path):
    """Read as a line end, a CR between the tokens of a JSON line (JSON whitespace) split it into
    two halves, both refused, and every later line was named one past what `sed -n` shows."""
    records = random_records(3, 3)
    lines = _lines(records)
    lines[1] = lines[1].replace(", ", ",\r ", 1)
    path = tmp_path / "items.jsonl"
    path.write_bytes(("\n".join(lines) + "\n{\n").encode("utf-8"))
    with pytest.raises(ItemError, match=rf"^{path}:4: "):
        load_items(path, tokenizer(), vocab())
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    items = load_items(path, tokenizer(), vocab())
    assert [item.source for item in items] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_json_lines_hold_any_unicode_and_may_start_with_a_bom(tmp_path):
    """U+2028 and U+0085 inside a JSON string split the line (str.splitlines), and a BOM made
    the first line "not a JSON object"."""
    records = random_records(4, 3)
    records[0]["context"]["text"] = "the dog\u2028ran"
    records[1]["endings"][0]["text"] = "the cat\x85sat"
    path = tmp_path / "items.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    items = load_items(path, tokenizer(), vocab())
    assert [i.id for i in items] == [r["id"] for r in records]
    assert items[0].context.text == "the dog\u2028ran"
    assert items[2].source.endswith("items.jsonl:3")


class DroppingTokenizer:
    """A tokenizer that drops what it cannot spell (as a normalizer stripping marks may)."""

    space_id = tokenizer().space_id

    def encode(self, text):
        return tokenizer().encode(text) if text.isascii() else []


def test_text_the_tokenizer_turns_into_no_pieces_is_refused(tmp_path):
    """An ending of no pieces was scored a log-probability of 0 over 0 tokens: the best summed
    score, and a NaN per-token one that argmax took as the best too, silently."""
    record = {"id": "s", "context": {"text": "the girl ran"},
              "endings": [{"text": "home"}, {"text": "\u0301"}], "label": 0}
    with pytest.raises(ItemError, match=r"item 's' \(.*items.jsonl:1\), ending 1: the tokenizer "
                                        r"turns \"text\" '\u0301' into no pieces"):
        load_items(write(tmp_path, [record]), DroppingTokenizer(), vocab())
    record["endings"][1]["text"] = "the cat"
    assert len(load_items(write(tmp_path, [record]), DroppingTokenizer(), vocab())) == 1


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_lst_eval_refuses_items_that_are_no_regular_file_before_loading_the_model(
        tmp_path, capsys, monkeypatch):
    """`lst-eval --items /dev/zero` read forever once the model was loaded (a FIFO blocked)."""
    monkeypatch.setattr("megatron_lst.evaluation.loading.load_inference_model",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert eval_main(["--load", str(tmp_path), "--items", "/dev/zero"]) == 2
    assert capsys.readouterr().err == ("lst-eval: --items /dev/zero: is a character device, not a "
                                       "file; pass the story-completion items (JSONL) as a "
                                       "regular file\n")
