"""Text -> synthetic utterances: word intervals plus 25 Hz features, in parallel worker processes.

Audio is not kept: each utterance is featurised as soon as it is synthesised, so hours of speech
need only their features in memory ([T, 78] float16 at 25 Hz for MFCCs).
"""

from __future__ import annotations

import multiprocessing
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    phones: list[Interval]
    """eSpeak's phones (label: its mnemonic) with their times, in order."""


def speakable(text: str) -> tuple[str, list[str]]:
    """(ASCII text for the synthesiser, its normalised words): tokens with no word are dropped,
    so the i-th synthesised token is the i-th word."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    tokens = [t for t in ascii_text.split() if normalize_words(t)]
    return " ".join(tokens), [normalize_words(t)[0] for t in tokens]


class _Worker:
    """The synthesiser and feature extractor of a worker process (one chunk per process)."""

    synthesizer: EspeakSynthesizer | None = None
    features: FeatureExtractor | None = None

    @classmethod
    def init(cls, features: FeatureExtractor) -> None:
        # One BLAS thread: idle threads spinning on a busy machine made small products 100x slower.
        require("threadpoolctl", "limiting BLAS threads").threadpool_limits(1)
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
            intervals = [Interval(w.start, w.end, word) for w, word in zip(synthesis.words, words, strict=True)]
            phones = [Interval(p.start, p.end, p.name) for p in synthesis.phones]
            out.append(Utterance(request.id, intervals, features.astype(np.float16),
                                 synthesis.duration, phones))
        return out


def synthesize_utterances(requests: Sequence[SpeechRequest], features: FeatureExtractor,
                          workers: int = 1, chunk_size: int = 32,
                          progress: Callable[[int], None] | None = None) -> list[Utterance]:
    """Synthesise and featurise every request, in order, with `workers` processes.

    eSpeak NG carries hidden state from one utterance to the next (its pitch flutter runs on, and
    neither re-initialising nor reseeding resets it), so each chunk of `chunk_size` requests is
    synthesised in a fresh process forked from a clean server: the result depends on the requests
    and `chunk_size` only, not on `workers` or on what this process synthesised before.
    `progress(n)` is called after each chunk of n utterances.
    """
    chunks = [requests[i:i + chunk_size] for i in range(0, len(requests), chunk_size)]
    context = multiprocessing.get_context("forkserver")
    # Import once in the server, not in every worker (scipy.signal alone takes seconds).
    context.set_forkserver_preload([__name__, "scipy.signal", "threadpoolctl"])
    out: list[Utterance] = []
    with context.Pool(max(1, workers), initializer=_Worker.init, initargs=(features,),
                      maxtasksperchild=1) as pool:
        for chunk in pool.imap(_Worker.run, chunks):
            out.extend(chunk)
            if progress is not None:
                progress(len(chunk))
    return out
