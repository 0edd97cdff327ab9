"""Story-completion evaluation sets in text and speech (docs/evaluation.md#the-item-format).

Three sets, from held-out stories:

- `storycloze` (2-way): the right ending vs one that contradicts a fact of the story;
- `topic` (2-way): the right ending vs the ending of another story with another plot;
- `hellaswag` (4-way): the right ending vs three with all facts redrawn. (Three one-fact changes
  would each share all but one fact with the right ending, so "pick the ending most like the
  others" would solve the set without the story.)

An item is one JSON line:

    {"id": ..., "voice": ...,
     "context": {"text": ..., "units": [...], "segments": [[word, n_units], ...]},
     "endings": [{"text": ..., "units": [...], "segments": [...]}, ...],
     "label": index of the right ending}

`text` is the normalised words joined by spaces; `units` are raw unit values (not joint ids);
`segments` is the per-word alignment of `units` in order, `[SIL]` for silences, summing to
`len(units)`, so models can patch speech aligned to words. The context and every ending are
synthesised and unitised separately, in the item's voice, as the paper's spoken benchmarks are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_lst.demo_corpus.ngram import NgramLM
from megatron_lst.demo_corpus.stories import Story, normalize_words

EVAL_SETS = ("storycloze", "topic", "hellaswag")


@dataclass(frozen=True)
class TextItem:
    id: str
    context: str
    """Natural text of the context (for synthesis)."""
    endings: tuple[str, ...]
    label: int


def make_text_items(name: str, stories: Sequence[Story], seed: int) -> list[TextItem]:
    """Items of set `name` from `stories` (one item per story), endings in a seeded order."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose from {EVAL_SETS}")
    rng = np.random.default_rng([seed, EVAL_SETS.index(name)])
    items = []
    for i, story in enumerate(stories):
        if name == "storycloze":
            wrong = [story.wrong_endings[0]]
        elif name == "hellaswag":
            wrong = list(story.redrawn_endings[:3])
        else:
            others = [s for s in stories if s.plot != story.plot]
            if not others:
                raise ValueError("the topic set needs stories of at least two plots")
            wrong = [others[rng.integers(len(others))].ending]
        endings = [story.ending] + wrong
        order = rng.permutation(len(endings))
        items.append(TextItem(f"{name}-{i:05d}", " ".join(story.context),
                              tuple(endings[j] for j in order), int(np.argmin(order))))
    return items


@dataclass(frozen=True)
class SpokenText:
    """A text with its units and per-word alignment."""

    text: str
    units: np.ndarray
    segments: list[tuple[str, int]]

    def to_json(self) -> dict:
        return {"text": self.text, "units": self.units.tolist(),
                "segments": [[w, n] for w, n in self.segments]}


def item_record(item: TextItem, voice: str, context: SpokenText,
                endings: Sequence[SpokenText]) -> dict:
    """The JSON record of an item, given the speech of its context and of each ending."""
    if len(endings) != len(item.endings):
        raise ValueError(f"{item.id}: {len(item.endings)} endings but {len(endings)} spoken")
    return {"id": item.id, "voice": voice, "context": context.to_json(),
            "endings": [e.to_json() for e in endings], "label": item.label}


def write_items(path: str | Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_items(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def endings_only_accuracy(lm: NgramLM, items: Sequence[TextItem]) -> float:
    """Accuracy of picking the ending with the highest n-gram log-probability, context unseen."""
    if not items:
        raise ValueError("endings_only_accuracy needs at least one item")
    correct = 0
    for item in items:
        scores = [lm.logprob(normalize_words(e)) for e in item.endings]
        correct += int(np.argmax(scores)) == item.label
    return correct / len(items)
