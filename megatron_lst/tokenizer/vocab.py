"""The joint id space of text pieces, special ids and speech units (docs/data.md#the-joint-vocabulary).

The default layout is the reference implementation's, so its checkpoints import unchanged.
With V the text tokenizer's size:

    0 .. V-1        text tokenizer ids (0 unk, also the pad id in batches; 1 BOS; 2 EOS)
    V .. V+3        reserved, never produced
    V+4             text-mode marker  <t>
    V+5             speech-mode marker <s>
    V+6+u           speech unit u, u in 0 .. num_units-1
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NUM_RESERVED = 4

# Modality codes carried in batches (`modality [B, N]`).
MODALITY_TEXT = 0
MODALITY_SPEECH = 1


# Joint ids are int32 in documents, rows and batches.
_MAX_IDS = 2**31


class VocabularyError(ValueError):
    """An id, a tokenizer or a stored artifact disagrees with the vocabulary layout."""


@dataclass(frozen=True)
class JointVocab:
    text_size: int
    """V: size of the text tokenizer."""
    num_units: int = 502
    """Speech codebook slots (HuBERT 500 clusters + 2 spare, as in the reference)."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    tokenizer_sha256: str | None = field(default=None, compare=False)
    """sha256 of the text tokenizer's file, when known: two tokenizers of one size give the same
    layout (so vocabularies compare equal without it) but different text ids."""

    def __post_init__(self):
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise VocabularyError(f"special ids must be >= 0, got pad={self.pad_id} "
                                  f"bos={self.bos_id} eos={self.eos_id}")
        if self.bos_id == self.eos_id:  # an EOS would also open a document, a BOS end one
            raise VocabularyError(f"bos and eos are both id {self.bos_id}; a tokenizer's BOS and "
                                  f"EOS must be two ids")
        if self.text_size <= max(self.pad_id, self.bos_id, self.eos_id):
            raise VocabularyError(
                f"text tokenizer size {self.text_size} is too small to hold the special ids "
                f"pad={self.pad_id} bos={self.bos_id} eos={self.eos_id}"
            )
        if self.num_units <= 0:
            raise VocabularyError(f"num_units must be positive, got {self.num_units}")
        if self.size > _MAX_IDS:
            raise VocabularyError(
                f"{self.text_size} text pieces, 6 markers and {self.num_units} speech units make "
                f"{self.size} ids, more than int32 ids address; num_units (--num-units) is the "
                f"speech codebook size, e.g. HuBERT's 500 clusters + 2 = 502")

    @property
    def text_marker(self) -> int:
        return self.text_size + NUM_RESERVED

    @property
    def speech_marker(self) -> int:
        return self.text_size + NUM_RESERVED + 1

    @property
    def unit_offset(self) -> int:
        return self.text_size + NUM_RESERVED + 2

    @property
    def size(self) -> int:
        return self.unit_offset + self.num_units

    def units_to_ids(self, units: np.ndarray, where: str = "") -> np.ndarray:
        """Map unit values (0 .. num_units-1) to joint ids; out-of-range units raise."""
        units = np.asarray(units)
        if units.size and (units.min() < 0 or units.max() >= self.num_units):
            bad = units[(units < 0) | (units >= self.num_units)][0]
            raise VocabularyError(
                f"{where + ': ' if where else ''}speech unit {int(bad)} is outside the codebook "
                f"0..{self.num_units - 1}; pass the codebook size the units were made with "
                f"(--num-units)"
            )
        return (units + self.unit_offset).astype(np.int32)

    def ids_to_units(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and not self.is_unit(ids).all():
            raise VocabularyError("ids_to_units given ids that are not speech units")
        return (ids - self.unit_offset).astype(np.int32)

    def is_unit(self, ids):
        """Elementwise: is this id a speech unit? Works on numpy arrays and torch tensors."""
        return (ids >= self.unit_offset) & (ids < self.size)

    def is_patchable_static(self, ids):
        """Tokens that static patching groups: the speech-mode marker and the units."""
        return self.is_unit(ids) | (ids == self.speech_marker)

    def check_ids(self, ids: np.ndarray, where: str = "") -> None:
        """Raise if any id is outside the joint vocabulary or in the reserved range."""
        ids = np.asarray(ids)
        if not ids.size:
            return
        bad = (ids < 0) | (ids >= self.size) | ((ids >= self.text_size) & (ids < self.text_marker))
        if bad.any():
            raise VocabularyError(
                f"{where + ': ' if where else ''}id {int(ids[bad][0])} is not in the joint "
                f"vocabulary of size {self.size} (text {self.text_size}, units {self.num_units}) "
                f"or is a reserved id"
            )

    def check_matches(self, other_size: int, what: str) -> None:
        """Raise when a checkpoint or dataset was made with another vocabulary."""
        if other_size != self.size:
            raise VocabularyError(
                f"{what} was made with a joint vocabulary of {other_size} ids but this tokenizer "
                f"gives {self.size} (text {self.text_size} + {NUM_RESERVED + 2} special + "
                f"{self.num_units} units); use the tokenizer and --num-units it was made with"
            )

    def describe(self) -> str:
        """`text pieces, speech units and tokenizer digest`, for messages comparing two."""
        digest = (f", tokenizer sha256 {self.tokenizer_sha256[:12]}..."
                  if self.tokenizer_sha256 else "")
        return f"{self.text_size} text pieces and {self.num_units} speech units{digest}"

    def check_same(self, other: JointVocab, what: str) -> None:
        """Raise unless `other`, the vocabulary `what` (e.g. "checkpoint DIR") was made with, is
        this layout, from the same tokenizer file when both record its digest: one of the same
        size can still hold other units at an id (another text size and --num-units) or other
        text pieces (another tokenizer)."""
        if other != self:
            raise VocabularyError(
                f"{what} was made with {other.text_size} text pieces and {other.num_units} "
                f"speech units ({other.size} ids) but this run's data has {self.text_size} and "
                f"{self.num_units} ({self.size} ids); use data made with the tokenizer and "
                f"--num-units it was made with")
        if None not in (self.tokenizer_sha256, other.tokenizer_sha256) and \
                self.tokenizer_sha256 != other.tokenizer_sha256:
            raise VocabularyError(
                f"{what} was made with the tokenizer of sha256 {other.tokenizer_sha256[:12]}... "
                f"but this run's data with the one of sha256 {self.tokenizer_sha256[:12]}...: "
                f"both have {self.text_size} pieces but their text ids differ; use data made "
                f"with the tokenizer it was made with")

    def check_tokenizer(self, tokenizer, what: str) -> None:
        """Raise unless `tokenizer` (a `TextTokenizer`) is the one `what` (e.g. "checkpoint
        DIR") was made with: the same size and, when this vocabulary records it, the same
        file digest."""
        if tokenizer.vocab_size != self.text_size:
            raise VocabularyError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but {what} was made "
                f"with {self.text_size}; pass the tokenizer it was made with (--tokenizer-model)")
        if self.tokenizer_sha256 is not None and tokenizer.sha256 != self.tokenizer_sha256:
            raise VocabularyError(
                f"tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:12]}...) is not the one "
                f"{what} was made with (sha256 {self.tokenizer_sha256[:12]}...): both have "
                f"{self.text_size} pieces but their text ids differ; pass the tokenizer it was "
                f"made with (--tokenizer-model)")

    def to_dict(self) -> dict:
        return {
            "text_size": self.text_size,
            "num_units": self.num_units,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "text_marker": self.text_marker,
            "speech_marker": self.speech_marker,
            "unit_offset": self.unit_offset,
            "size": self.size,
            **({"tokenizer_sha256": self.tokenizer_sha256} if self.tokenizer_sha256 else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> JointVocab:
        """The layout `to_dict` wrote. Raises VocabularyError, naming the field, for a record
        that is not one (a field missing or not an integer, ids that disagree with the sizes)."""
        if not isinstance(d, dict):
            raise VocabularyError(f"a vocabulary layout is a JSON object, got a "
                                  f"{type(d).__name__}")
        fields = ("text_size", "num_units", "pad_id", "bos_id", "eos_id")
        wrong = [f"{name!r} ({type(d[name]).__name__ if name in d else 'missing'})"
                 for name in fields if not _is_int(d.get(name))]
        if wrong:
            raise VocabularyError(f"vocabulary field(s) {', '.join(wrong)} are not integers")
        sha256 = d.get("tokenizer_sha256")
        if sha256 is not None and not isinstance(sha256, str):
            raise VocabularyError(f"vocabulary field 'tokenizer_sha256' is a "
                                  f"{type(sha256).__name__}, not a hex digest")
        vocab = cls(*(d[name] for name in fields), sha256)
        # The derived ids are written too: one that disagrees means the record was edited.
        for name in ("text_marker", "speech_marker", "unit_offset", "size"):
            if name in d and d[name] != getattr(vocab, name):
                raise VocabularyError(
                    f"vocabulary field {name!r} is {d[name]!r} but text_size {vocab.text_size} "
                    f"and num_units {vocab.num_units} make it {getattr(vocab, name)}; the record "
                    f"was edited or damaged")
        return vocab


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
