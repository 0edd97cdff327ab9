"""What a corpus reader yields and skips: `SourceDocument`s (a document with its source location
and manifest counts), and, with `skip_bad=True`, a `ReadReport` of the bad inputs skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.manifest import Counts
from megatron_lst.tokenizer.vocab import VocabularyError

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
