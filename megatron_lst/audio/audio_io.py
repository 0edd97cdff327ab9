"""Audio files -> mono float32 waveforms at 16 kHz.

`.wav` files with integer PCM samples are read with the standard library's `wave`; everything
else (`.flac`, float wav, ...) with `soundfile` when it is installed (the `audio` extra).
Multi-channel audio is averaged to mono. Resampling is the exact-ratio polyphase filter of
`megatron_lst.demo_corpus.units.resample`.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_lst.data.input_files import checked_file_size
from megatron_lst.demo_corpus.optional import MissingDependencyError
from megatron_lst.demo_corpus.units import FEATURE_SAMPLE_RATE, resample

AUDIO_SUFFIXES = (".wav", ".flac")
_AUDIO_EXTRA = "pip install 'megatron-lst[audio]'"


MAX_FLOAT_PEAK = 16.0
"""The loudest sample a float file may hold, 24 dB above full scale: float audio keeps headroom
past [-1, 1] (an unlimited mix), but a louder one holds integer sample values stored as float, or
damaged samples, and its units would be features of nothing HuBERT was trained on."""

_UNREADABLE_FIX = ("re-copy or re-encode it (e.g. ffmpeg -i IN -ar 16000 OUT.flac), or leave it "
                   "out of the corpus")


class AudioError(ValueError):
    """An audio file cannot be read."""


@dataclass(frozen=True)
class AudioInfo:
    num_samples: int
    """Samples per channel at `sample_rate`."""
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def num_samples_16k(self) -> int:
        """Samples after resampling to 16 kHz (`resample_poly`'s output length)."""
        g = math.gcd(FEATURE_SAMPLE_RATE, self.sample_rate)
        up, down = FEATURE_SAMPLE_RATE // g, self.sample_rate // g
        return -(-self.num_samples * up // down)


def _soundfile(path: Path):
    try:
        import soundfile
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading {path.suffix or 'this'} files needs the Python package "
            f"'soundfile', which is not installed; install the audio extra: {_AUDIO_EXTRA} "
            f"(integer-PCM .wav files need nothing)") from None
    return soundfile


def _is_pcm_wav(path: Path) -> bool:
    if path.suffix.lower() != ".wav":
        return False
    try:
        with wave.open(str(path), "rb") as f:
            # A wav written to a pipe (ffmpeg ... -f wav -) cannot go back to fill in its data
            # length and leaves 0xFFFFFFFF there: libsndfile reads the data to the file's end,
            # where `wave` would count 4 GiB and call the file truncated.
            return f.getnframes() != _STREAMED_DATA_LENGTH // (f.getnchannels() * f.getsampwidth())
    except (wave.Error, EOFError, RuntimeError):  # RuntimeError: a chunk past the RIFF's end
        return False  # e.g. IEEE-float wav: soundfile reads it (or names what is wrong)


_STREAMED_DATA_LENGTH = 0xFFFFFFFF
"""The data chunk length a wav written without seeking leaves open."""


def audio_info(path: str | Path) -> AudioInfo:
    """Length and sample rate from the file header, without reading the samples."""
    path = Path(path)
    checked_file_size(path, AudioError, "audio file")
    if _is_pcm_wav(path):
        with wave.open(str(path), "rb") as f:
            _check_last_frame(path, f)
            return AudioInfo(f.getnframes(), _checked_rate(path, f.getframerate()),
                             f.getnchannels())
    try:
        info = _soundfile(path).info(str(path))
    except RuntimeError as error:  # soundfile.LibsndfileError
        raise AudioError(f"{path}: not a readable audio file ({error}); {_UNREADABLE_FIX}"
                         ) from None
    if info.frames == _UNKNOWN_LENGTH:
        raise AudioError(f"{path}: its header does not give its length (a FLAC written while "
                         f"streaming), and libsndfile fails at the end of such a file; "
                         f"re-encode it, e.g. ffmpeg -i IN -c:a flac OUT.flac")
    return AudioInfo(info.frames, _checked_rate(path, info.samplerate), info.channels)


_UNKNOWN_LENGTH = 2**63 - 1
"""libsndfile's frame count for a file whose header leaves its length open (0 total samples)."""


MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 1_000_000
"""Sample rates outside these (Hz) are damaged headers: no recording of speech has them, and
resampling from, e.g., a prime rate near 2**32 would need a filter of hundreds of GiB."""


def _checked_rate(path: Path, rate: int) -> int:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: the header gives a sample rate of {rate} Hz, outside "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; the file is damaged, "
                         f"re-encode it from its source")
    return rate


def _truncated(path: Path, promised: int, present: int | None = None) -> AudioError:
    holds = "ends before them" if present is None else f"holds {present}"
    return AudioError(f"{path}: truncated: the header promises {promised} samples per channel "
                      f"but the file {holds}; re-copy or re-encode it, or leave it out")


def _check_last_frame(path: Path, f: wave.Wave_read) -> None:
    """Refuse a PCM wav whose data ends before the frames its header counts (a cut-off copy),
    reading only the last frame."""
    frames = f.getnframes()
    if frames:
        f.setpos(frames - 1)
        try:
            last = f.readframes(1)
        except RuntimeError:  # `wave` cannot seek past the RIFF chunk the data chunk overruns
            raise _truncated(path, frames) from None
        if len(last) < f.getnchannels() * f.getsampwidth():
            raise _truncated(path, frames)


def _read_pcm_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
        frames, raw = f.getnframes(), f.readframes(f.getnframes())
    if len(raw) < frames * channels * width:
        raise _truncated(path, frames, len(raw) // (channels * width))
    _checked_rate(path, rate)
    if width == 1:  # 8-bit wav is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: little-endian triples, sign-extended through the top byte
        triples = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = ((ints ^ 0x800000) - 0x800000).astype(np.float32) / float(1 << 23)
    elif width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(1 << (8 * width - 1))
    else:
        raise AudioError(f"{path}: unsupported wav sample width {width} bytes")
    return samples.reshape(-1, channels).mean(1), rate


def _check_fits_in_memory(path: Path) -> None:
    """Refuse a file whose header claims more float32 samples than the free memory holds:
    soundfile allocates the header's length before decoding a sample (a damaged FLAC header of
    2**36 samples was a 256 GiB MemoryError, or an overcommitted allocation)."""
    import psutil

    info = audio_info(path)
    if info.num_samples * info.channels * 4 > psutil.virtual_memory().available:
        raise AudioError(f"{path}: the header gives {info.seconds / 3600:,.1f} hours of audio, "
                         f"more than fits in memory; the header is damaged (re-encode the file) "
                         f"or the recording is too long (split it)")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """([n] float32 mono, sample rate) of a wav or flac file: in [-1, 1], or for a float file
    as it holds them (as soundfile and torchaudio read them), up to MAX_FLOAT_PEAK."""
    path = Path(path)
    checked_file_size(path, AudioError, "audio file")
    if _is_pcm_wav(path):
        return _read_pcm_wav(path)
    _check_fits_in_memory(path)
    try:
        samples, rate = _soundfile(path).read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as error:
        raise AudioError(f"{path}: not a readable audio file ({error}); {_UNREADABLE_FIX}"
                         ) from None
    _check_float_samples(path, samples)
    return samples.mean(1), _checked_rate(path, rate)


def _check_float_samples(path: Path, samples: np.ndarray) -> None:
    """Refuse NaN, infinite or far too loud ([n, channels]) samples, which would silently
    become units."""
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: holds NaN or infinite samples, which would silently become "
                         f"units; fix the file or leave it out")
    peak = float(np.abs(samples).max(initial=0.0))
    if peak > MAX_FLOAT_PEAK:
        raise AudioError(f"{path}: its samples reach {peak:.3g}, far outside the [-1, 1] of "
                         f"float audio (at most {MAX_FLOAT_PEAK:g} is taken); it holds integer "
                         f"values stored as float, or damaged samples, which would silently "
                         f"become units: scale it into [-1, 1] (e.g. sox IN OUT.flac norm), "
                         f"or leave it out")


def load_audio_16k(path: str | Path) -> np.ndarray:
    """[AudioInfo.num_samples_16k] float32 mono waveform at 16 kHz."""
    samples, rate = read_audio(path)
    return resample(samples, rate, FEATURE_SAMPLE_RATE)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write [n] float samples in [-1, 1] as 16-bit PCM mono wav."""
    pcm = np.clip(np.round(np.asarray(samples) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
