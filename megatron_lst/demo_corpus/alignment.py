"""Word times -> per-word unit counts, and the reference implementation's "on the fly" line form.

A segment is a word or the silence pseudo-word `[SIL]` with the number of 25 Hz units aligned to
it. Segments cover the utterance: their unit counts sum to its number of units.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from megatron_lst.data.textgrid import Interval
from megatron_lst.demo_corpus.units import UNIT_FRAME_RATE

SILENCE = "[SIL]"
MODE_SEP = "<LST MODE SEP>"


class AlignmentError(ValueError):
    """Word times that cannot be turned into unit counts."""


def segments_from_intervals(intervals: Sequence[Interval], num_units: int,
                            frame_rate: float = UNIT_FRAME_RATE) -> list[tuple[str, int]]:
    """Word intervals (seconds; empty label = silence) -> [(word or `[SIL]`, n_units)].

    Gaps before, between and after the words are silences. Boundaries are rounded to the nearest
    unit boundary (half up); every word keeps at least one unit (taken from its neighbours) so it stays aligned to
    speech, and silences that round to no unit are dropped.
    """
    pieces: list[tuple[str, float]] = []  # (label, start time); a piece ends where the next starts
    time = 0.0
    for iv in intervals:
        if iv.start < time - 1e-9 or iv.end < iv.start:
            raise AlignmentError(f"word intervals overlap or are out of order at {iv}")
        if iv.start > time or not pieces:
            pieces.append((SILENCE, time))
        pieces.append((iv.label or SILENCE, iv.start))
        time = iv.end
    pieces.append((SILENCE, time))
    # Drop the zero-length silences made above (before a word at 0, between back-to-back words).
    starts = np.array([t for _, t in pieces] + [max(time, num_units / frame_rate)])
    keep = (np.diff(starts) > 0) | np.array([label != SILENCE for label, _ in pieces])
    pieces = [p for p, k in zip(pieces, keep, strict=True) if k]
    labels = [label for label, _ in pieces]
    is_word = np.array([label != SILENCE for label in labels])
    if is_word.sum() > num_units:
        raise AlignmentError(f"{int(is_word.sum())} words cannot each get a unit of the "
                             f"utterance's {num_units} units")

    # Half-up rounding, as megatron_lst.data.textgrid_corpus rounds TextGrid boundaries.
    bounds = np.clip(np.floor(np.array([t for _, t in pieces]) * frame_rate + 0.5), 0, num_units)
    bounds = np.append(bounds.astype(np.int64), num_units)  # [S+1]
    bounds[0] = 0
    minimum = is_word.astype(np.int64)
    for i in range(len(labels)):  # push ends right so each word has a unit
        bounds[i + 1] = max(bounds[i + 1], bounds[i] + minimum[i])
    bounds[-1] = num_units
    for i in range(len(labels) - 1, -1, -1):  # and back left where that overran the end
        bounds[i] = min(bounds[i], bounds[i + 1] - minimum[i])
    counts = np.diff(bounds)

    segments: list[tuple[str, int]] = []
    for label, count in zip(labels, counts, strict=True):
        if label == SILENCE:
            if count == 0:
                continue
            if segments and segments[-1][0] == SILENCE:
                segments[-1] = (SILENCE, segments[-1][1] + int(count))
                continue
        segments.append((label, int(count)))
    return segments


def on_the_fly_line(file_id: str, segments: Sequence[tuple[str, int]], units: np.ndarray) -> str:
    """One JSON line of the reference's "on the fly" form:

    {"file_id": ..., "interleaved": "<LST MODE SEP>TEXT w <LST MODE SEP>HUBERT u u ... ..."}
    """
    units = np.asarray(units)
    if sum(n for _, n in segments) != len(units):
        raise AlignmentError(f"{file_id}: segments hold {sum(n for _, n in segments)} units but "
                             f"the utterance has {len(units)}")
    parts, offset = [], 0
    for word, count in segments:
        if count == 0:
            raise AlignmentError(f"{file_id}: segment {word!r} has no units; the on-the-fly "
                                 f"form needs at least one unit per segment")
        unit_text = " ".join(map(str, units[offset:offset + count].tolist()))
        parts.append(f"{MODE_SEP}TEXT {word} {MODE_SEP}HUBERT {unit_text}")
        offset += count
    return json.dumps({"file_id": file_id, "interleaved": " ".join(parts)})


def deduplicate_runs(units: np.ndarray, segments: Sequence[tuple[str, int]]
                     ) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Collapse runs of one repeated unit inside each segment to a single unit, as HuBERT unit
    pipelines do ("deduplicated units"): `([n] units, segments) -> ([m] units, segments)`.

    Runs are collapsed within a segment only, so every segment keeps at least one unit and the
    word alignment stays exact; a run that crosses a word boundary keeps one unit on each side.
    """
    units = np.asarray(units)
    if sum(n for _, n in segments) != len(units):
        raise AlignmentError(f"segments hold {sum(n for _, n in segments)} units but the "
                             f"utterance has {len(units)}")
    keep = np.ones(len(units), dtype=bool)
    keep[1:] = units[1:] != units[:-1]
    starts = np.cumsum([0] + [n for _, n in segments[:-1]])
    keep[starts[starts < len(units)]] = True  # a segment's first unit always stays
    kept_per_segment = np.add.reduceat(keep, starts) if len(units) else np.zeros(0, int)
    return units[keep], [(w, int(k)) for (w, _), k in zip(segments, kept_per_segment,
                                                         strict=True)]
