"""Praat TextGrid word tiers, as the Montreal Forced Aligner writes them.

`read_textgrid` reads one interval tier from a TextGrid in either of Praat's text formats:

- long ("ooTextFile" with `xmin = 0`, `intervals [1]:` ... labels), MFA's default;
- short (the same values, one per line, without labels; `File type = "ooTextFile short"` from older
  writers is read too).

Both formats are the same stream of values (numbers, quoted strings, `<exists>` flags) with or
without labels around them, so one tokenizer that drops labels and `[n]` indices reads both, as
Praat's own reader does. Strings escape `"` as `""`. Files may be UTF-8 or UTF-16 (with a BOM, as
Praat writes it, or without: the `File type` the file starts with tells the byte order). Praat's
binary format is refused, naming it.

`write_textgrid` writes the long format, which Praat and MFA read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import read_bounded_bytes


class TextGridError(DocumentError):
    """A TextGrid file is malformed or lacks the requested tier."""

    kind = "malformed TextGrid"


@dataclass(frozen=True)
class Interval:
    start: float
    """Seconds."""
    end: float
    """Seconds."""
    label: str
    """The word; empty for silence."""


# One value token: a quoted string ("" escapes a quote), a flag, or a number. Labels (`xmin =`,
# `intervals: size =`, `tiers? <exists>`: a word before `=`, `:`, `[`, `<` or another word) and
# indices (`[3]`) are matched so that their digits are not read as values. Anything else in a
# value's place is a malformed value, kept so the error names it and its line: a bare word right
# after `=` or on a line of its own (the short format's `nan`), and Praat's `--undefined--`. Passed
# over, it let the next value be read in its place.
_TOKEN = re.compile(
    r'"(?P<string>(?:[^"]|"")*)"'
    r"|(?P<flag><exists>|<absent>)"
    r"|(?P<index>\[[^\]\n]*\])"
    r"|(?P<undefined>--undefined--)"
    r"|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<word>[A-Za-z_]\w*\??(?![\w?])(?=[ \t]*[=:\[<]|[ \t]+[A-Za-z_]))"
    r"|(?P<bare>[A-Za-z_][^\s\"]*)"
    r"|=[ \t]*(?P<malformed>[^\s\"\d.+-][^\s]*)"
    r"|(?P<other>[^\s])"
)


@dataclass(frozen=True)
class _Token:
    kind: str  # "string" | "flag" | "number" | "malformed"
    value: str
    line: int


# Praat's binary format ("Save as binary file"), which this reader does not read.
_PRAAT_BINARY = b"ooBinaryFile"
# A TextGrid starts with `File type`; in UTF-16 without a byte-order mark, that tells the order.
_UTF16_WITHOUT_MARK = {"File".encode(order): order for order in ("utf-16-le", "utf-16-be")}


def _decode(path: Path, raw: bytes) -> str:
    encoding = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    encoding = _UTF16_WITHOUT_MARK.get(raw[:8], encoding)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[:error.start].decode(encoding, errors="replace").count("\n") + 1
        name = "UTF-16" if encoding.startswith("utf-16") else "UTF-8"
        raise TextGridError(f"{path}:{line}: not {name} text ({error.reason} at byte "
                            f"{error.start}); save the TextGrid as UTF-8, or as UTF-16 with a "
                            f"byte-order mark") from None


def _tokens(text: str) -> Iterator[_Token]:
    line = 1
    last = 0
    for match in _TOKEN.finditer(text):
        line += text.count("\n", last, match.start())
        last = match.start()
        kind = match.lastgroup
        if kind in ("string", "flag", "number", "malformed"):
            yield _Token(kind, match.group(kind), line)
        elif kind in ("undefined", "bare"):
            yield _Token("malformed", match.group(kind), line)


class _Cursor:
    """Reads values in order, naming the file and line on any surprise."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.tokens = list(_tokens(text))
        self.pos = 0

    def _next(self, kind: str, what: str) -> _Token:
        if self.pos >= len(self.tokens):
            line = self.tokens[-1].line if self.tokens else 1
            raise TextGridError(f"{self.path}:{line}: file ends where {what} was expected")
        token = self.tokens[self.pos]
        if token.kind != kind:
            raise TextGridError(f"{self.path}:{token.line}: expected {what} ({kind}), "
                                f"found {token.value!r}")
        self.pos += 1
        return token

    def string(self, what: str) -> str:
        return self._next("string", what).value.replace('""', '"')

    def _finite(self, what: str) -> tuple[_Token, float]:
        token = self._next("number", what)
        value = float(token.value)
        if not math.isfinite(value):
            raise TextGridError(f"{self.path}:{token.line}: {what} is {token.value}, beyond the "
                                f"range of a floating-point number")
        return token, value

    def number(self, what: str) -> float:
        return self._finite(what)[1]

    def count(self, what: str) -> int:
        token, value = self._finite(what)
        if value != int(value) or value < 0:
            raise TextGridError(f"{self.path}:{token.line}: {what} must be a non-negative "
                                f"integer, found {token.value}")
        return int(value)

    def refuse_another_tier(self, tier: str, number: int) -> None:
        """Refuse a tier named `tier` after the cursor, tier `number` having that name: its words
        would be left out. A tier's header is its class and its name, the only two strings in
        a row outside a point tier's mark and the next tier's class."""
        later = self.tokens[self.pos:]
        for header, name in zip(later, later[1:], strict=False):
            if (header.kind == name.kind == "string" and header.value == "IntervalTier"
                    and name.value.replace('""', '"') == tier):
                raise TextGridError(f"{self.path}:{name.line}: a second tier named {tier!r} "
                                    f"(tier {number} has that name too); one TextGrid holds "
                                    f"the words of one utterance: split the file, or rename "
                                    f"one of the tiers")

    def refuse_uncounted(self, tier: str, size: int, what: str) -> None:
        """Refuse a tier whose count `size` is smaller than the `what` (intervals or points) it
        holds: after its last counted one comes a number (the next one's time), not the next
        tier's class or the end of the file. Read as it stood, the rest was left out silently."""
        if self.pos < len(self.tokens) and self.tokens[self.pos].kind == "number":
            raise TextGridError(f"{self.path}:{self.tokens[self.pos].line}: tier {tier!r} says it "
                                f"holds {size} {what} but more follow; fix its size (intervals: "
                                f"size = N in the long format)")

    def line(self) -> int:
        return self.tokens[min(self.pos, len(self.tokens) - 1)].line if self.tokens else 1


def read_textgrid(path: str | Path, tier: str = "words") -> list[Interval]:
    """The intervals of the interval tier named `tier`, in file order.

    Raises TextGridError (a DocumentError) naming the file and line for a malformed file,
    listing the tiers present when `tier` is missing, and naming a second tier of its name.
    """
    path = Path(path)
    raw = read_bounded_bytes(path, TextGridError, "TextGrid")
    if raw.startswith(_PRAAT_BINARY):  # read as text, its first bytes were "expected" a string
        raise TextGridError(f"{path}: a binary Praat file (it starts with {_PRAAT_BINARY!r}), not "
                            f"a text TextGrid; save it from Praat with \"Save as text file\" "
                            f"(the long text format, as MFA writes it)")
    cursor = _Cursor(path, _decode(path, raw))
    # "ooTextFile short": what older Praat, the Penn Phonetics Lab Forced Aligner and praatio
    # write on short-format files (whose next line is often just "TextGrid").
    if cursor.string("the file type") not in ("ooTextFile", "ooTextFile short"):
        raise TextGridError(f"{path}:1: not a Praat text file (File type is not \"ooTextFile\")")
    if cursor.string("the object class") != "TextGrid":
        raise TextGridError(f"{path}:2: not a TextGrid (Object class is not \"TextGrid\")")
    cursor.number("the grid's xmin")
    cursor.number("the grid's xmax")
    if cursor._next("flag", "the tiers flag").value == "<absent>":
        raise TextGridError(f"{path}: has no tiers; expected a tier named {tier!r}",
                            kind="no such word tier")
    num_tiers = cursor.count("the number of tiers")

    names = []
    for _ in range(num_tiers):
        tier_class = cursor.string("a tier class")
        name = cursor.string("a tier name")
        names.append(name)
        cursor.number("the tier's xmin")
        cursor.number("the tier's xmax")
        size = cursor.count("the number of intervals or points")
        if tier_class == "IntervalTier":
            intervals = []
            for _ in range(size):
                line = cursor.line()
                start = cursor.number("an interval's xmin")
                end = cursor.number("an interval's xmax")
                label = cursor.string("an interval's text")
                if end < start:
                    raise TextGridError(f"{path}:{line}: interval [{start}, {end}] of tier "
                                        f"{name!r} ends before it starts")
                intervals.append(Interval(start, end, label))
            cursor.refuse_uncounted(name, size, "intervals")
            if name == tier:
                cursor.refuse_another_tier(tier, len(names))
                return intervals
        elif tier_class == "TextTier":
            for _ in range(size):
                cursor.number("a point's time")
                cursor.string("a point's mark")
            cursor.refuse_uncounted(name, size, "points")
            if name == tier:
                raise TextGridError(f"{path}: tier {tier!r} is a point tier (TextTier); "
                                    f"word alignments need an interval tier",
                                    kind="no such word tier")
        else:
            raise TextGridError(f"{path}:{cursor.line()}: unknown tier class {tier_class!r}")
    raise TextGridError(f"{path}: no tier named {tier!r}; the file has tiers {names}; "
                        f"pass the word tier's name", kind="no such word tier")


def _is_time(value) -> bool:
    """`value` is a time a TextGrid can hold: a finite real number of seconds, not negative."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(seconds) and seconds >= 0.0


def _quote(label: str) -> str:
    return '"' + label.replace('"', '""') + '"'


def write_textgrid(path: str | Path, intervals: Sequence[Interval], xmax: float | None = None,
                   tier: str = "words") -> None:
    """Write one interval tier as a long-format TextGrid starting at time 0.

    Praat needs an interval tier to cover its whole time range, so gaps between the given
    intervals (and before the first, and up to `xmax`) are written as empty intervals. `xmax`
    defaults to the end of the last interval. Overlapping or unordered intervals raise, as do
    times that are not finite numbers of seconds >= 0 (NaN, inf, negative): `read_textgrid`
    would refuse the file written with them. Nothing is written when the intervals are refused.
    """
    for number, interval in enumerate(intervals, 1):
        for name, value in (("start", interval.start), ("end", interval.end)):
            if not _is_time(value):
                raise TextGridError(
                    f"{path}: interval {number} of {len(intervals)} ({interval}) has {name} "
                    f"{value!r}; times must be finite seconds >= 0 (check the alignment that "
                    f"gave this interval)")
    if xmax is not None and not _is_time(xmax):
        raise TextGridError(f"{path}: xmax {xmax!r} is not a finite number of seconds >= 0")
    end_time = float(intervals[-1].end) if intervals else 0.0
    xmax = end_time if xmax is None else float(xmax)
    if xmax < end_time:
        raise TextGridError(f"{path}: xmax {xmax} is before the last interval's end {end_time}")

    filled: list[Interval] = []
    time = 0.0
    for interval in intervals:
        if interval.start < time or interval.end < interval.start:
            raise TextGridError(f"{path}: interval {interval} overlaps the previous one, is out "
                                f"of order or ends before it starts")
        if interval.start > time:
            filled.append(Interval(time, interval.start, ""))
        filled.append(interval)
        time = interval.end
    if xmax > time or not filled:
        filled.append(Interval(time, xmax, ""))

    lines = [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "xmin = 0.0",
        f"xmax = {xmax!r}",
        "tiers? <exists>",
        "size = 1",
        "item []:",
        "    item [1]:",
        '        class = "IntervalTier"',
        f"        name = {_quote(tier)}",
        "        xmin = 0.0",
        f"        xmax = {xmax!r}",
        f"        intervals: size = {len(filled)}",
    ]
    for i, interval in enumerate(filled, 1):
        lines += [
            f"        intervals [{i}]:",
            f"            xmin = {float(interval.start)!r}",
            f"            xmax = {float(interval.end)!r}",
            f"            text = {_quote(interval.label)}",
        ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
