"""Aligned documents of a TextGrid corpus (docs/data.md#input-formats): MFA word tiers plus
per-utterance unit files. Finds the utterances and their unit files, parses one utterance
(`parse_textgrid_utterance`), and reads the whole corpus (`read_textgrid_corpus`)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_lst.data.document_parsing import SILENCE_WORD, checked_aligned_document
from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.folder_walk import files_under
from megatron_lst.data.manifest import Counts
from megatron_lst.data.read_report import ReadReport, SourceDocument
from megatron_lst.data.textgrid import read_textgrid
from megatron_lst.data.unit_files import load_units
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer
from megatron_lst.tokenizer.vocab import VocabularyError

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
    return checked_aligned_document(text_ids, units, seg_text_len,
                                    np.array(seg_unit_len, dtype=np.int32), seg_texts, num_units,
                                    where, counts)


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
    suffixes = ",".join(UNIT_FILE_SUFFIXES)
    raise DocumentError(f"{textgrid_path}: no unit file {relative}{{{suffixes}}} under {units_dir}",
                        kind="no unit file")


Utterance = tuple[Path, ...]
"""The TextGrid files of one utterance: one, or several whose suffixes differ only in case
(`a.TextGrid`, `a.textgrid`, on a case-sensitive file system), which reading it refuses."""


def textgrid_utterances(textgrid_dir: str | Path, units_dir: str | Path) -> list[Utterance]:
    """The utterances of the `*.TextGrid` files (the suffix in any case) under `textgrid_dir`,
    linked folders followed (`files_under`), sorted by their first file (the corpus order).
    Refuses TextGrids of one stem in different folders whose unit files `units_dir` does not
    hold by relative path: the stem fallback of `find_units_file` would give them the same
    units. Two TextGrids of one utterance are that utterance's own error
    (`utterance_textgrid`), not the corpus's."""
    textgrid_dir, units_dir = Path(textgrid_dir), Path(units_dir)
    # Not a folder: a TextGrid that is no regular file (a FIFO) is refused by name when read.
    paths = sorted(path for path in files_under(textgrid_dir, DocumentError)
                   if path.suffix.lower() == ".textgrid")
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
    """Unit files under `units_dir` (linked folders followed; sorted) of utterances that no
    TextGrid of `utterances` reads: utterances the aligner left without a TextGrid (MFA lists
    them in unalignable.txt), which the corpus would otherwise leave out without a word. A unit
    file is whatever `find_units_file` takes for one (a FIFO too, which reading refuses by
    name). A second unit file of a read utterance (`a.txt` beside `a.npy`, which reading
    refuses) is not listed."""
    textgrid_dir, units_dir = Path(textgrid_dir), Path(units_dir)
    listed = sorted(path for path in files_under(units_dir, DocumentError)
                    if path.suffix in UNIT_FILE_SUFFIXES)
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
