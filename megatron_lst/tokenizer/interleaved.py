"""Interleaved speech-text sequences <-> joint ids, in the reference implementation's layout.

    BOS, <t> pieces of run 1 [+ space piece], <s> units of run 2, ..., EOS

A text run is the tokenizer's encoding of its text; when another run follows, the run ends with a
space, which the tokenizer turns into one word-boundary piece (`TextTokenizer.space_id`). A speech
run is its units shifted into the joint id space. `decode` inverts `encode` for text runs that do
not themselves end with a space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from megatron_lst.tokenizer.text_tokenizer import TextTokenizer
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

Segment = tuple[Literal["text", "speech"], str | np.ndarray]


class InterleavedCodec:
    def __init__(self, tokenizer: TextTokenizer, vocab: JointVocab):
        if tokenizer.vocab_size != vocab.text_size:
            raise VocabularyError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces "
                                  f"but the vocabulary expects {vocab.text_size}; build it with "
                                  f"joint_vocab(tokenizer)")
        self.tokenizer = tokenizer
        self.vocab = vocab

    def encode(self, segments: Sequence[Segment], bos: bool = True, eos: bool = True
               ) -> np.ndarray:
        """[N] int32 joint ids of `segments`, a list of ("text", str) / ("speech", units)."""
        vocab = self.vocab
        runs: list[np.ndarray] = [np.array([vocab.bos_id], dtype=np.int32)] if bos else []
        for index, (kind, payload) in enumerate(segments):
            last = index == len(segments) - 1
            if kind == "text":
                pieces = self.tokenizer.encode(payload)
                if not last:
                    pieces.append(self.tokenizer.space_id)
                runs.append(np.array([vocab.text_marker, *pieces], dtype=np.int32))
            elif kind == "speech":
                units = np.asarray(payload)
                if units.ndim != 1 or (units.size and units.dtype.kind not in "iu"):
                    raise VocabularyError(f"segment {index}: speech units must be a 1-D integer "
                                          f"array, got {units.dtype} with shape {units.shape}")
                units = units.astype(np.int64)
                bad = np.flatnonzero((units < 0) | (units >= vocab.num_units))
                if len(bad):
                    raise VocabularyError(
                        f"segment {index}, unit {int(bad[0])}: speech unit {int(units[bad[0]])} "
                        f"is outside the codebook 0..{vocab.num_units - 1}")
                runs.append(np.concatenate([[vocab.speech_marker],
                                            vocab.units_to_ids(units)]).astype(np.int32))
            else:
                raise ValueError(f"segment {index}: kind must be 'text' or 'speech', got {kind!r}")
        if eos:
            runs.append(np.array([vocab.eos_id], dtype=np.int32))
        return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int32)

    def _runs(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """(start, end) of each run: from a mode marker up to the next marker."""
        markers = np.flatnonzero((ids == self.vocab.text_marker)
                                 | (ids == self.vocab.speech_marker))
        if not len(markers):
            return []
        ends = np.append(markers[1:], len(ids))
        return list(zip(markers.tolist(), ends.tolist(), strict=True))

    def decode(self, ids: Sequence[int]) -> list[Segment]:
        """The segments of joint ids made by `encode` (BOS/EOS at the ends are optional)."""
        vocab = self.vocab
        ids = np.asarray(ids, dtype=np.int64)
        vocab.check_ids(ids)
        body_start = 1 if len(ids) and ids[0] == vocab.bos_id else 0
        body_end = len(ids) - 1 if len(ids) > body_start and ids[-1] == vocab.eos_id else len(ids)
        body = ids[body_start:body_end]
        runs = self._runs(body)
        if len(body) and (not runs or runs[0][0] != 0):
            raise VocabularyError(f"position {body_start}: id {int(body[0])} comes before any "
                                  f"mode marker (<t> {vocab.text_marker} or <s> "
                                  f"{vocab.speech_marker})")
        segments: list[Segment] = []
        for number, (start, end) in enumerate(runs):
            content = body[start + 1: end]
            if body[start] == vocab.text_marker:
                bad = np.flatnonzero((content >= vocab.text_size) | (content == vocab.bos_id)
                                     | (content == vocab.eos_id))
                if len(bad):
                    raise VocabularyError(f"position {body_start + start + 1 + int(bad[0])}: id "
                                          f"{int(content[bad[0]])} inside a text run is not a "
                                          f"text piece (it is a unit, BOS or EOS)")
                followed = number < len(runs) - 1
                if followed and len(content) and content[-1] == self.tokenizer.space_id:
                    content = content[:-1]
                segments.append(("text", self.tokenizer.decode(content.tolist())))
            else:
                bad = np.flatnonzero(~vocab.is_unit(content))
                if len(bad):
                    raise VocabularyError(f"position {body_start + start + 1 + int(bad[0])}: id "
                                          f"{int(content[bad[0]])} inside a speech run is not a "
                                          f"speech unit")
                segments.append(("speech", vocab.ids_to_units(content)))
        return segments

    def render(self, ids: Sequence[int]) -> str:
        """Human-readable ids, e.g. `<bos> <t> hello world <s> [12 13 9] <eos>`; never raises."""
        vocab = self.vocab
        names = {vocab.bos_id: "<bos>", vocab.eos_id: "<eos>", vocab.text_marker: "<t>",
                 vocab.speech_marker: "<s>"}
        words: list[str] = []
        text: list[int] = []
        units: list[int] = []

        def flush() -> None:
            if text:
                words.append(self.tokenizer.decode(text))
                text.clear()
            if units:
                words.append("[" + " ".join(map(str, units)) + "]")
                units.clear()

        for token in (int(i) for i in ids):
            if token in names:
                flush()
                words.append(names[token])
            elif vocab.unit_offset <= token < vocab.size:
                if text:
                    flush()
                units.append(token - vocab.unit_offset)
            elif 0 <= token < vocab.text_size:
                if units:
                    flush()
                text.append(token)
            else:
                flush()
                words.append(f"<?{token}>")
        flush()
        return " ".join(words)
