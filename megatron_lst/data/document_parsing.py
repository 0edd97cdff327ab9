"""Parsing one document (docs/data.md#input-formats): a line of the reference "on the fly" JSONL
(`parse_reference_line`), a text JSONL line (`parse_text_line`), and speech units written as
text (`parse_units_text`). A bad input raises `DocumentError` naming its location."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.json_objects import RepeatedKeyError, loads_unique_keys
from megatron_lst.data.manifest import Counts
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer

SEGMENT_SEP = "<LST MODE SEP>"
SILENCE_WORD = "[SIL]"


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
    return checked_aligned_document(text_ids, unit_ids, seg_text_len, seg_unit_len, seg_texts,
                                    num_units, where, counts)


def checked_aligned_document(text_ids: np.ndarray, unit_ids: np.ndarray,
                             seg_text_len: np.ndarray, seg_unit_len: np.ndarray,
                             seg_texts: list[str], num_units: int, where: str,
                             counts: Counts) -> tuple[AlignedDocument, Counts]:
    """The aligned document of a parsed line or utterance (`where` names it in errors), with
    `counts` advanced by it; DocumentError for no units, a word of no text pieces or a unit
    outside the codebook of `num_units`. Shared by the JSONL and TextGrid readers."""
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
    says so in the error) and name each key once; DocumentError naming `where` for anything
    else."""
    _check_utf8(line, where, "the line")
    try:
        record = loads_unique_keys(line)
    except RepeatedKeyError as error:
        raise DocumentError(f"{where}: {error}", kind="key given twice") from None
    except json.JSONDecodeError as error:
        raise DocumentError(f"{where}: not valid JSON ({error.msg} at column {error.colno})"
                            , kind="not valid JSON") from None
    except RecursionError:
        raise DocumentError(f"{where}: not a document (JSON nested too deeply to read)",
                            kind="not valid JSON") from None
    except ValueError:  # an integer literal past Python's digit limit (a raw ValueError once)
        raise DocumentError(f"{where}: not a document (it holds an integer of more than "
                            f"{sys.get_int_max_str_digits()} digits, which Python does not "
                            f"read); fix that line", kind="not valid JSON") from None
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
