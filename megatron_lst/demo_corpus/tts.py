"""Synthetic speech with word and silence times, from eSpeak NG driven through its C API.

The PyPI package `espeakng-loader` bundles the library and its voice data, so no system package is
needed. The library runs in synchronous mode with a synth callback that receives the audio and the
events of each chunk:

- WORD events give a word's character position in the input text (their audio time runs up to
  ~50 ms early: a word starts at its first phone);
- PHONEME events give phone start times; pause phones (names starting with `_`) mark silences.

eSpeak sometimes reports two words as one WORD event ("there was": about 4% of words); their time
is split in proportion to their characters. A word ends where its first pause phone starts, or at
the next word's start; the pause up to the next word is a silence interval.

eSpeak keeps global state, so a process holds one `EspeakSynthesizer`; the voice is set per call.
Its noise generator is reseeded before every utterance, but some state (the pitch flutter phase)
runs on from one utterance to the next and nothing resets it: the same text gives the same audio
only after the same earlier utterances in the process (see speech.py for how the build copes).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_lst.demo_corpus.optional import require

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_PITCH = 3

# English voices and variants that sound distinct: the demo's speakers.
DEFAULT_VOICES = ("en-us+m3", "en+f2", "en-gb-x-rp+m1", "en-us+f4", "en+m7", "en-us+klatt")


class _Event(ctypes.Structure):
    """`espeak_EVENT` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position in the input
        ("length", ctypes.c_int),  # characters of a WORD event
        ("audio_position", ctypes.c_int),  # milliseconds from the start of this Synth call
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # phoneme name for PHONEME events
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


class SynthesisError(RuntimeError):
    """eSpeak NG refused a voice or an utterance."""


@dataclass(frozen=True)
class Voice:
    name: str = "en-us+m3"
    """eSpeak voice, optionally with a `+variant` (see espeak-ng-data/voices/!v)."""
    rate: int = 175
    """Words per minute (eSpeak's default is 175)."""
    pitch: int = 50
    """Base pitch 0..100."""


@dataclass(frozen=True)
class TimedWord:
    word: str
    """The input token as written (including punctuation)."""
    start: float
    """Seconds."""
    end: float
    """Seconds; a following pause is not part of the word."""


@dataclass(frozen=True)
class TimedPhone:
    name: str
    """eSpeak's phoneme mnemonic, e.g. `'a` (stressed), `@2`, `_:` (a pause)."""
    start: float
    """Seconds."""
    end: float
    """Seconds: the next phone's start, or the end of the audio."""


@dataclass
class Synthesis:
    audio: np.ndarray
    """[num_samples] float32 in [-1, 1]."""
    sample_rate: int
    words: list[TimedWord]
    """One per whitespace-separated input token, in order, non-overlapping."""
    phones: list[TimedPhone]
    """Every phone eSpeak spoke, in order, each running to the next one's start."""

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass(frozen=True)
class _WordStart:
    position: int  # 1-based character position
    time: float  # seconds: the first phone
    speech_end: float  # seconds: the first pause phone after it, or the next word's start


class EspeakSynthesizer:
    """Text to audio plus per-token times. One per process (eSpeak's state is global)."""

    def __init__(self):
        loader = require("espeakng_loader", "speech synthesis (eSpeak NG)")
        self._lib = ctypes.CDLL(loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                           ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                           ctypes.c_void_p, ctypes.c_void_p]
        # 500 ms buffers: ten times fewer Python callbacks than the 60 ms default.
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 500, loader.get_data_path().encode(),
            _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise SynthesisError(f"eSpeak NG failed to initialise from {loader.get_data_path()}")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, bytes]] = []
        # Keep a reference: ctypes does not, and a collected callback crashes the library.
        self._callback = _Callback(self._on_chunk)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: Voice | None = None

    def _on_chunk(self, samples, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type in (_EVENT_WORD, _EVENT_PHONEME):
                self._events.append((event.type, event.text_position, event.audio_position,
                                     bytes(event.id) if event.type == _EVENT_PHONEME else b""))
            i += 1
        return 0  # continue synthesis

    def _set_voice(self, voice: Voice) -> None:
        if voice == self._voice:
            return
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise SynthesisError(f"eSpeak NG has no voice {voice.name!r}; use a language code "
                                 f"with an optional +variant, e.g. 'en-us+m3'")
        self._lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        self._voice = voice

    def synthesize(self, text: str, voice: Voice = Voice()) -> Synthesis:
        """Speak `text` (ASCII; tokens separated by single spaces) and time each token."""
        tokens = text.split(" ")
        if not text or any(not t for t in tokens) or not text.isascii():
            raise SynthesisError(f"synthesize needs ASCII tokens separated by single spaces, got "
                                 f"{text[:60]!r}; normalise the text first")
        self._set_voice(voice)
        # eSpeak's noise generator is otherwise seeded differently in every process.
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        self._chunks.clear()
        self._events.clear()
        data = text.encode()
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                        None, None)
        if status != 0:
            raise SynthesisError(f"espeak_Synth failed with status {status} on {text[:60]!r}")
        audio = (np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16))
        audio = audio.astype(np.float32) / 32768.0
        duration = len(audio) / self.sample_rate
        words = _time_tokens(tokens, _word_starts(self._events, duration), duration)
        return Synthesis(audio, self.sample_rate, words, _phones(self._events, duration))


def _phones(events: list[tuple[int, int, int, bytes]], duration: float) -> list[TimedPhone]:
    """The PHONEME events as phones that run to the next one's start (the last one to the end)."""
    starts = [(name.decode("ascii", "replace"), min(ms / 1000.0, duration))
              for kind, _, ms, name in events if kind == _EVENT_PHONEME]
    ends = [start for _, start in starts[1:]] + [duration]
    return [TimedPhone(name, start, max(end, start))
            for (name, start), end in zip(starts, ends, strict=True)]


def _word_starts(events: list[tuple[int, int, int, bytes]], duration: float) -> list[_WordStart]:
    """Each WORD event with the times its speech starts (its first phone) and ends (its first
    pause phone, else the next word's start).

    The WORD event itself comes up to ~50 ms before the word's first phone, while the previous
    word's last phone is still sounding, so its own time is used only for a word without phones.
    """
    word_at = [i for i, event in enumerate(events) if event[0] == _EVENT_WORD]
    spans = []  # (position, start, first pause phone or None) per WORD event
    for k, i in enumerate(word_at):
        following = events[i + 1:word_at[k + 1] if k + 1 < len(word_at) else len(events)]
        phones = [(ms / 1000.0, name.startswith(b"_"))
                  for kind, _, ms, name in following if kind == _EVENT_PHONEME]
        first = next((n for n, (_, pause) in enumerate(phones) if not pause), None)
        start = events[i][2] / 1000.0 if first is None else phones[first][0]
        pause = next((t for t, is_pause in phones[first or 0:] if is_pause), None)
        spans.append((events[i][1], min(start, duration), pause))
    starts = []
    for k, (position, start, pause) in enumerate(spans):
        end = pause if pause is not None else (spans[k + 1][1] if k + 1 < len(spans)
                                               else duration)
        starts.append(_WordStart(position, start, min(max(end, start), duration)))
    return starts


def _time_tokens(tokens: Sequence[str], starts: list[_WordStart], duration: float
                 ) -> list[TimedWord]:
    """Give each token the span of the WORD event it falls in, split by characters.

    A token's event is the last one starting at or before it. An event that starts inside a token
    (eSpeak splits some hyphenated words) extends the token's span instead of starting a new one.
    """
    if not starts:
        raise SynthesisError(f"eSpeak NG reported no words for {' '.join(tokens)[:60]!r}")
    event_positions = np.array([s.position for s in starts])
    if (np.diff(event_positions) < 0).any():
        raise SynthesisError(f"eSpeak NG reported words out of order for "
                             f"{' '.join(tokens)[:60]!r}")
    # 1-based start position of each token in the text.
    positions = np.cumsum([1] + [len(t) + 1 for t in tokens[:-1]])
    # A token before the first event (leading punctuation) joins the first event.
    event_of_token = np.maximum(np.searchsorted(event_positions, positions, side="right") - 1, 0)
    owners = np.unique(event_of_token)  # events that start a group of tokens, ascending
    words = []
    for g, e in enumerate(owners):
        members = np.flatnonzero(event_of_token == e)
        last_event = owners[g + 1] - 1 if g + 1 < len(owners) else len(starts) - 1
        start = starts[e].time
        end = min(max(starts[last_event].speech_end, start), duration)
        chars = np.array([len(tokens[m]) for m in members], dtype=np.float64)
        edges = start + (end - start) * np.concatenate([[0], np.cumsum(chars)]) / chars.sum()
        edges[-1] = end  # exactly, so the next word never starts before this one ends
        for k, m in enumerate(members):
            words.append(TimedWord(tokens[m], float(edges[k]), float(edges[k + 1])))
    return words
