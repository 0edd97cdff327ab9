"""Story-completion items (docs/evaluation.md#the-item-format): read a JSONL file, validate it, encode the text.

One item per line:

    {"id": "storycloze-00007",
     "context": {"text": "...", "units": [17, 17, 402, ...], "segments": [["she", 5], ["[SIL]", 3], ...]},
     "endings": [{"text": "...", "units": [...], "segments": [...]}, ...],
     "label": 1}

`units` are raw codebook values (0 .. num_units-1, not joint ids); `segments` align them to words,
in order, `[SIL]` for silences, and sum to `len(units)`. `units` and `segments` may be left out of
a text-only set; such items can only be scored T->T. `segments` may be left out when the units are
known but not aligned: static patching does not need them, aligned patching refuses the item.

Every problem is an `ItemError` naming the file, the line and the item id. Format problems
(missing endings, a label out of range, units outside the codebook, ...) are raised while loading,
before any model work; an item that lacks what a mode or patching needs (units for a speech mode,
segments for aligned patching) is refused by `scoring.check_items_for_mode` (lst-eval and training
call it before any scoring).
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from megatron_lst.data.input_files import MAX_LARGE_TEXT_BYTES, read_bounded_bytes
from megatron_lst.data.json_objects import RepeatedKeyError, loads_unique_keys
from megatron_lst.tokenizer.vocab import JointVocab

SILENCE_WORD = "[SIL]"


class ItemError(ValueError):
    """An evaluation item that cannot be scored; the message names the item and where it is."""


class PieceEncoder(Protocol):
    """What items need from a text tokenizer (`megatron_lst.tokenizer.TextTokenizer` has it)."""

    @property
    def space_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Utterance:
    """One context or ending, in both modalities where the item has them."""

    text: str
    text_ids: np.ndarray  # [T] int32 tokenizer pieces of `text`
    units: np.ndarray | None  # [U] int64 raw unit values; None for a text-only item
    segment_units: np.ndarray | None  # [G] int64 units per word/silence, sums to U; None: unaligned
    segment_is_silence: np.ndarray | None  # [G] bool

    @property
    def has_speech(self) -> bool:
        return self.units is not None


@dataclass(frozen=True)
class EvalItem:
    id: str
    context: Utterance
    endings: tuple[Utterance, ...]
    label: int
    space_id: int
    """The tokenizer's word-boundary piece: it ends a text run that a speech run follows."""
    source: str
    """"file:line" where the item was read (or where an importer made it), for error messages."""

    def describe(self) -> str:
        return f"item {self.id!r} ({self.source})"


def load_items(path: str | Path, tokenizer: PieceEncoder, vocab: JointVocab) -> list[EvalItem]:
    """Read, validate and tokenize every item of a JSONL file (blank lines are skipped)."""
    return records_with_unique_ids(
        Path(path), "evaluation items file", "an item",
        lambda record, _, where: item_from_record(record, tokenizer, vocab, where),
        "write one story-completion item per line (docs/evaluation.md#the-item-format)")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_Record = TypeVar("_Record", bound=_HasId)


def records_with_unique_ids(path: Path, what: str, value: str,
                            parse: Callable[[object, int, str], _Record],
                            fill_hint: str) -> list[_Record]:
    """`parse(JSON value, line number, "FILE:LINE")` of every non-blank line of the JSON Lines
    file `path`, in file order (read by `json_lines`: `what` names the file, `value` what a line
    holds, with its article: "an item"). An ItemError names the line whose record has the `id`
    of an earlier one, or the file when it holds no record (`fill_hint` says what to write)."""
    noun = value.split()[-1]
    records, line_of_id = [], {}
    for number, where, json_value in json_lines(path, what, value):
        record = parse(json_value, number, where)
        if record.id in line_of_id:
            raise ItemError(f"{where}: the id {record.id!r} is also the id of line "
                            f"{line_of_id[record.id]}; give each {noun} its own id")
        line_of_id[record.id] = number
        records.append(record)
    if not records:
        raise ItemError(f"{path} holds no {noun}s (blank lines only); {fill_hint}")
    return records


def json_lines(path: Path, what: str, value: str) -> Iterator[tuple[int, str, object]]:
    """`(line number, "FILE:LINE", JSON value)` of every non-blank line of the JSON Lines file
    `path`, read by `text_lines` (`what` names the file in its errors) and `json_line` (`value`
    names what a line holds)."""
    for number, line in enumerate(text_lines(path, what), start=1):
        if line.strip():
            where = f"{path}:{number}"
            yield number, where, json_line(line, where, value)


def text_lines(path: Path, what: str = "evaluation items file") -> list[str]:
    """The lines of a UTF-8 text file, split at line ends only (`editor_lines`), so line numbers
    stay an editor's. A byte-order mark that starts a line is dropped: files saved with one,
    and joined with `cat`, hold one at the start of each. A file that is not UTF-8 is an
    ItemError naming its first line that is not (or the UTF-16 it is). A path that is not a
    regular file (a device such as /dev/zero, a FIFO) or of more than MAX_LARGE_TEXT_BYTES is an
    ItemError naming it (as `what`)."""
    data = read_bounded_bytes(path, ItemError, what, MAX_LARGE_TEXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ItemError(_not_utf8(path, data, err.start)) from None
    return [line.removeprefix("\ufeff") for line in editor_lines(text)]


def editor_lines(text: str) -> list[str]:
    """`text` split into the lines an editor shows and `sed -n`/`grep -n` count: at LF, the CR
    of a CRLF dropped and a lone CR kept inside its line (it split one JSON line into two
    halves, both refused, and shifted every later line number); in a text of CR line ends only
    (classic Mac OS), at CR. Never at U+2028, U+0085, a form feed or the other characters
    `str.splitlines` also splits at, which a line (a JSON string) may hold."""
    if "\n" not in text:
        return text.split("\r")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _not_utf8(path: Path, data: bytes, start: int) -> str:
    """Why `data`, the bytes of `path`, is not UTF-8 text, whose first bad byte is at `start`."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return (f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as "
                f"UTF-8")
    line = data.count(b"\n", 0, start) + 1
    return (f"{path}:{line}: byte 0x{data[start]:02x} is not UTF-8 (text in another encoding, "
            f"or not text); save the file as UTF-8")


def json_line(line: str, where: str, what: str) -> object:
    """The JSON value of one line of a JSONL file; an ItemError naming `where` (file:line) when
    the line is not JSON, repeats a key in one object, or is JSON that Python refuses to read as
    `what`."""
    try:
        return loads_unique_keys(line)
    except RepeatedKeyError as err:
        raise ItemError(f"{where}: {err}") from None
    except json.JSONDecodeError as err:
        if "\x00" in line:  # what UTF-16 without a byte-order mark reads as in UTF-8
            raise ItemError(f"{where}: holds NUL characters, which JSON text never does: is the "
                            f"file UTF-16, or not text? Save it as UTF-8") from None
        raise ItemError(f"{where}: not a JSON object ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ItemError(f"{where}: not {what} (JSON nested too deeply to read)") from None
    except ValueError:  # an integer literal past Python's digit limit: no field takes one
        raise ItemError(f"{where}: not {what} (it holds an integer of more than "
                        f"{sys.get_int_max_str_digits()} digits, which no field takes); fix "
                        f"that line") from None


def item_from_record(record: dict, tokenizer: PieceEncoder, vocab: JointVocab,
                     source: str) -> EvalItem:
    """One validated item from its JSON record; `source` says where it came from."""
    if not isinstance(record, dict):
        raise ItemError(f"{source}: an item must be a JSON object, got {type(record).__name__}")
    item_id = record.get("id")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or not str(item_id).strip():
        raise ItemError(f"{source}: the item has no \"id\" (a non-empty string or an integer)")
    where = f"item {str(item_id)!r} ({source})"
    for key in ("context", "endings", "label"):
        if key not in record:
            raise ItemError(f"{where}: missing \"{key}\"")
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2:
        count = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise ItemError(f"{where}: \"endings\" must list at least 2 endings, got {count}")
    label = record["label"]
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise ItemError(f"{where}: label {label!r} is not an ending index 0..{len(endings) - 1}")
    context = _utterance(record["context"], tokenizer, vocab, f"{where}, context")
    parsed = tuple(_utterance(e, tokenizer, vocab, f"{where}, ending {i}")
                   for i, e in enumerate(endings))
    if len({u.has_speech for u in (context, *parsed)}) > 1:
        raise ItemError(f"{where}: some parts have \"units\" and some do not; give units for the "
                        f"context and every ending, or for none (a text-only item)")
    return EvalItem(str(item_id), context, parsed, label, tokenizer.space_id, source)


def _utterance(record: dict, tokenizer: PieceEncoder, vocab: JointVocab, where: str) -> Utterance:
    if not isinstance(record, dict):
        raise ItemError(f"{where}: must be an object with \"text\" (and \"units\", \"segments\")")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ItemError(f"{where}: \"text\" is missing or empty")
    refuse_lone_surrogate(text, f"{where}: \"text\"")
    # Whitespace around the text encodes to word-boundary pieces of their own: a leading one was
    # scored as an ending's first token, a trailing one doubled the space before <s> (T->S)
    text_ids = np.asarray(tokenizer.encode(text.strip()), dtype=np.int32)
    if not text_ids.size:  # an ending of no pieces has no score (0 / 0 tokens per token)
        raise ItemError(f"{where}: the tokenizer turns \"text\" {text!r} into no pieces; write "
                        f"it in words the tokenizer knows")
    if text_ids.max() >= vocab.text_size:
        raise ItemError(f"{where}: the tokenizer gave piece {int(text_ids.max())}, outside the "
                        f"vocabulary's {vocab.text_size} text ids; use the tokenizer the model "
                        f"was trained with")
    units = segment_units = segment_is_silence = None
    if record.get("units") is not None:
        units = _units(record["units"], vocab, where)
        if record.get("segments") is not None:
            segment_units, segment_is_silence = _segments(record["segments"], len(units), where)
    elif record.get("segments") is not None:
        raise ItemError(f"{where}: has \"segments\" but no \"units\"")
    return Utterance(text, text_ids, units, segment_units, segment_is_silence)


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (a JSON escape such as "\\ud83d" without its
    other half, or a byte that was not UTF-8 in a command line), which no tokenizer can encode;
    None when every character is one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def refuse_lone_surrogate(text: str, what: str) -> None:
    """Raise ItemError naming `what` (where `text` is in the items file) and the first lone
    surrogate of `text`, if it holds one."""
    bad = lone_surrogate(text)
    if bad is not None:
        raise ItemError(f"{what} holds {text[bad]!r} at character {bad}, half of a UTF-16 "
                        f"surrogate pair and no character; write the character itself (or both "
                        f"halves of its escape)")


def _units(values, vocab: JointVocab, where: str) -> np.ndarray:
    if not isinstance(values, list) or not values:
        raise ItemError(f"{where}: \"units\" must be a non-empty list of unit values")
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in values):
        raise ItemError(f"{where}: \"units\" must hold integers")
    bad = next((i for i, u in enumerate(values) if not 0 <= u < vocab.num_units), None)
    if bad is not None:  # checked before numpy, which overflows on integers beyond int64
        raise ItemError(f"{where}: unit {values[bad]} at position {bad} is outside the codebook "
                        f"0..{vocab.num_units - 1}; were the units made with another codebook "
                        f"(--num-units)?")
    return np.asarray(values, dtype=np.int64)


def _segments(values, num_units: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(values, list) or not all(
            isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str)
            and isinstance(s[1], int) and not isinstance(s[1], bool) and s[1] >= 0
            for s in values):
        raise ItemError(f"{where}: \"segments\" must be a list of [word, number of units >= 0]")
    covered = sum(n for _, n in values)  # Python ints: numpy would overflow or wrap around
    if covered != num_units:
        raise ItemError(f"{where}: segments cover {covered} units but \"units\" has "
                        f"{num_units}")
    counts = np.array([n for _, n in values], dtype=np.int64)
    is_silence = np.array([w == SILENCE_WORD for w, _ in values], dtype=bool)
    kept = counts > 0  # a word with no frames has no units to patch
    return counts[kept], is_silence[kept]


def check_items_for_speech(items: Sequence[EvalItem], mode: str) -> None:
    """Raise naming the first text-only item when `mode` needs speech."""
    for item in items:
        if not item.context.has_speech:
            raise ItemError(f"{item.describe()}: has no units, so it cannot be scored {mode}; "
                            f"evaluate text-only sets with --modes tt (T->T; the arrow "
                            f"needs quotes in a shell)")
