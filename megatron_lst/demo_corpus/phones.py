"""Phone units: eSpeak NG's own phonemes, sampled at 25 Hz, as an alternative to k-means units.

k-means units of synthetic speech are noisy: two renditions of one word by one voice share only
about half their MFCC units, and two voices share almost none (benchmarks/results/
2026-12-04_cpu-2core_demo_speech_analysis.md). Phone units are the other end of that scale: the
phoneme the synthesiser is speaking at each frame, the same for every voice of one language and
every rendition of a word. They are what a perfect, speaker-independent unit discoverer would
find, and let a study separate "the model cannot learn from speech" from "the units hide it".

A phone's name is eSpeak's mnemonic without stress marks (`'a` and `,a` are `a`); every pause
phone (names starting with `_`) and the time before the first phone are `PAUSE`. Frame j covers
[j / 25, (j + 1) / 25) seconds and takes the phone spoken at its centre.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from megatron_lst.data.textgrid import Interval
from megatron_lst.demo_corpus.units import UNIT_FRAME_RATE

PAUSE = "_"
_STRESS_MARKS = "',"


def phone_label(name: str) -> str:
    """eSpeak's phoneme mnemonic -> the unit's label (stress marks dropped, pauses merged)."""
    if name.startswith("_"):
        return PAUSE
    label = name.strip(_STRESS_MARKS)
    return label or PAUSE


def frame_phones(phones: Sequence[Interval], num_frames: int) -> list[str]:
    """The label of the phone spoken at each frame's centre; `PAUSE` where none is.

    `phones` are in order and do not overlap (each runs to the next one's start).
    """
    starts = np.array([p.start for p in phones], dtype=np.float64)
    ends = np.array([p.end for p in phones], dtype=np.float64)
    centres = (np.arange(num_frames) + 0.5) / UNIT_FRAME_RATE
    index = np.searchsorted(starts, centres, side="right") - 1
    out = []
    for frame, i in enumerate(index):
        inside = i >= 0 and centres[frame] < ends[i]
        out.append(phone_label(phones[i].label) if inside else PAUSE)
    return out


class PhoneInventory:
    """Unit id of each phone label: `PAUSE` is 0, the others in sorted order."""

    def __init__(self, labels: Iterable[str]):
        others = sorted(set(labels) - {PAUSE})
        self.labels = [PAUSE, *others]
        self._ids = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def units(self, labels: Sequence[str]) -> np.ndarray:
        """[len(labels)] int64 unit ids."""
        unknown = sorted(set(labels) - set(self._ids))
        if unknown:
            raise KeyError(f"phones {unknown} are not in the inventory of {len(self)} phones; "
                           f"build the inventory from every utterance that is unitised")
        return np.array([self._ids[label] for label in labels], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        """`{"phones": [label of unit 0, label of unit 1, ...]}`."""
        Path(path).write_text(json.dumps({"phones": self.labels}, indent=1))
