"""Benchmark importers: HellaSwag JSONL and StoryCloze CSV, with per-ending unit files."""

import json
import re

import numpy as np
import pytest
from eval_cases import tokenizer, vocab

from megatron_lst.evaluation.importers import (
    attach_units,
    import_main,
    read_hellaswag,
    read_storycloze,
)
from megatron_lst.evaluation.items import ItemError, load_items

CLOZE_HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")


def write_cloze(path, rows):
    path.write_text(CLOZE_HEADER + "".join(row + "\n" for row in rows))
    return path


def write_units(units_dir, item_id, name, units, align=None):
    folder = units_dir / item_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.units").write_text(" ".join(map(str, units)) + "\n")
    if align is not None:
        (folder / f"{name}.align").write_text("".join(f"{w} {n}\n" for w, n in align))


def test_worked_example_storycloze_with_units(tmp_path):
    cloze = write_cloze(tmp_path / "cloze.csv", [
        "b929f263,the girl ran.,she sat.,the dog ate.,then night.,she went home.,"
        "the cat sat.,1"])
    units = tmp_path / "units"
    write_units(units, "b929f263", "context", [3, 3, 5, 1, 0, 7], [["the", 2], ["[SIL]", 1],
                                                                  ["girl", 3]])
    write_units(units, "b929f263", "ending0", [1, 2])
    write_units(units, "b929f263", "ending1", [4, 4, 4])
    output = tmp_path / "items.jsonl"
    assert import_main(["storycloze", str(cloze), "--units-dir", str(units),
                        "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert record == {
        "id": "b929f263",
        "context": {"text": "the girl ran. she sat. the dog ate. then night.",
                    "units": [3, 3, 5, 1, 0, 7],
                    "segments": [["the", 2], ["[SIL]", 1], ["girl", 3]]},
        "endings": [{"text": "she went home.", "units": [1, 2]},
                    {"text": "the cat sat.", "units": [4, 4, 4]}],
        "label": 0}
    (item,) = load_items(output, tokenizer(), vocab())
    assert item.context.segment_is_silence.tolist() == [False, True, False]


def test_units_as_tools_extract_units_writes_them(tmp_path):
    """`tools/extract_units.py --input-format audio-dir` on `<id>/context.wav`, `<id>/ending<k>.wav`
    writes `<id>/context.npy`, ...: the importer wanted `.units` text and refused them."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    units = tmp_path / "units" / "s1"
    units.mkdir(parents=True)
    for name, values in (("context", [3, 3, 5]), ("ending0", [1, 2]), ("ending1", [4])):
        np.save(units / f"{name}.npy", np.asarray(values, np.int32))
    (units / "context.align").write_text("a 2\n[SIL] 1\n")
    (record,) = attach_units(read_storycloze(cloze), tmp_path / "units")
    assert record["context"] == {"text": "a. b. c. d.", "units": [3, 3, 5],
                                 "segments": [["a", 2], ["[SIL]", 1]]}
    assert [e["units"] for e in record["endings"]] == [[1, 2], [4]]
    np.save(units / "ending1.npy", np.zeros((2, 2), np.int32))
    with pytest.raises(ItemError, match=r"item 's1': .*ending1.npy: expected a 1-D integer array"):
        attach_units(read_storycloze(cloze), tmp_path / "units")


def test_hellaswag_jsonl(tmp_path):
    path = tmp_path / "hs.jsonl"
    rows = [{"ind": 24, "ctx_a": "the girl", "ctx_b": "ran home", "endings": ["a", "b", "c", "d"],
             "label": 2},
            {"ctx": "the dog sat", "endings": ["x", "y", "z", "w"], "label": "0"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_hellaswag(path)
    assert [r["id"] for r in records] == ["24", "1"]
    assert records[0]["context"]["text"] == "the girl ran home"
    assert records[1]["label"] == 0 and len(records[1]["endings"]) == 4
    # a blank "ctx" beside its two halves (it took the place of their text)
    path.write_text(json.dumps({"ctx": " ", "ctx_a": "the girl ", "ctx_b": " ran", "endings":
                                ["a", "b"], "label": 1}) + "\n")
    assert read_hellaswag(path)[0]["context"]["text"] == "the girl ran"
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"]}) + "\n")
    with pytest.raises(ItemError, match=r"test.jsonl:1: .*needs"):
        read_hellaswag(unlabelled)


def test_import_errors_name_the_story(tmp_path):
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1", "s2,a.,b.,c.,d.,e.,f.,3"])
    with pytest.raises(ItemError, match=r"cloze.csv:3: story 's2' has AnswerRightEnding '3'"):
        read_storycloze(cloze)
    records = read_storycloze(write_cloze(tmp_path / "ok.csv", ["s1,a.,b.,c.,d.,e.,f.,2"]))
    assert records[0]["label"] == 1
    with pytest.raises(ItemError, match=r"item 's1': no unit file .*s1/context.units"):
        attach_units(records, tmp_path / "units")
    assert "units" not in records[0]["context"]  # the input records are left as they were


@pytest.mark.parametrize("row, message", [
    ({"ctx": "a", "endings": ["b", "c"], "label": 1.7}, "\"label\" 1.7 is not an ending index"),
    ({"ctx": "a", "endings": ["b", "c"], "label": "one"}, "\"label\" 'one' is not an ending"),
    ({"ctx": "a", "endings": ["b", "c"], "label": None}, "\"label\" None is not an ending"),
    # written to the items file, refused only by lst-eval
    ({"ctx": "a", "endings": ["b", "c"], "label": "2"}, "\"label\" 2 is not an ending index 0..1 "
                                                       "of its 2 endings"),
    ({"ctx": "a", "endings": ["b", "c"], "label": -1}, "\"label\" -1 is not an ending index"),
    ({"ctx": "a", "endings": "bcde", "label": 0}, "\"endings\" must be a list of strings"),
    (["a", "b"], "not a JSON object \\(a list\\)"),
    ({"ctx": ["a"], "endings": ["b", "c"], "label": 0}, "\"ctx\", \"ctx_a\" and \"ctx_b\" must be strings"),
    ({"ctx_a": "a", "ctx_b": 3, "endings": ["b", "c"], "label": 0}, "\"ctx\", .* must be strings"),
    ("[" * 100_000, r"not a HellaSwag line \(JSON nested too deeply"),  # a RecursionError
    # a ValueError past Python's integer digit limit, and a SentencePiece RuntimeError in lst-eval
    ('{"ind": ' + "9" * 5000 + ', "ctx": "a", "endings": ["b", "c"], "label": 0}',
     r"not a HellaSwag line \(it holds an integer of more than \d+ digits"),
    ({"ctx": "a", "endings": ["b", "c\ud83d"], "label": 0},
     r"ending 1 holds '\\ud83d' at character 1, half of a UTF-16 surrogate pair"),
    # the ids "None" and "1.5"
    ({"ind": None, "ctx": "a", "endings": ["b", "c"], "label": 0}, "\"ind\" None is not an item id"),
    ({"ind": 1.5, "ctx": "a", "endings": ["b", "c"], "label": 0}, "\"ind\" 1.5 is not an item id"),
    # written, then refused by lst-eval naming the items file
    ({"ctx": "a", "endings": ["b", " ", "c"], "label": 0}, r"endings \[1\] have no text"),
    ({"ctx": "a", "endings": ["b"], "label": 0}, r"\"endings\" lists 1 ending\(s\); an item needs"),
    ({"ctx": " \t", "endings": ["b", "c"], "label": 0}, r"the context \(\"ctx\", or \"ctx_a\" and "
                                                       r"\"ctx_b\"\) holds only whitespace"),
    ({"ctx_a": " ", "ctx_b": "\n", "endings": ["b", "c"], "label": 0}, r"the context .* holds only "
                                                                     r"whitespace; fill it in"),
])
def test_malformed_hellaswag_lines_are_refused(tmp_path, row, message):
    """They were tracebacks, or silently wrong: label 1.7 became 1, "bcde" four endings."""
    path = tmp_path / "hs.jsonl"
    path.write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(ItemError, match=rf"hs.jsonl:1: {message}"):
        read_hellaswag(path)


def test_malformed_storycloze_rows_are_refused(tmp_path):
    with pytest.raises(ItemError, match=r"short.csv:3: the row ends before the columns "
                                        r"\['RandomFifthSentenceQuiz2', 'AnswerRightEnding'\]"):
        read_storycloze(write_cloze(tmp_path / "short.csv", ["s1,a.,b.,c.,d.,e.,f.,1",
                                                             "s2,a.,b.,c.,d.,e."]))
    with pytest.raises(ItemError, match=r"noid.csv:2: the story has no InputStoryid"):
        read_storycloze(write_cloze(tmp_path / "noid.csv", [" ,a.,b.,c.,d.,e.,f.,1"]))
    # written, then refused by lst-eval naming the items file
    with pytest.raises(ItemError, match=r"empty.csv:3: story 's2' has no text in "
                                        r"\['InputSentence2', 'RandomFifthSentenceQuiz2'\]"):
        read_storycloze(write_cloze(tmp_path / "empty.csv", ["s1,a.,b.,c.,d.,e.,f.,1",
                                                             "s2,a., ,c.,d.,e.,,1"]))
    # the last AnswerRightEnding of each row was its label, silently
    twice = tmp_path / "twice.csv"
    twice.write_text(CLOZE_HEADER.rstrip("\n") + ",AnswerRightEnding\ns1,a.,b.,c.,d.,e.,f.,1,2\n")
    with pytest.raises(ItemError, match=r"twice.csv:1: the header names the columns "
                                        r"\['AnswerRightEnding'\] more than once; keep one"):
        read_storycloze(twice)


@pytest.mark.parametrize(("ids", "message"), [
    (["s1", "s2", "s1"], r"items 1 and 3 share the id 's1'"),
    (["s1", "../s2"], r"item 2 has the id '../s2'; an id names the item's --units-dir folder"),
    (["..", "s2"], r"item 1 has the id '..'"),
])
def test_ids_that_lst_eval_or_a_units_folder_cannot_tell_apart_are_refused(tmp_path, capsys, ids,
                                                                           message):
    """Repeated ids were written (lst-eval refused the output; with --units-dir both items read
    one folder), and an id with '/' named a folder outside --units-dir."""
    cloze = write_cloze(tmp_path / "cloze.csv", [f"{i},a.,b.,c.,d.,e.,f.,1" for i in ids])
    output = tmp_path / "items.jsonl"
    assert import_main(["storycloze", str(cloze), "--output", str(output)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


@pytest.mark.parametrize("make, problem", [(lambda path: None, "no such directory"),
                                           (lambda path: path.write_text(""), "not a directory")])
def test_a_units_dir_that_is_no_directory_is_named(tmp_path, capsys, make, problem):
    """It was "item 's1': no unit file units/s1/context.units", as if one item lacked its files."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    make(tmp_path / "units")
    assert import_main(["storycloze", str(cloze), "--units-dir", str(tmp_path / "units"),
                        "--output", str(tmp_path / "items.jsonl")]) == 2
    assert f"--units-dir {tmp_path / 'units'}: {problem}; give the folder" in capsys.readouterr().err
    assert not (tmp_path / "items.jsonl").exists()


def test_import_refuses_an_output_that_would_overwrite_a_unit_file(tmp_path, capsys):
    """An --output naming a file of --units-dir was overwritten by the items (its units lost);
    a new file there is harmless and still written."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    units = tmp_path / "units"
    for name in ("context", "ending0", "ending1"):
        write_units(units, "s1", name, [1, 2, 3])
    unit_file = units / "s1" / "ending0.units"
    assert import_main(["storycloze", str(cloze), "--units-dir", str(units),
                        "--output", str(unit_file)]) == 2
    assert f"--output {unit_file} is a file of --units-dir" in capsys.readouterr().err
    assert unit_file.read_text() == "1 2 3\n"
    assert import_main(["storycloze", str(cloze), "--units-dir", str(units),
                        "--output", str(units / "items.jsonl")]) == 0


def test_import_that_fills_the_disk_keeps_the_earlier_items_file(tmp_path, capsys, disk_full_at):
    """The items file was written line by line over the earlier one: a disk that filled part
    way left the first items, cut at a line end, which lst-eval reads as a smaller benchmark."""
    cloze = write_cloze(tmp_path / "cloze.csv", [f"s{i},a.,b.,c.,d.,e.,f.,1" for i in range(50)])
    output = tmp_path / "items.jsonl"
    output.write_text("earlier items\n")
    with disk_full_at(1000):
        status = import_main(["storycloze", str(cloze), "--output", str(output)])
    assert status == 2
    assert output.read_text() == "earlier items\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloze.csv", "items.jsonl"]
    assert capsys.readouterr().err == (f"lst-import-eval: cannot write --output {output} (File "
                                       f"too large)\n")


def test_import_refuses_an_output_that_would_overwrite_the_input(tmp_path, capsys):
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    original = cloze.read_text()
    assert import_main(["storycloze", str(cloze), "--output", str(cloze)]) == 2
    assert "is the benchmark file being imported" in capsys.readouterr().err
    assert cloze.read_text() == original
    assert import_main(["storycloze", str(cloze), "--output", str(tmp_path / "no/x.jsonl")]) == 2
    assert "directory" in capsys.readouterr().err
    # An IsADirectoryError traceback once the items were read
    assert import_main(["storycloze", str(cloze), "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a directory; name the items file" in capsys.readouterr().err
    link = tmp_path / "link.jsonl"  # a FileNotFoundError traceback once the items were read
    link.symlink_to(tmp_path / "gone" / "items.jsonl")
    assert import_main(["storycloze", str(cloze), "--output", str(link)]) == 2
    assert capsys.readouterr().err == (f"lst-import-eval: cannot write --output {link} (No such "
                                       f"file or directory)\n")
    cloze.write_text(original, encoding="utf-16")
    assert import_main(["storycloze", str(cloze), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert f"{cloze} is not UTF-8 text" in capsys.readouterr().err


def test_benchmark_files_with_a_bom_or_unicode_line_separators(tmp_path):
    """A spreadsheet's BOM made the CSV "missing columns ['InputStoryid']"; U+2028 inside a
    HellaSwag string split its line ("not a JSON object")."""
    cloze = tmp_path / "cloze.csv"
    cloze.write_text("\ufeff" + CLOZE_HEADER + "s1,a.,b.,c.,d.,e.,f.,2\n", encoding="utf-8")
    assert read_storycloze(cloze)[0]["id"] == "s1"
    path = tmp_path / "hs.jsonl"
    row = {"ind": 3, "ctx": "the girl\u2028ran", "endings": ["a\x85b", "c"], "label": 1}
    path.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    [record] = read_hellaswag(path)
    assert record["context"]["text"] == "the girl\u2028ran"
    assert record["endings"][0]["text"] == "a\x85b"


@pytest.mark.parametrize("name, content, message", [
    ("context.align", "caf\xe9 3\n".encode("latin-1"), "context.align is not UTF-8 text"),
    ("ending1.units", b"1 2 \xff", "ending1.units is not UTF-8 text"),
    ("context.align", "cafe 2\xb2\n".encode(), "context.align:1 must be \"word n_units\""),
    # int() read "2_0" as unit 20 and a full-width "１２" as 12, where training's reader refuses
    ("ending0.units", b"1 2_0 3", "ending0.units: speech units are not whitespace-separated "
                                  "integers"),
    ("context.units", "1 \uff11\uff12 3".encode(), "context.units: speech units are not"),
    ("ending1.units", b"5.0 1", "ending1.units: speech unit '5.0' is not an integer"),
    # written as "units": [], then refused by lst-eval naming the items file
    ("ending1.units", b" \n", "ending1.units holds no units"),
    # written, then refused by lst-eval naming the items file
    ("context.align", b"a 2\n[SIL] 2\n", "context.align aligns 4 units but "),
    ("context.align", b"a 1\n", "context.units holds 3; its \"word n_units\" lines must sum"),
])
def test_bad_unit_files_are_named(tmp_path, capsys, name, content, message):
    """A file that is not UTF-8 was reported as the benchmark CSV; a count of "2²" (digits to
    str.isdigit, not to int) was a ValueError traceback."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    units = tmp_path / "units"
    for part in ("context", "ending0", "ending1"):
        write_units(units, "s1", part, [1, 2, 3])
    (units / "s1" / name).write_bytes(content)
    assert import_main(["storycloze", str(cloze), "--units-dir", str(units),
                        "--output", str(tmp_path / "items.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"item 's1': {units / 's1' / name.split('.')[0]}" in err and message in err, err


def test_storycloze_errors_name_the_line_a_multi_line_row_starts_on(tmp_path):
    """A quoted field may hold line breaks; errors counted rows, so every row after such a one
    was named by a line number too small."""
    cloze = write_cloze(tmp_path / "cloze.csv", [
        's1,"a.\nstill a.",b.,c.,d.,e.,"f.\r\nand f.",1', "", "s2,a.,b.,c.,d.,e.,f.,3"])
    with pytest.raises(ItemError, match=r"cloze.csv:6: story 's2' has AnswerRightEnding '3'"):
        read_storycloze(cloze)
    cloze = write_cloze(tmp_path / "cloze.csv", ['s1,"a.\nb.",b.,c.,d.,e.,f.,1', "s2,a., x,b.,c.,d.,e.,f.,1"])
    with pytest.raises(ItemError, match=r"cloze.csv:4: the row has 9 fields but the header 8; "
                                        r"quote a field that holds a comma"):
        read_storycloze(cloze)
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1,", 's2,"a.' + "x" * 200_000])
    with pytest.raises(ItemError, match=r"cloze.csv:3: not a CSV row \(field larger than"):
        read_storycloze(cloze)
    # The same in the header was a csv.Error traceback.
    header = tmp_path / "header.csv"
    header.write_text('"InputStoryid,' + "x" * 200_000 + "\n")
    with pytest.raises(ItemError, match=r"header.csv:1: not a CSV header \(field larger than"):
        read_storycloze(header)
    [record] = read_storycloze(write_cloze(tmp_path / "ok.csv", ['s1,"a.\nb.",b.,c.,d.,e.,f.,2,']))
    assert record["context"]["text"] == "a.\nb. b. c. d." and record["label"] == 1


@pytest.mark.parametrize("name, content", [
    ("cloze.csv", CLOZE_HEADER), ("cloze.csv", CLOZE_HEADER + "\n\n"), ("hs.jsonl", ""),
    ("hs.jsonl", "\n  \n"),
])
def test_a_benchmark_file_without_items_is_refused(tmp_path, capsys, name, content):
    """It "wrote 0 items", exit status 0: an empty items file that lst-eval then refused."""
    path = tmp_path / name
    path.write_text(content)
    output = tmp_path / "items.jsonl"
    output.write_text("kept\n")
    fmt = "storycloze" if name.endswith(".csv") else "hellaswag"
    assert import_main([fmt, str(path), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"lst-import-eval: {path} holds no {fmt} items (a header "
                                       f"or blank lines only); nothing was written\n")
    assert output.read_text() == "kept\n"


def test_align_line_numbers_count_line_feeds_only(tmp_path):
    """str.splitlines also split at a form feed, U+2028 or U+0085 (whitespace to the "word
    n_units" fields): the bad line was named one past what `sed -n` shows."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    units = tmp_path / "units"
    for part in ("context", "ending0", "ending1"):
        write_units(units, "s1", part, [1, 2, 3])
    align = units / "s1" / "context.align"
    align.write_text("[SIL] 1\x0c\nab 2\nbad\n", encoding="utf-8")
    with pytest.raises(ItemError, match=rf"{align}:3 must be \"word n_units\""):
        attach_units(read_storycloze(cloze), units)


def test_unit_files_with_a_byte_order_mark(tmp_path):
    """A BOM (a Windows editor's) made a .units file "must hold whitespace-separated integers"
    and a first "[SIL]" of an .align file the word "\\ufeff[SIL]", silently."""
    cloze = write_cloze(tmp_path / "cloze.csv", ["s1,a.,b.,c.,d.,e.,f.,1"])
    units = tmp_path / "units"
    for part in ("context", "ending0", "ending1"):
        write_units(units, "s1", part, [1, 2, 3])
    (units / "s1" / "context.units").write_text("\ufeff1 2 3\r\n", encoding="utf-8")
    (units / "s1" / "context.align").write_text("\ufeff[SIL] 1\r\nab 2\r\n", encoding="utf-8")
    (record,) = attach_units(read_storycloze(cloze), units)
    assert record["context"]["units"] == [1, 2, 3]
    assert record["context"]["segments"] == [["[SIL]", 1], ["ab", 2]]
