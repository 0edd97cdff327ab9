"""Edit-distance error counts of ASR and TTS outputs: words and characters (WER, CER) of
normalised text, and speech units (docs/evaluation.md#asr-and-tts).

Counts come from `jiwer` (Levenshtein alignment: substitutions + deletions + insertions), one
utterance at a time, so a corpus rate is `sum(errors) / sum(reference_length)` over utterances and
a bootstrap can resample utterances (`bootstrap.bootstrap_ratio_ci`).

Text normalisation, applied to reference and hypothesis alike before counting: Unicode NFC
(so an accent written as a combining mark stays with its letter), lowercase; every character that
is not a letter or a digit (of any script) or the apostrophe becomes a space; runs of whitespace
collapse to one space; leading and trailing spaces go. On ASCII text that is: keep a-z, 0-9 and
the apostrophe. CER counts the characters of that normalised string, spaces between words
included.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import jiwer
import numpy as np

_NOT_KEPT = re.compile(r"(?:[^\w']|_)+")  # \w: letters and digits of any script, and "_"


def normalise_text(text: str) -> str:
    """The text WER and CER compare (see the module docstring)."""
    return _NOT_KEPT.sub(" ", unicodedata.normalize("NFC", text).lower()).strip()


@dataclass(frozen=True)
class EditCounts:
    """Edits that turn the reference into the hypothesis, and the reference's length."""

    errors: int
    reference_length: int

    @property
    def rate(self) -> float:
        return self.errors / self.reference_length


def _counts(output, reference_length: int) -> EditCounts:
    return EditCounts(output.substitutions + output.deletions + output.insertions,
                      reference_length)


def _nonempty(normalised: str, what: str) -> str:
    if not normalised:
        raise ValueError(f"the reference {what} is empty after normalisation; an utterance "
                         f"without a transcript has no error rate, leave it out")
    return normalised


def word_edits(reference: str, hypothesis: str) -> EditCounts:
    """Word edits between the normalised texts (the WER numerator and denominator)."""
    ref = _nonempty(normalise_text(reference), "text")
    hyp = normalise_text(hypothesis)
    return _counts(jiwer.process_words(ref, hyp), len(ref.split()))


def char_edits(reference: str, hypothesis: str) -> EditCounts:
    """Character edits between the normalised texts (the CER numerator and denominator)."""
    ref = _nonempty(normalise_text(reference), "text")
    hyp = normalise_text(hypothesis)
    return _counts(jiwer.process_characters(ref, hyp), len(ref))


def unit_edits(reference: np.ndarray, hypothesis: np.ndarray) -> EditCounts:
    """Edits between two speech-unit sequences, each unit one symbol (the unit edit rate)."""
    if not len(reference):
        raise ValueError("the reference unit sequence is empty; it has no unit edit rate")
    ref = " ".join(str(int(u)) for u in reference)
    hyp = " ".join(str(int(u)) for u in hypothesis)
    return _counts(jiwer.process_words(ref, hyp), len(reference))
