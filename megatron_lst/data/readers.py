"""Readers that turn raw corpora into documents (docs/data.md#input-formats).

Three input forms:

- the reference implementation's "on the fly" JSONL (`read_reference_jsonl`): one document per
  line, `{"file_id": ..., "interleaved": "<LST MODE SEP>TEXT w <LST MODE SEP>HUBERT u u ..."}`;
- MFA TextGrid word tiers plus per-utterance unit files (`read_textgrid_corpus`);
- text JSONL (`read_text_jsonl`): one text-only document per line, `{"text": ...}`.

Aligned readers yield `AlignedDocument`s whose units are raw values and whose words are tokenized
with `TextTokenizer.encode_words`; text readers yield int32 arrays of text ids. Every document
comes with its source location (`file:line`, or the utterance's files). A bad input raises
`DocumentError` naming that location; with `skip_bad=True` it is skipped instead and recorded
in the `ReadReport` passed in (its location, the error's kind and message).

Blank lines in JSONL files are not documents and are passed over silently; a byte-order mark
at the start of a file is dropped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tokenize
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.input_files import (
    bounded_lines,
    check_npy_data_size,
    checked_file_size,
    read_bounded_bytes,
)
from megatron_lst.data.manifest import Counts
from megatron_lst.data.textgrid import read_textgrid
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer, load_text_tokenizer
from megatron_lst.tokenizer.vocab import VocabularyError

SEGMENT_SEP = "<LST MODE SEP>"
SILENCE_WORD = "[SIL]"
# Word-tier labels of a silence, compared in lower case: MFA's ("", "sp", "sil", "<eps>"), Kaldi
# lexicons' ("<sil>", "!sil") and this format's own silence word (SILENCE_WORD, "[SIL]").
TEXTGRID_SILENCES = frozenset({"", "sp", "sil", "<eps>", "<sil>", "!sil", SILENCE_WORD.lower()})
# Word-tier labels of speech whose words the aligner did not know, compared in lower case: MFA's
# out-of-vocabulary word ("<unk>", Kaldi recipes' "<UNK>"), aligned to its speech-noise phone
# "spn" (which also stands for coughs or laughter transcribed as bracketed words). The words
# are unknown: their frames are kept as a segment without text, as a silence's are, and counted
# (`Counts.unknown_words`), not trained as the text "<unk>".
TEXTGRID_UNKNOWN_WORDS = frozenset({"<unk>", "spn"})
_TEXTGRID_MARKERS = TEXTGRID_SILENCES | TEXTGRID_UNKNOWN_WORDS
UNIT_FILE_SUFFIXES = (".npy", ".txt", ".km", ".units")

Document = AlignedDocument | np.ndarray


@dataclass
class SourceDocument:
    document: Document
    where: str
    """`file:line` or the utterance's files: where to look when this document is wrong."""
    counts: Counts
    """This document's contribution to the manifest counts."""


@dataclass(frozen=True)
class Skip:
    """One document skipped as bad."""

    where: str
    """The input it came from: `file:line`, or the utterance's TextGrid."""
    kind: str
    """The sort of problem (`DocumentError.kind`), the same for every input that has it."""
    message: str


@dataclass
class ReadReport:
    """What a reader skipped (with `skip_bad=True`): every skipped document, in input order."""

    skipped: list[Skip] = field(default_factory=list)

    @property
    def bad_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, where: str, error: DocumentError | VocabularyError) -> None:
        # A VocabularyError here is the tokenizer refusing a document's text.
        kind = error.kind if isinstance(error, DocumentError) else "text the tokenizer refused"
        self.skipped.append(Skip(where, kind, str(error)))


def parse_units_text(text: str, where: str, num_tokens: int | None = None) -> np.ndarray:
    """[U] int64 units of a whitespace-separated string of integers.

    `num_tokens` is `len(text.split())` when the caller already knows it.
    """
    if num_tokens is None:
        num_tokens = len(text.split())
    if num_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    with warnings.catch_warnings():
        # numpy warns (and stops) at the first token that is not an integer: make that an error.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            units = np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            units = None
    # numpy's separator also matches no whitespace at all ("1+2" reads as 1, 2): count tokens.
    if units is not None and len(units) == num_tokens:
        limits = np.iinfo(np.int64)
        if ((units == limits.max) | (units == limits.min)).any():  # numpy saturates, silently
            beyond = next(token for token in text.split() if _beyond_int64(token))
            shown = beyond if len(beyond) <= 40 else f"{beyond[:20]}... ({len(beyond)} characters)"
            raise DocumentError(f"{where}: speech unit {shown} is beyond 64-bit integers, "
                                f"outside any codebook", kind="unit outside the codebook")
        return units
    for token in text.split():
        try:
            int(token)
        except ValueError:
            raise DocumentError(f"{where}: speech unit {token!r} is not an integer",
                                kind="units not integers") from None
    raise DocumentError(f"{where}: speech units are not whitespace-separated integers",
                        kind="units not integers")


def _beyond_int64(token: str) -> bool:
    """Whether an integer token lies at or past int64's ends, where numpy saturates. Python's
    `int` refuses strings of over 4300 digits, so the digits are counted first."""
    if len(token.lstrip("+-").lstrip("0")) > 19:
        return True
    limits = np.iinfo(np.int64)
    return not limits.min < int(token) < limits.max


def parse_reference_interleaved(interleaved: str, tokenizer: TextTokenizer, num_units: int,
                                where: str) -> tuple[AlignedDocument, Counts]:
    """One reference-format document.

    Pairing follows the reference parser: a TEXT segment takes the HUBERT segment right after it
    (none: the word has 0 units); a HUBERT segment with no TEXT before it, or after an empty TEXT,
    is a silence; `[SIL]` is a silence. A TEXT payload of several words stays one segment (the
    reference keeps only its first word). Silences with no units carry nothing and are dropped.
    """
    parts = interleaved.split(SEGMENT_SEP)
    if parts[0].strip():
        raise DocumentError(f"{where}: text before the first {SEGMENT_SEP!r}: "
                            f"{parts[0][:40]!r}", kind="malformed segments")
    seg_texts: list[str] = []  # "" for a silence
    seg_units: list[str] = []
    counts = Counts(documents=1)
    pending_text: str | None = None  # a TEXT payload waiting for its HUBERT segment

    def close(text: str | None, units: str) -> None:
        if text is None or text == SILENCE_WORD or not text:
            if not units or units.isspace():
                counts.empty_silences_dropped += 1
                return
            text = ""
            counts.silences += 1
        else:
            words = text.split()
            if SILENCE_WORD in words:
                raise DocumentError(f"{where}: segment {len(seg_texts)} mixes {SILENCE_WORD} "
                                    f"with words: {text!r}", kind="malformed segments")
            counts.words += len(words)
            text = " ".join(words)
        seg_texts.append(text)
        seg_units.append(units)

    for index, part in enumerate(parts[1:]):
        head, _, payload = part.partition(" ")
        if head == "TEXT":
            if pending_text is not None:
                close(pending_text, "")
            pending_text = payload.strip()
        elif head == "HUBERT":
            close(pending_text, payload)
            pending_text = None
        else:
            raise DocumentError(f"{where}: segment {index} has unknown head {head!r}; expected "
                                f"TEXT or HUBERT after {SEGMENT_SEP!r}", kind="malformed segments")
    if pending_text is not None:
        close(pending_text, "")

    if not seg_texts:
        raise DocumentError(f"{where}: empty document (no words and no units)",
                            kind="empty document")
    text_ids, seg_text_len = tokenizer.encode_words(seg_texts)
    seg_unit_len = np.fromiter((len(u.split()) for u in seg_units), dtype=np.int32,
                               count=len(seg_units))
    unit_ids = parse_units_text(" ".join(seg_units), where, int(seg_unit_len.sum()))
    return _finish(text_ids, unit_ids, seg_text_len, seg_unit_len, seg_texts, num_units, where,
                   counts)


def _finish(text_ids: np.ndarray, unit_ids: np.ndarray, seg_text_len: np.ndarray,
            seg_unit_len: np.ndarray, seg_texts: list[str], num_units: int, where: str,
            counts: Counts) -> tuple[AlignedDocument, Counts]:
    if not len(unit_ids):
        raise DocumentError(f"{where}: no speech units (no HUBERT payloads, or an empty unit "
                            f"file: audio shorter than one unit frame has none); an aligned "
                            f"document needs units: leave such utterances out (--skip-bad), and "
                            f"give text-only documents to --input-format text-jsonl",
                            kind="no speech units")
    empty_words = np.flatnonzero(seg_text_len == 0)
    for i in empty_words:
        if seg_texts[i]:
            raise DocumentError(f"{where}: word {seg_texts[i]!r} encodes to no text pieces",
                                kind="word without text pieces")
    if len(unit_ids) and (unit_ids.min() < 0 or unit_ids.max() >= num_units):
        position = int(np.flatnonzero((unit_ids < 0) | (unit_ids >= num_units))[0])
        segment = int(np.searchsorted(np.cumsum(seg_unit_len), position, side="right"))
        raise DocumentError(f"{where}: speech unit {int(unit_ids[position])} (unit {position}, "
                            f"segment {segment}) is outside the codebook 0..{num_units - 1}; "
                            f"pass the codebook size the units were made with (--num-units)",
                            kind="unit outside the codebook")
    doc = AlignedDocument(text_ids, unit_ids.astype(np.int32), seg_text_len, seg_unit_len)
    doc.validate(num_units, where)
    counts.segments += doc.num_segments
    counts.text_pieces += len(text_ids)
    counts.units += len(unit_ids)
    return doc, counts


def _check_utf8(text: str, where: str, what: str) -> str:
    """`text`, unless it holds a byte that is not UTF-8 (JSONL is read with "surrogateescape",
    which keeps such a byte as a surrogate) or a lone surrogate (a JSON escape such as
    `\\ud800`): no tokenizer can encode either, so either is a DocumentError naming `where`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        problem = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
                   if 0xDC80 <= code <= 0xDCFF else
                   f"a lone surrogate \\u{code:04x} (half of a UTF-16 pair)")
        raise DocumentError(f"{where}: {what} holds {problem}, at character {error.start}; "
                            f"write the corpus as UTF-8 text", kind="not UTF-8") from None
    return text


def _json_record(line: str, key: str, expected: str, where: str) -> dict:
    """The JSON object of one corpus `line`, which must hold a string under `key` (`expected`
    says so in the error); DocumentError naming `where` for anything else."""
    _check_utf8(line, where, "the line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DocumentError(f"{where}: not valid JSON ({error.msg} at column {error.colno})"
                            , kind="not valid JSON") from None
    except RecursionError:
        raise DocumentError(f"{where}: not a document (JSON nested too deeply to read)",
                            kind="not valid JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise DocumentError(f"{where}: expected an object with {expected}, got "
                            f"{line.strip()[:60]!r}", kind="no document field")
    return record


def parse_reference_line(line: str, tokenizer: TextTokenizer, num_units: int,
                         where: str) -> tuple[AlignedDocument, Counts]:
    """One JSON line of the reference "on the fly" format."""
    record = _json_record(line, "interleaved", 'an "interleaved" string', where)
    file_id = record.get("file_id")
    _check_utf8(record["interleaved"], where, '"interleaved"')
    return parse_reference_interleaved(record["interleaved"], tokenizer, num_units,
                                       f"{where} ({file_id})" if file_id else where)


def parse_text_line(line: str, tokenizer: TextTokenizer, key: str,
                    where: str) -> tuple[np.ndarray, Counts]:
    """One JSON line of a text corpus: [T] int32 text ids of `record[key]`."""
    record = _json_record(line, key, f"a {key!r} string", where)
    text = _check_utf8(record[key], where, repr(key))
    if not text.strip():
        raise DocumentError(f"{where}: empty document (no text under {key!r})",
                            kind="empty document")
    ids = np.array(tokenizer.encode(text), dtype=np.int32)
    return ids, Counts(documents=1, words=len(text.split()), text_pieces=len(ids))


# The first bytes of a compressed file: (compressor, the command that decompresses it).
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
                     (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"BZh", "bzip2", "bunzip2 -k"))


def refuse_compressed(path: str | Path) -> None:
    """A DocumentError when `path` begins as a gzip, zstd, xz or bzip2 file does: read as text,
    its every line would be refused as not UTF-8 (and all of them skipped under --skip-bad).
    A pipe is not looked at: the bytes looked at would be gone from it."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as stream:
        start = stream.read(6)
    for magic, compressor, command in _COMPRESSED_MAGIC:
        if start.startswith(magic) and (compressor != "bzip2" or start[3:4].isdigit()):
            raise DocumentError(f"{path} is {compressor}-compressed, and corpora are read as "
                                f"UTF-8 text; decompress it first ({command} {path}) and pass "
                                f"the decompressed file")


def open_corpus_lines(path: str | Path):
    """A corpus file (JSONL, or plain text for tools/train_tokenizer.py) opened for its lines,
    a context manager giving them: a path that is neither a regular file nor a pipe (a device,
    a folder) and a compressed file are refused (`refuse_compressed`), and a line longer than
    any document's is refused at that line (`bounded_lines`); a leading byte-order mark (what
    Windows editors and some exporters write) is dropped, else the first line would not read
    as JSON, or its first word would begin with U+FEFF; a byte that is not UTF-8 is kept as a
    surrogate (U+DC80..U+DCFF), for the caller to name with its line. Lines end as
    `_newline_of` says, untranslated ("\r\n" stays)."""
    checked_file_size(path, DocumentError, "corpus", pipe_allowed=True)
    refuse_compressed(path)
    return _CorpusLines(path)


class _CorpusLines:
    """The lines of an opened corpus file (`open_corpus_lines`), closed on leaving `with`."""

    def __init__(self, path: str | Path):
        self._stream = open(path, encoding="utf-8-sig", errors="surrogateescape",  # noqa: SIM115
                            newline=_newline_of(path))
        self._path = path

    def __enter__(self) -> Iterator[str]:
        return bounded_lines(self._stream, self._path, functools.partial(
            DocumentError, kind="line too long"))

    def __exit__(self, *exc_info) -> None:
        self._stream.close()


_LINE_END_SAMPLE_BYTES = 1 << 16


def _newline_of(path: str | Path) -> str | None:
    """How to split the lines of the corpus file `path` (`open`'s `newline`): at LF only ("\n":
    a lone CR stays inside its line, as `sed -n` and `grep -n` count lines; read as a line end,
    it split a JSON line into two refused halves and shifted every later line number), or, for
    a file whose first 64 KiB hold a CR but no LF (classic Mac OS line ends), at CR too (None).
    A pipe is not looked at (`refuse_compressed`): it is split at LF."""
    if not Path(path).is_file():
        return "\n"
    with open(path, "rb") as stream:
        start = stream.read(_LINE_END_SAMPLE_BYTES)
    return None if b"\r" in start and b"\n" not in start else "\n"


def _read_lines(path: Path, parse, skip_bad: bool, report: ReadReport | None
                ) -> Iterator[SourceDocument]:
    with open_corpus_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc, counts = parse(line, where)
            except (DocumentError, VocabularyError) as error:
                if not skip_bad:
                    raise
                (report or ReadReport()).skip(where, error)
                continue
            yield SourceDocument(doc, where, counts)


def read_reference_jsonl(path: str | Path, tokenizer: TextTokenizer, num_units: int = 502,
                         skip_bad: bool = False, report: ReadReport | None = None
                         ) -> Iterator[SourceDocument]:
    """Aligned documents of a reference "on the fly" JSONL file, one per non-blank line."""
    return _read_lines(Path(path),
                       lambda line, where: parse_reference_line(line, tokenizer, num_units, where),
                       skip_bad, report)


def read_text_jsonl(path: str | Path, tokenizer: TextTokenizer, key: str = "text",
                    skip_bad: bool = False, report: ReadReport | None = None
                    ) -> Iterator[SourceDocument]:
    """Text-only documents ([T] int32 text ids) of a JSONL file, one per non-blank line."""
    return _read_lines(Path(path),
                       lambda line, where: parse_text_line(line, tokenizer, key, where),
                       skip_bad, report)


def load_units(path: Path) -> np.ndarray:
    """[U] int64 units of a `.npy` integer array or a whitespace-separated text file."""
    unreadable = functools.partial(DocumentError, kind="unreadable unit file")
    if path.suffix == ".npy":
        check_npy_data_size(path, unreadable)
        _check_npy_magic(path)
        try:
            units = np.load(path, allow_pickle=False, mmap_mode="r")
        # SyntaxError, TokenError: a damaged header, which numpy parses as a Python literal.
        except (ValueError, OSError, SyntaxError, tokenize.TokenError) as error:
            raise DocumentError(f"{path}: not a readable .npy array ({error})",
                                kind="unreadable unit file") from None
        if units.ndim != 1 or units.dtype.kind not in "iu":
            raise DocumentError(f"{path}: expected a 1-D integer array of units, got "
                                f"{units.dtype} with shape {units.shape}",
                                kind="unreadable unit file")
        if units.dtype == np.uint64 and units.size and units.max() > np.iinfo(np.int64).max:
            # as int64 it would wrap to a negative unit, and be refused as that
            raise DocumentError(f"{path}: unit {units.max()} is beyond any codebook; the file "
                                f"does not hold unit ids", kind="unit outside the codebook")
        return np.array(units, dtype=np.int64)
    data = read_bounded_bytes(path, unreadable, "unit file")
    try:
        # a leading byte-order mark (a Windows editor's) dropped: it made the first unit no integer
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(f"{path}: not a text file of units ({error.reason} at byte "
                            f"{error.start}); expected whitespace-separated integers, or a "
                            f".npy array", kind="unreadable unit file") from None
    return parse_units_text(text, str(path))


def _check_npy_magic(path: Path) -> None:
    """Refuse a `.npy` path that does not start with numpy's magic bytes: numpy takes any other
    file for a pickle, and its refusal ("pickled data") misnames a damaged or mislabelled file."""
    magic = np.lib.format.MAGIC_PREFIX
    try:
        with open(path, "rb") as file:
            head = file.read(len(magic))
    except OSError as error:
        raise DocumentError(f"{path}: unreadable ({error.strerror})",
                            kind="unreadable unit file") from None
    if head != magic:
        raise DocumentError(f"{path}: not a .npy array (it does not start with numpy's header "
                            f"{magic!r}); a text file of units needs a .txt name",
                            kind="unreadable unit file")


def _frame(seconds: float, frame_rate: float) -> int:
    # Half-up rounding: shared interval boundaries map to the same frame on both sides.
    return int(math.floor(seconds * frame_rate + 0.5))


_TIER_RULE = ("a word tier must cover the utterance from 0, its intervals in time order, each "
              "starting where the one before ends (as MFA writes it)")


def _check_tier_covers(intervals: list, bounds: list[int], frame_rate: float, tier: str,
                       where: str) -> None:
    """Refuse a tier that does not cover frames 0..bounds[-1] in order, naming the first interval
    out of time order, else the first one after a gap or overlapping the one before.
    `bounds[i]`: the start frame of interval i (and the end frame of the last)."""
    def refuse(number: int, why: str):
        interval = intervals[number - 1]
        raise DocumentError(f"{where}: interval {number} of tier {tier!r} ({interval.label!r}) "
                            f"starts at {interval.start:.3f}s = frame {bounds[number - 1]}, "
                            f"{why}; {_TIER_RULE}", kind="tier does not cover the utterance")

    for number in range(2, len(intervals) + 1):
        if bounds[number - 1] < bounds[number - 2]:
            previous = intervals[number - 2]
            refuse(number, f"before interval {number - 1} ({previous.label!r}, from "
                           f"{previous.start:.3f}s): the intervals are out of time order")
    # Frames are cut at interval starts, so the tier must cover the units without gaps: a gap
    # would silently join the frames in it to the interval before.
    ends = [0] + [_frame(interval.end, frame_rate) for interval in intervals[:-1]]
    for number, (start, reached) in enumerate(zip(bounds, ends, strict=False), 1):
        if start < 0:
            refuse(number, "before the utterance starts (time 0)")
        if start < reached:
            previous = intervals[number - 2]
            refuse(number, f"inside interval {number - 1} ({previous.label!r}), which ends at "
                           f"{previous.end:.3f}s = frame {reached}: the intervals overlap")
        if start > reached:
            refuse(number, f"but the tier reaches only frame {reached} before it")


def parse_textgrid_utterance(textgrid_path: str | Path, units_path: str | Path,
                             tokenizer: TextTokenizer, frame_rate: float = 25.0,
                             num_units: int = 502, tier: str = "words"
                             ) -> tuple[AlignedDocument, Counts]:
    """One utterance: the word tier of `textgrid_path` and the units of `units_path`.

    Interval [start, end) gets frames round(start * rate) .. round(end * rate). The intervals
    must cover the utterance from time 0 in time order, without gaps or overlaps (to the frame),
    and the last must end within one frame of the unit count; the last segment absorbs that
    frame. Empty labels and `sp`, `sil`, `<eps>`, `<sil>`, `!sil`, `[SIL]` in any case are
    silences; silences with no frames are dropped. `<unk>` and `spn` in any case (the aligner's
    unknown word) keep their frames as a segment without text, as a silence, and are counted as
    `unknown_words`. A label of several of these markers (`sil sp`) is one silence, or one
    unknown word if it holds `<unk>` or `spn`. A label mixing a word with a marker (`hello sp`)
    is refused: MFA never writes one, which of its frames are the word is unknown, and the
    reference reader of such a segment keeps only its first word (the reference-JSONL reader
    refuses `[SIL]` among words alike).
    """
    textgrid_path, units_path = Path(textgrid_path), Path(units_path)
    where = f"{textgrid_path} + {units_path}"
    intervals = read_textgrid(textgrid_path, tier)
    units = load_units(units_path)
    if not intervals:
        raise DocumentError(f"{textgrid_path}: empty document (tier {tier!r} has no intervals)",
                            kind="empty document")
    bounds = [_frame(iv.start, frame_rate) for iv in intervals] + [
        _frame(intervals[-1].end, frame_rate)]
    _check_tier_covers(intervals, bounds, frame_rate, tier, where)
    if abs(bounds[-1] - len(units)) > 1:
        raise DocumentError(
            f"{where}: the TextGrid ends at {intervals[-1].end:.3f}s = {bounds[-1]} frames at "
            f"{frame_rate:g} Hz but {units_path.name} holds {len(units)} units; check the frame "
            f"rate (--frame-rate) and that the files belong to the same utterance",
            kind="TextGrid and units differ in length")
    bounds[-1] = len(units)
    bounds = np.minimum(np.array(bounds, dtype=np.int64), len(units))

    counts = Counts(documents=1)
    seg_texts: list[str] = []
    seg_unit_len: list[int] = []
    for number, (interval, first, last) in enumerate(
            zip(intervals, bounds[:-1], bounds[1:], strict=True), 1):
        frames = max(int(last - first), 0)
        words = interval.label.split()
        markers = [word for word in words if word.lower() in _TEXTGRID_MARKERS]
        if markers and len(markers) < len(words):
            raise DocumentError(
                f"{where}: interval {number} of tier {tier!r} ({interval.label!r}, from "
                f"{interval.start:.3f}s) mixes words with the marker {markers[0]!r}, which is "
                f"no word; an interval holds one word or one silence (as MFA writes it): give "
                f"the {'silence' if markers[0].lower() in TEXTGRID_SILENCES else 'unknown word'}"
                f" its own interval, or take the marker out of the label",
                kind="word mixed with a marker")
        if any(marker.lower() in TEXTGRID_UNKNOWN_WORDS for marker in markers):
            counts.unknown_words += 1
            if frames == 0:  # carries nothing, as a silence of no frames
                continue
            label = ""
        elif len(markers) == len(words):  # no label, or silence markers only
            if frames == 0:
                counts.empty_silences_dropped += 1
                continue
            counts.silences += 1
            label = ""
        else:
            counts.words += len(words)
            label = " ".join(words)
        seg_texts.append(label)
        seg_unit_len.append(frames)
    if not seg_texts:
        raise DocumentError(f"{where}: empty document (no words and no units)",
                            kind="empty document")
    text_ids, seg_text_len = tokenizer.encode_words(seg_texts)
    return _finish(text_ids, units, seg_text_len, np.array(seg_unit_len, dtype=np.int32),
                   seg_texts, num_units, where, counts)


def _unit_files_at(base: Path) -> list[Path]:
    """The unit files `base` names: `base` with each unit-file suffix that exists, as whatever
    it is (a FIFO or a folder is then refused by name when read, not reported missing)."""
    return [base.with_name(base.name + suffix) for suffix in UNIT_FILE_SUFFIXES
            if os.path.lexists(base.with_name(base.name + suffix))]


def _unit_file_at(base: Path, textgrid_path: Path) -> Path | None:
    """`base` with the unit-file suffix that exists, or None. Two of them (`a.npy` and
    `a.txt`) are a DocumentError naming both: which one holds the utterance's units is not
    ours to guess."""
    found = _unit_files_at(base)
    if len(found) > 1:
        raise DocumentError(f"{textgrid_path}: {len(found)} unit files of one utterance: "
                            f"{', '.join(map(str, found))}; keep the one that holds its units "
                            f"and move the other{'s' if len(found) > 2 else ''} away",
                            kind="several unit files")
    return found[0] if found else None


def find_units_file(textgrid_path: Path, textgrid_dir: Path, units_dir: Path) -> Path:
    """The unit file of an utterance: same relative path under `units_dir`, else same stem."""
    relative = textgrid_path.relative_to(textgrid_dir).with_suffix("")
    for base in (units_dir / relative, units_dir / relative.name):
        found = _unit_file_at(base, textgrid_path)
        if found is not None:
            return found
    raise DocumentError(f"{textgrid_path}: no unit file {relative}{{{','.join(UNIT_FILE_SUFFIXES)}}}"
                        f" under {units_dir}", kind="no unit file")


Utterance = tuple[Path, ...]
"""The TextGrid files of one utterance: one, or several whose suffixes differ only in case
(`a.TextGrid`, `a.textgrid`, on a case-sensitive file system), which reading it refuses."""


def textgrid_utterances(textgrid_dir: str | Path, units_dir: str | Path) -> list[Utterance]:
    """The utterances of the `*.TextGrid` files (the suffix in any case) under `textgrid_dir`,
    sorted by their first file (the corpus order). Refuses TextGrids of one stem in different
    folders whose unit files `units_dir` does not hold by relative path: the stem fallback of
    `find_units_file` would give them the same units. Two TextGrids of one utterance are that
    utterance's own error (`utterance_textgrid`), not the corpus's."""
    textgrid_dir, units_dir = Path(textgrid_dir), Path(units_dir)
    # Not a folder: a TextGrid that is no regular file (a FIFO) is refused by name when read.
    paths = sorted(path for path in textgrid_dir.rglob("*")
                   if path.suffix.lower() == ".textgrid" and not path.is_dir())
    if not paths:
        raise DocumentError(f"{textgrid_dir}: no *.TextGrid files found")
    by_utterance: dict[Path, list[Path]] = {}
    for path in paths:
        by_utterance.setdefault(path.with_suffix(""), []).append(path)
    by_stem: dict[str, list[Path]] = {}
    for path, *_ in by_utterance.values():
        by_stem.setdefault(path.stem, []).append(path)
    for stem, same in by_stem.items():
        if len(same) < 2:
            continue
        # Two unit files at a relative path are that utterance's own error (refused, or
        # skipped under --skip-bad, when it is read), not the corpus's.
        by_stem_only = [path for path in same if not _unit_files_at(
            units_dir / path.relative_to(textgrid_dir).with_suffix(""))]
        if by_stem_only:
            raise DocumentError(
                f"{len(same)} TextGrids share the name {stem!r} ({', '.join(map(str, same[:3]))}"
                f"{', ...' if len(same) > 3 else ''}) and {by_stem_only[0]} has no unit file at "
                f"its relative path under {units_dir}: by name alone they would all read one "
                f"unit file; lay the unit files out in the TextGrids' folders")
    return [tuple(files) for files in by_utterance.values()]  # in the order of their first files


def utterance_textgrid(utterance: Utterance) -> Path:
    """The TextGrid of `utterance`; a DocumentError naming both when it has two."""
    if len(utterance) > 1:
        raise DocumentError(f"{utterance[0]} and {utterance[1].name}: two TextGrids of one "
                            f"utterance; keep one", kind="two TextGrids of one utterance")
    return utterance[0]


def unit_files_without_textgrid(textgrid_dir: str | Path, units_dir: str | Path,
                                utterances: list[Utterance]) -> list[Path]:
    """Unit files under `units_dir` (sorted) of utterances that no TextGrid of `utterances`
    reads: utterances the aligner left without a TextGrid (MFA lists them in unalignable.txt),
    which the corpus would otherwise leave out without a word. A unit file is whatever
    `find_units_file` takes for one (a FIFO too, which reading refuses by name). A second unit
    file of a read utterance (`a.txt` beside `a.npy`, which reading refuses) is not listed."""
    textgrid_dir, units_dir = Path(textgrid_dir), Path(units_dir)
    listed = sorted(path for path in units_dir.rglob("*") if path.suffix in UNIT_FILE_SUFFIXES)
    bases = {path.relative_to(units_dir).with_suffix("") for path in listed}
    read = set()  # the relative bases the utterances read, by find_units_file's rule
    for path, *_ in utterances:
        relative = path.relative_to(textgrid_dir).with_suffix("")
        read.add(relative if relative in bases else Path(relative.name))
    return [path for path in listed if path.relative_to(units_dir).with_suffix("") not in read]


def read_textgrid_corpus(textgrid_dir: str | Path, units_dir: str | Path,
                         tokenizer: TextTokenizer, frame_rate: float = 25.0,
                         num_units: int = 502, tier: str = "words", skip_bad: bool = False,
                         report: ReadReport | None = None) -> Iterator[SourceDocument]:
    """Aligned documents of every TextGrid under `textgrid_dir` with its unit file."""
    textgrid_dir, units_dir = Path(textgrid_dir), Path(units_dir)
    for utterance in textgrid_utterances(textgrid_dir, units_dir):
        try:
            path = utterance_textgrid(utterance)
            units_path = find_units_file(path, textgrid_dir, units_dir)
            doc, counts = parse_textgrid_utterance(path, units_path, tokenizer, frame_rate,
                                                   num_units, tier)
        except (DocumentError, VocabularyError) as error:
            if not skip_bad:
                raise
            (report or ReadReport()).skip(str(utterance[0]), error)
            continue
        yield SourceDocument(doc, f"{path} + {units_path}", counts)



# Parallel reading: the input is cut into chunks (of lines, or of utterances) that worker
# processes parse with `parse_chunk`; everything a worker needs is picklable and importable here.

INPUT_FORMATS = ("reference-jsonl", "textgrid", "text-jsonl")


@dataclass(frozen=True)
class ReadOptions:
    input_format: str
    """One of INPUT_FORMATS."""
    tokenizer_path: str
    tokenizer_sha256: str
    """Workers refuse a tokenizer file that differs from the one the run started with."""
    num_units: int = 502
    frame_rate: float = 25.0
    json_key: str = "text"
    tier: str = "words"
    textgrid_dir: str | None = None
    units_dir: str | None = None
    skip_bad: bool = False

    def __post_init__(self):
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, "
                             f"got {self.input_format!r}")
        if self.input_format == "textgrid" and not (self.textgrid_dir and self.units_dir):
            raise ValueError("the textgrid input format needs textgrid_dir and units_dir")


@dataclass
class Chunk:
    items: list
    """(line number, line) pairs, or utterances (`Utterance`)."""
    source: str
    """The file the lines come from ("" for TextGrid utterances)."""
    size: int
    """Input bytes (lines) or utterances, for progress bars."""


@dataclass
class ChunkResult:
    documents: list[Document]
    counts: Counts
    report: ReadReport


def line_chunks(paths: list[str], chunk_size: int) -> Iterator[Chunk]:
    """The non-blank lines of `paths`, in order, `chunk_size` lines at a time. A chunk's size is
    the input bytes it covers, as the progress total counts them (the files' sizes): its lines
    encoded back (characters are not bytes beyond ASCII), the blank lines before them, and, for
    the last chunk of a file, the bytes no line's text holds (a byte-order mark); the sizes of a
    file's chunks add up to its size."""
    for path in paths:
        file_size, counted = Path(path).stat().st_size, 0
        with open_corpus_lines(path) as lines:
            chunk: list[tuple[int, str]] = []
            size = 0
            for number, line in enumerate(lines, 1):
                size += len(line.encode("utf-8", "surrogateescape"))  # the bytes read
                if line.strip():
                    chunk.append((number, line))
                if len(chunk) == chunk_size:
                    yield Chunk(chunk, str(path), size)
                    counted += size
                    chunk, size = [], 0
        rest = max(file_size - counted, 0)
        if chunk or rest:
            yield Chunk(chunk, str(path), rest)


def utterance_chunks(utterances: list[Utterance], chunk_size: int) -> Iterator[Chunk]:
    """Utterances, `chunk_size` at a time."""
    for start in range(0, len(utterances), chunk_size):
        chunk = utterances[start: start + chunk_size]
        yield Chunk(chunk, "", len(chunk))


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(path: str, sha256: str) -> TextTokenizer:
    # One tokenizer (and its word cache) per process for all the chunks it parses.
    tokenizer = load_text_tokenizer(path)
    if tokenizer.sha256 != sha256:
        raise VocabularyError(f"{path}: the tokenizer file changed during preprocessing "
                              f"(sha256 {tokenizer.sha256[:12]}..., expected {sha256[:12]}...)")
    return tokenizer


def _item_where(options: ReadOptions, item, source: str) -> str:
    """Where a chunk item comes from: its utterance's (first) TextGrid, or `file:line`."""
    return str(item[0]) if options.input_format == "textgrid" else f"{source}:{item[0]}"


def _parse_item(options: ReadOptions, tokenizer: TextTokenizer, item, source: str
                ) -> tuple[Document, Counts]:
    if options.input_format == "textgrid":
        path = utterance_textgrid(item)
        units_path = find_units_file(path, Path(options.textgrid_dir), Path(options.units_dir))
        return parse_textgrid_utterance(path, units_path, tokenizer, options.frame_rate,
                                        options.num_units, options.tier)
    number, line = item
    where = f"{source}:{number}"
    if options.input_format == "reference-jsonl":
        return parse_reference_line(line, tokenizer, options.num_units, where)
    return parse_text_line(line, tokenizer, options.json_key, where)


def parse_chunk(options: ReadOptions, chunk: Chunk) -> ChunkResult:
    """The documents of one chunk, in order; bad ones raise or (skip_bad) are counted."""
    tokenizer = _worker_tokenizer(options.tokenizer_path, options.tokenizer_sha256)
    result = ChunkResult([], Counts(), ReadReport())
    for item in chunk.items:
        try:
            document, counts = _parse_item(options, tokenizer, item, chunk.source)
        except (DocumentError, VocabularyError) as error:
            if not options.skip_bad:
                raise
            result.report.skip(_item_where(options, item, chunk.source), error)
            continue
        result.documents.append(document)
        result.counts.add(counts)
    result.counts.bad_skipped = result.report.bad_skipped
    return result
