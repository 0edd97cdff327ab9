"""Turn public story-completion benchmark files into the item format `lst-eval` reads.

Text comes from the benchmark file; speech units come from the user's own HuBERT pipeline (run on
the spoken versions of the benchmark, e.g. sStoryCloze / sHellaSwag audio), one file per context
and per ending in a directory keyed by item id:

    UNITS_DIR/<item id>/context.units      "12 12 431 7 ..."  (whitespace-separated unit values)
    UNITS_DIR/<item id>/ending<k>.units    k = 0, 1, ... in the benchmark's ending order
    UNITS_DIR/<item id>/<name>.align       optional, beside any .units file: one "word n_units"
                                           line per word in order ("[SIL] n" for silences),
                                           summing to the units; needed for aligned patching

A `<name>.npy` may stand where there is no `<name>.units`: what `tools/extract_units.py
--input-format audio-dir` writes for audio laid out as `<item id>/context.wav` and
`<item id>/ending<k>.wav`.

Readers (the item id each one uses is what keys UNITS_DIR):

- `read_hellaswag`: HellaSwag JSONL, one object per line with `ctx` (or `ctx_a` + `ctx_b`),
  `endings` (4 strings) and `label`; id = `ind` when present, else the 0-based line number.
- `read_storycloze`: the StoryCloze CSV (`InputStoryid`, `InputSentence1..4`,
  `RandomFifthSentenceQuiz1/2`, `AnswerRightEnding` 1 or 2; the label becomes 0 or 1);
  id = `InputStoryid`. TopicStoryCloze (tStoryCloze) ships in the same columns, its wrong ending
  taken from another story, so it is read by the same function.

Worked example. A StoryCloze file `cloze.csv`:

    InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding
    b929f263,Rick grew up.,He joined a gang.,He got shot.,He quit.,He is happy now.,He joins again.,1

and units made by the user's pipeline:

    units/b929f263/context.units    "71 71 12 5 5 ..."
    units/b929f263/ending0.units    "12 9 9 ..."
    units/b929f263/ending1.units    "3 3 40 ..."

    lst-import-eval storycloze cloze.csv --units-dir units --output storycloze.jsonl

writes one item per story:

    {"id": "b929f263",
     "context": {"text": "Rick grew up. He joined a gang. He got shot. He quit.", "units": [71, 71, ...]},
     "endings": [{"text": "He is happy now.", "units": [12, 9, ...]},
                 {"text": "He joins again.", "units": [3, 3, ...]}],
     "label": 0}

Without `--units-dir` the items are text-only (T->T). `lst-eval` validates the items against the
model's tokenizer and codebook when it loads them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.data.document_parsing import parse_units_text
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import MAX_LARGE_TEXT_BYTES, read_bounded_bytes
from megatron_lst.data.unit_files import load_units
from megatron_lst.evaluation.items import (
    ItemError,
    editor_lines,
    json_lines,
    refuse_lone_surrogate,
)

STORYCLOZE_CONTEXT = tuple(f"InputSentence{i}" for i in range(1, 5))
STORYCLOZE_ENDINGS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")


def read_hellaswag(path: str | Path) -> list[dict]:
    """Text-only items of a HellaSwag JSONL file."""
    records = []
    for number, where, row in json_lines(Path(path), "HellaSwag file", "a HellaSwag line"):
        if not isinstance(row, dict):
            raise ItemError(f"{where}: not a JSON object (a {type(row).__name__})")
        parts = [row.get(key) for key in ("ctx", "ctx_a", "ctx_b") if row.get(key) is not None]
        if not all(isinstance(part, str) for part in parts):
            raise ItemError(f"{where}: \"ctx\", \"ctx_a\" and \"ctx_b\" must be strings, got "
                            f"{parts!r}")
        if not any(parts) or "endings" not in row or "label" not in row:
            raise ItemError(f"{where}: a HellaSwag line needs \"ctx\" (or \"ctx_a\"/\"ctx_b\"), "
                            f"\"endings\" and \"label\" (the unlabelled test split cannot be "
                            f"scored)")
        context = _hellaswag_context(row)
        if not context:  # written, then refused by lst-eval naming the items file instead
            raise ItemError(f"{where}: the context (\"ctx\", or \"ctx_a\" and \"ctx_b\") holds "
                            f"only whitespace; fill it in or leave the line out")
        endings = row["endings"]
        if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
            raise ItemError(f"{where}: \"endings\" must be a list of strings, got {endings!r}")
        if len(endings) < 2:
            raise ItemError(f"{where}: \"endings\" lists {len(endings)} ending(s); an item "
                            f"needs at least 2 to choose from")
        empty = [k for k, ending in enumerate(endings) if not ending.strip()]
        if empty:  # written, then refused by lst-eval naming the items file instead
            raise ItemError(f"{where}: endings {empty} have no text; fill them in or leave the "
                            f"line out")
        for name, text in (("the context", context),
                           *((f"ending {k}", e) for k, e in enumerate(endings))):
            # (else written, then refused by lst-eval naming the items file instead)
            refuse_lone_surrogate(text, f"{where}: {name}")
        item_id = row.get("ind", number - 1)
        if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
            raise ItemError(f"{where}: \"ind\" {item_id!r} is not an item id (an integer or a "
                            f"string); fix it or leave \"ind\" out to number the lines")
        item_id = str(item_id)
        records.append({"id": item_id, "context": {"text": context},
                        "endings": [{"text": e.strip()} for e in endings],
                        "label": _hellaswag_label(row["label"], len(endings), where)})
    return records


def _hellaswag_context(row: dict) -> str:
    """The context of a HellaSwag row, stripped: its "ctx", else its "ctx_a" and "ctx_b" joined
    by a space ("" when they hold only whitespace)."""
    context = (row.get("ctx") or "").strip()
    return context or " ".join(part.strip() for part in (row.get("ctx_a"), row.get("ctx_b"))
                               if part and part.strip())


def _hellaswag_label(label, num_endings: int, where: str) -> int:
    """The ending index, given as an integer or a string of digits (as the Hub's copy has it)."""
    if isinstance(label, str) and _digits_value(label.strip()) is not None:
        label = _digits_value(label.strip())
    if not isinstance(label, int) or isinstance(label, bool):
        raise ItemError(f"{where}: \"label\" {label!r:.60} is not an ending index")
    if not 0 <= label < num_endings:
        raise ItemError(f"{where}: \"label\" {label} is not an ending index 0..{num_endings - 1} "
                        f"of its {num_endings} endings")
    return label


def read_storycloze(path: str | Path) -> list[dict]:
    """Text-only items of a StoryCloze or TopicStoryCloze CSV file. Errors name the line a row
    starts on (a quoted field may hold line breaks, so a row can span several lines)."""
    path = Path(path)
    # the input-files rule: a regular file (a FIFO blocked, a directory was an IsADirectoryError)
    data = read_bounded_bytes(path, ItemError, "StoryCloze file", MAX_LARGE_TEXT_BYTES)
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's BOM dropped
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ItemError(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line "
                        f"{line}); save it as UTF-8") from None
    with io.StringIO(text, newline="") as f:  # line ends as written, for csv to read
        reader = csv.reader(f)
        try:
            header = next(reader, [])
        except csv.Error as error:  # an unclosed quote ran the header past csv's field limit
            raise ItemError(f"{path}:1: not a CSV header ({error}); check its quotes") from None
        needed = ("InputStoryid", *STORYCLOZE_CONTEXT, *STORYCLOZE_ENDINGS, "AnswerRightEnding")
        missing = [c for c in needed if c not in header]
        if missing:
            raise ItemError(f"{path}: not a StoryCloze CSV, missing columns {missing}")
        repeated = [c for c in needed if header.count(c) > 1]
        if repeated:  # each row's last such field was read, silently
            raise ItemError(f"{path}:1: the header names the columns {repeated} more than once; "
                            f"keep one of each")
        records = []
        for number, values in _rows_by_first_line(reader, path):
            if any(v.strip() for v in values[len(header):]):  # an empty one: a trailing comma
                raise ItemError(f"{path}:{number}: the row has {len(values)} fields but the "
                                f"header {len(header)}; quote a field that holds a comma "
                                f"(\"a, b\")")
            row = dict(zip(header, values, strict=False))
            short = [c for c in needed if c not in row]
            if short:
                raise ItemError(f"{path}:{number}: the row ends before the columns {short}")
            if not row["InputStoryid"].strip():
                raise ItemError(f"{path}:{number}: the story has no InputStoryid")
            empty = [c for c in (*STORYCLOZE_CONTEXT, *STORYCLOZE_ENDINGS) if not row[c].strip()]
            if empty:  # written, then refused by lst-eval naming the items file instead
                raise ItemError(f"{path}:{number}: story {row['InputStoryid']!r} has no text in "
                                f"{empty}; fill them in or leave the story out")
            answer = row["AnswerRightEnding"].strip()
            if answer not in ("1", "2"):
                raise ItemError(f"{path}:{number}: story {row['InputStoryid']!r} has "
                                f"AnswerRightEnding {answer!r}; it must be 1 or 2")
            records.append({
                "id": row["InputStoryid"].strip(),
                "context": {"text": " ".join(row[c].strip() for c in STORYCLOZE_CONTEXT)},
                "endings": [{"text": row[c].strip()} for c in STORYCLOZE_ENDINGS],
                "label": int(answer) - 1,
            })
    return records


def _rows_by_first_line(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, its fields) for each row left in the `csv.reader`, blank lines
    skipped: a row spans several lines when a quoted field holds line breaks."""
    while True:
        ended = reader.line_num  # the last line of the previous row
        try:
            values = next(reader, None)
        except csv.Error as error:  # a field past csv's size limit: an unclosed quote, ...
            raise ItemError(f"{path}:{ended + 1}: not a CSV row ({error}); check the row's "
                            f"quotes") from None
        if values is None:
            return
        if values:  # a blank line reads as []
            yield ended + 1, values


def check_item_ids(records: Sequence[dict], source: str | Path) -> None:
    """Every id is unique, non-empty and one path component: lst-eval refuses repeated ids, and
    with --units-dir an id names its folder (two items of one id would read the same units)."""
    first_seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        item_id = record["id"]
        if not item_id.strip() or item_id in (".", "..") or "/" in item_id or "\\" in item_id:
            raise ItemError(f"{source}: item {number} has the id {item_id!r}; an id names the "
                            f"item's --units-dir folder: a file name, not empty, '.' or '..', "
                            f"without '/' or '\\'")
        if item_id in first_seen:
            raise ItemError(f"{source}: items {first_seen[item_id]} and {number} share the id "
                            f"{item_id!r}; lst-eval needs every id once: remove the repeated item")
        first_seen[item_id] = number


def attach_units(records: Sequence[dict], units_dir: str | Path) -> list[dict]:
    """Copies of the records with `units` (and `segments` where a .align file exists)."""
    units_dir = Path(units_dir)
    out = []
    for record in map(copy.deepcopy, records):
        item_dir = units_dir / record["id"]
        parts = [("context", record["context"])] + [
            (f"ending{k}", ending) for k, ending in enumerate(record["endings"])]
        for name, part in parts:
            part.update(_read_units(item_dir / name, record["id"]))
        out.append(record)
    return out


def _read_units(base: Path, item_id: str) -> dict:
    """The units of `base`.units (text) or `base`.npy (tools/extract_units.py's), and the
    segments of `base`.align where it exists."""
    path = next((base.with_suffix(s) for s in (".units", ".npy") if base.with_suffix(s).is_file()),
                None)
    if path is None:
        raise ItemError(f"item {item_id!r}: no unit file {base}.units (or .npy); the units "
                        f"directory needs <id>/context.units and <id>/ending<k>.units (or .npy) "
                        f"for every item")
    part = {"units": _unit_values(path, item_id)}
    align = path.with_suffix(".align")
    if align.is_file():
        segments = []
        for number, line in enumerate(editor_lines(_read_utf8(align, item_id)), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or _digits_value(fields[1]) is None:
                raise ItemError(f"item {item_id!r}: {align}:{number} must be \"word n_units\"")
            segments.append([fields[0], _digits_value(fields[1])])
        covered = sum(count for _, count in segments)
        if covered != len(part["units"]):  # written, then refused by lst-eval naming the items
            raise ItemError(f"item {item_id!r}: {align} aligns {covered} units but {path} holds "
                            f"{len(part['units'])}; its \"word n_units\" lines must sum to the "
                            f"units (align the words again, or remove the .align file)")
        part["segments"] = segments
    return part


_MAX_COUNT_DIGITS = 18
"""More digits than any label or unit count: int() past Python's digit limit (4300) raised a
ValueError, out of the importer's errors."""


def _digits_value(text: str) -> int | None:
    """The integer that `text`, ASCII digits alone, spells; None for any other text: a sign, a
    digit str.isdigit takes and int() refuses ("2²", a ValueError once), or more digits than
    any count."""
    if text.isascii() and text.isdigit() and len(text) <= _MAX_COUNT_DIGITS:
        return int(text)
    return None


def _unit_values(path: Path, item_id: str) -> list[int]:
    """The units of a .npy or .units file, read as training reads units (`int()` took "1_2" for
    12 and "１２" for 12); an empty file is refused naming it (written, it was refused by
    lst-eval naming the items file)."""
    try:
        units = (load_units(path) if path.suffix == ".npy"
                 else parse_units_text(_read_utf8(path, item_id), str(path)))
    except DocumentError as error:
        raise ItemError(f"item {item_id!r}: {error}; a unit file holds whitespace-separated "
                        f"integers") from None
    if not units.size:
        raise ItemError(f"item {item_id!r}: {path} holds no units; every context and ending "
                        f"needs its speech (re-extract it, or import without --units-dir)")
    return units.tolist()


def _read_utf8(path: Path, item_id: str) -> str:
    """A unit or alignment file's text, a leading byte-order mark dropped (it made the first
    unit no integer, and a first "[SIL]" a word); one that is not UTF-8 is an error naming it
    (the importer's own message would name the benchmark file)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ItemError(f"item {item_id!r}: {path} is not UTF-8 text ({error})") from None


def _check_output(output: Path, source: Path, units_dir: str | None) -> None:
    """Refuse, before reading anything, an --output that cannot be an items file or that names an
    input the items would overwrite (the benchmark file, a file of --units-dir), and a --units-dir
    that is no directory."""
    if not output.parent.is_dir():
        raise ItemError(f"--output {output}: directory {output.parent} does not exist; create it "
                        f"or write elsewhere")
    if output.is_dir():
        raise ItemError(f"--output {output} is a directory; name the items file, e.g. "
                        f"{output / 'items.jsonl'}")
    if output.resolve() == source.resolve():
        raise ItemError(f"--output {output} is the benchmark file being imported, which it would "
                        f"overwrite; write the items to another file")
    if units_dir is not None and not Path(units_dir).is_dir():  # each item's files were missed
        raise ItemError(f"--units-dir {units_dir}: "
                        + ("not a directory" if Path(units_dir).exists() else "no such directory")
                        + "; give the folder that holds <item id>/context.units and "
                          "<item id>/ending<k>.units, or leave --units-dir out for text-only "
                          "items")
    if (units_dir is not None and output.exists()
            and output.resolve().is_relative_to(Path(units_dir).resolve())):
        raise ItemError(f"--output {output} is a file of --units-dir {units_dir}, which the items "
                        f"would overwrite; write them to another file")


READERS = {"hellaswag": read_hellaswag, "storycloze": read_storycloze,
           "topic-storycloze": read_storycloze}


def import_main(argv: Sequence[str] | None = None) -> int:
    """`lst-import-eval FORMAT INPUT [--units-dir DIR] --output ITEMS.jsonl`."""
    parser = argparse.ArgumentParser(prog="lst-import-eval",
                                     description="Convert a benchmark file to lst-eval items.")
    parser.add_argument("format", choices=sorted(READERS),
                        help="storycloze / topic-storycloze: the StoryCloze CSV columns; "
                             "hellaswag: HellaSwag JSONL.")
    parser.add_argument("input", help="The benchmark file.")
    parser.add_argument("--units-dir", default=None,
                        help="Speech of each item: UNITS_DIR/<item id>/context.units and "
                             "ending<k>.units (whitespace-separated unit values, or .npy), "
                             "optionally <name>.align word alignments "
                             "(docs/evaluation.md#importing-the-public-benchmarks). Without it "
                             "the items are text-only (T->T).")
    parser.add_argument("--output", required=True, help="The items JSONL file to write.")
    args = parser.parse_args(argv)
    try:
        _check_output(Path(args.output), Path(args.input), args.units_dir)
        records = READERS[args.format](args.input)
        if not records:  # an empty items file, which lst-eval refuses
            raise ItemError(f"{args.input} holds no {args.format} items (a header or blank lines "
                            f"only); nothing was written")
        check_item_ids(records, args.input)
        if args.units_dir is not None:
            records = attach_units(records, args.units_dir)
    except (ItemError, OSError) as error:
        print(f"lst-import-eval: {error}", file=sys.stderr)
        return 2
    try:  # atomically: a write that fails or is killed leaves no items file cut at a line end
        replace_file_durably(args.output, "".join(json.dumps(record) + "\n" for record in records))
    except OSError as error:
        print(f"lst-import-eval: cannot write --output {args.output} "
              f"({error.strerror or error})", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} items to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(import_main())
