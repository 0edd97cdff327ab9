"""Text -> synthetic utterances: word intervals plus 25 Hz features, in parallel worker processes.

Audio is not kept: each utterance is featurised as soon as it is synthesised, so hours of speech
need only their features in memory ([T, 78] float16 at 25 Hz for MFCCs).
"""

from __future__ import annotations

import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from megatron_lst.data.textgrid import Interval
from megatron_lst.demo_corpus.optional import require
from megatron_lst.demo_corpus.stories import normalize_words
from megatron_lst.demo_corpus.tts import EspeakSynthesizer, Voice
from megatron_lst.demo_corpus.units import FeatureExtractor, resample


@dataclass(frozen=True)
class SpeechRequest:
    id: str
    text: str
    """Natural text (punctuation helps the prosody)."""
    voice: Voice


@dataclass
class Utterance:
    id: str
    words: list[Interval]
    """Normalised words with their times (seconds), in order."""
    features: np.ndarray
    """[num_units, dim] float16 at 25 Hz."""
    duration: float
    """Seconds of audio."""


def speakable(text: str) -> tuple[str, list[str]]:
    """(ASCII text for the synthesiser, its normalised words): tokens with no word are dropped,
    so the i-th synthesised token is the i-th word."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    tokens = [t for t in ascii_text.split() if normalize_words(t)]
    return " ".join(tokens), [normalize_words(t)[0] for t in tokens]


class _Worker:
    """Per-process synthesiser and feature extractor (eSpeak's state is global to a process)."""

    synthesizer: EspeakSynthesizer | None = None
    features: FeatureExtractor | None = None

    @classmethod
    def init(cls, features: FeatureExtractor, blas_threads: int | None = None) -> None:
        if blas_threads is not None:
            # Idle BLAS threads spinning on a busy machine make small matrix products 100x slower.
            require("threadpoolctl", "limiting BLAS threads").threadpool_limits(blas_threads)
        if cls.synthesizer is None:
            cls.synthesizer = EspeakSynthesizer()
        cls.features = features

    @classmethod
    def run(cls, requests: Sequence[SpeechRequest]) -> list[Utterance]:
        out = []
        for request in requests:
            text, words = speakable(request.text)
            if not words:
                raise ValueError(f"{request.id}: no speakable words in {request.text[:60]!r}")
            synthesis = cls.synthesizer.synthesize(text, request.voice)
            features = cls.features(resample(synthesis.audio, synthesis.sample_rate))
            intervals = [Interval(w.start, w.end, word) for w, word in zip(synthesis.words, words)]
            out.append(Utterance(request.id, intervals, features.astype(np.float16),
                                 synthesis.duration))
        return out


def synthesize_utterances(requests: Sequence[SpeechRequest], features: FeatureExtractor,
                          workers: int = 1, chunk_size: int = 32,
                          progress: Callable[[int], None] | None = None) -> list[Utterance]:
    """Synthesise and featurise every request, in order, with `workers` processes (1: in this one).

    `progress(n)` is called after each chunk of n utterances.
    """
    chunks = [requests[i:i + chunk_size] for i in range(0, len(requests), chunk_size)]
    if workers <= 1:
        _Worker.init(features)
        return _collect(map(_Worker.run, chunks), progress)
    with ProcessPoolExecutor(workers, initializer=_Worker.init, initargs=(features, 1)) as pool:
        return _collect(pool.map(_Worker.run, chunks), progress)


def _collect(results: Iterator[list[Utterance]], progress) -> list[Utterance]:
    out: list[Utterance] = []
    for chunk in results:
        out.extend(chunk)
        if progress is not None:
            progress(len(chunk))
    return out
