"""Aligned speech-text documents in memory (docs/data.md#the-indexed-store-and-its-manifest).

A speech-text document is an ordered list of segments; a segment is a word (or a silence) with the
text-tokenizer pieces of the word and the speech units aligned to it. It is kept as flat arrays so a
stored document reads back with no per-segment Python objects:

    text_ids        [T]   int32  text pieces of all words, in order (no specials)
    unit_ids        [U]   int32  raw unit values 0..num_units-1 (not joint ids), in order
    seg_text_len    [S]   int32  pieces of each segment; 0 marks a silence segment
    seg_unit_len    [S]   int32  units of each segment (a word may have 0 units, a silence may not)

A text-only document is just its text pieces (`text_ids`); it needs no segment table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DocumentError(ValueError):
    """A document breaks the invariants above, or its input cannot be read as one.

    `kind` names the sort of problem in a few words that hold nothing of the input (no file, no
    value), so that `--skip-bad` can tally the documents it skipped by kind."""

    kind = "invalid document"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    def __reduce__(self):  # the kind survives a worker process's pickling
        return type(self), (str(self), self.__dict__.get("kind"))


# `DocumentError.kind` of a segment table that does not describe the document's arrays.
SEGMENT_TABLE = "inconsistent segment table"


@dataclass
class AlignedDocument:
    text_ids: np.ndarray
    unit_ids: np.ndarray
    seg_text_len: np.ndarray
    seg_unit_len: np.ndarray

    @property
    def num_segments(self) -> int:
        return len(self.seg_text_len)

    @property
    def is_silence(self) -> np.ndarray:
        """[S] bool: segments with no text (the reference's `[SIL]` pseudo-words)."""
        return self.seg_text_len == 0

    def text_offsets(self) -> np.ndarray:
        """[S+1] start of each segment's pieces in `text_ids`."""
        return np.concatenate([[0], np.cumsum(self.seg_text_len)]).astype(np.int64)

    def unit_offsets(self) -> np.ndarray:
        """[S+1] start of each segment's units in `unit_ids`."""
        return np.concatenate([[0], np.cumsum(self.seg_unit_len)]).astype(np.int64)

    def validate(self, num_units: int, where: str = "document") -> None:
        if self.num_segments == 0:
            raise DocumentError(f"{where}: empty document (no segments)", kind="empty document")
        if len(self.seg_unit_len) != self.num_segments:
            raise DocumentError(f"{where}: {self.num_segments} text lengths but "
                                f"{len(self.seg_unit_len)} unit lengths", kind=SEGMENT_TABLE)
        if (self.seg_text_len < 0).any() or (self.seg_unit_len < 0).any():
            raise DocumentError(f"{where}: negative segment length", kind=SEGMENT_TABLE)
        if int(self.seg_text_len.sum()) != len(self.text_ids):
            raise DocumentError(f"{where}: segment text lengths sum to {int(self.seg_text_len.sum())}"
                                f" but the document has {len(self.text_ids)} text pieces",
                                kind=SEGMENT_TABLE)
        if int(self.seg_unit_len.sum()) != len(self.unit_ids):
            raise DocumentError(f"{where}: segment unit lengths sum to {int(self.seg_unit_len.sum())}"
                                f" but the document has {len(self.unit_ids)} units",
                                kind=SEGMENT_TABLE)
        silent = self.is_silence
        if (self.seg_unit_len[silent] == 0).any():
            raise DocumentError(f"{where}: a silence segment has no units",
                                kind="silence without units")
        if len(self.unit_ids) and (self.unit_ids.min() < 0 or self.unit_ids.max() >= num_units):
            bad = self.unit_ids[(self.unit_ids < 0) | (self.unit_ids >= num_units)][0]
            raise DocumentError(f"{where}: speech unit {int(bad)} is outside the codebook "
                                f"0..{num_units - 1}", kind="unit outside the codebook")


def check_stored_document(stored: AlignedDocument | np.ndarray, text_size: int, num_units: int,
                          where: str, bos_eos: tuple[int, int] | None = None) -> None:
    """Raise DocumentError, naming `where` (file and document), unless a document read from a
    dataset holds a consistent segment table (aligned) and only ids of the vocabulary: text
    pieces 0..text_size-1 and units 0..num_units-1, none of them `bos_eos` (the vocabulary's
    BOS and EOS ids, when given: the interleaver places those, and an EOS among the pieces
    would end the document there in a packed row). A few vector operations: cheap enough for
    every document of a row-index build."""
    text_ids = stored.text_ids if isinstance(stored, AlignedDocument) else np.asarray(stored)
    try:
        if isinstance(stored, AlignedDocument):
            stored.validate(num_units, where)
        if len(text_ids) and (text_ids.min() < 0 or text_ids.max() >= text_size):
            bad = text_ids[(text_ids < 0) | (text_ids >= text_size)][0]
            raise DocumentError(f"{where}: text id {int(bad)} is outside the tokenizer's "
                                f"0..{text_size - 1}", kind="text id outside the tokenizer")
    except DocumentError as error:
        raise DocumentError(f"{error}; the dataset is corrupt or its .bin and .idx are from "
                            f"different runs: re-run tools/preprocess_data.py",
                            kind=error.kind) from None
    if bos_eos is not None and len(text_ids):
        special = np.flatnonzero(np.isin(text_ids, bos_eos))
        if len(special):
            found = int(text_ids[special[0]])
            name = "EOS" if found == bos_eos[1] else "BOS"
            raise DocumentError(
                f"{where}: text piece {int(special[0])} is id {found}, the tokenizer's {name}; a "
                f"document's text cannot hold BOS or EOS (an EOS would end the document there "
                f"in a packed row, --reset-attention-mask). The text spelled a special token "
                f"(e.g. '</s>') and an older tools/preprocess_data.py kept it as that id: re-run "
                f"it, which encodes such text as plain pieces", kind="BOS or EOS in text")


def document_name(store, doc_id: int) -> str:
    """Document `doc_id` of `store` as errors name it: the store's optional `describe` (its file
    and document number), else "document N"."""
    describe = getattr(store, "describe", None)
    return describe(doc_id) if describe is not None else f"document {doc_id}"


def check_document_of(store, doc_id: int, stored: AlignedDocument | np.ndarray, vocab) -> None:
    """`check_stored_document` for document `doc_id` read from `store` (named by
    `document_name`), against `vocab` (a JointVocab) with its BOS and EOS ids refused."""
    check_stored_document(stored, vocab.text_size, vocab.num_units, document_name(store, doc_id),
                          (vocab.bos_id, vocab.eos_id))
