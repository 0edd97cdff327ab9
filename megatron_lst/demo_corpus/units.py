"""Discrete speech units: frame features, then the nearest k-means centroid (HuBERT-style units).

`UnitExtractor` pairs a feature extractor with a k-means codebook:

- `MfccFeatures` (default): 13 MFCCs with deltas and delta-deltas (39-d) at 50 Hz, normalised to
  zero mean and unit variance per utterance, two frames stacked -> 78-d at 25 Hz. Plain numpy/scipy.
- HuBERT features (`megatron_lst.audio.hubert.HubertFeatures`, a model directory on disk) plug
  in the same way (`build.unit_features`).

Unit j of an utterance covers the time [j / 25, (j + 1) / 25) seconds; an utterance of n samples
at 16 kHz has n // 640 units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from megatron_lst.checkpoint.durable_files import save_npy
from megatron_lst.demo_corpus.optional import require

FEATURE_SAMPLE_RATE = 16000
UNIT_FRAME_RATE = 25


def resample(audio: np.ndarray, sample_rate: int, target_rate: int = FEATURE_SAMPLE_RATE
             ) -> np.ndarray:
    """[n] -> [n * target_rate / sample_rate] float32, by polyphase filtering.

    The ratio is reduced exactly (22.05 kHz -> 16 kHz is up 320, down 441); an approximate ratio
    such as 160/441 silently halves the number of frames.
    """
    if sample_rate == target_rate:
        return np.asarray(audio, dtype=np.float32)
    signal = require("scipy.signal", "resampling audio")
    g = math.gcd(target_rate, sample_rate)
    up, down = target_rate // g, sample_rate // g
    lowpass = _lowpass_filter(up, down)
    if np.issubdtype(audio.dtype, np.floating):
        lowpass = lowpass.astype(audio.dtype)  # as resample_poly matches the filter to floats
    return signal.resample_poly(audio, up, down, window=lowpass).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _lowpass_filter(up: int, down: int) -> np.ndarray:
    """[20 * max(up, down) + 1] float64: the FIR low-pass filter `resample_poly` designs for
    `up / down` by default (a Kaiser window, beta 5), made once per ratio: designing it anew
    (8821 taps for 22.05 -> 16 kHz) took a quarter of each demo utterance's resampling.
    `resample_poly` copies it before scaling it."""
    signal = require("scipy.signal", "resampling audio")
    max_rate = max(up, down)
    return signal.firwin(20 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


class FeatureExtractor(Protocol):
    """16 kHz waveform [n] -> features [n // 640, dim] at 25 Hz."""

    def __call__(self, audio: np.ndarray) -> np.ndarray: ...

    def cache_key(self) -> dict:
        """Everything that changes the features, for cache keys."""
        ...


@dataclass(frozen=True)
class MfccConfig:
    num_ceps: int = 13
    num_mels: int = 40
    window: int = 400
    """Samples (25 ms at 16 kHz)."""
    hop: int = 320
    """Samples (20 ms: 50 Hz)."""
    num_fft: int = 512
    pre_emphasis: float = 0.97
    stack: int = 2
    """50 Hz frames per output frame (2 -> 25 Hz)."""


def _mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_filterbank(num_mels: int, num_fft: int, sample_rate: int) -> np.ndarray:
    """[num_mels, num_fft // 2 + 1] triangular HTK-mel filters."""
    edges_mel = np.linspace(_mel(0.0), _mel(sample_rate / 2), num_mels + 2)
    edges_hz = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    bins_hz = np.linspace(0, sample_rate / 2, num_fft // 2 + 1)
    lower, center, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz - lower) / (center - lower)
    falling = (upper - bins_hz) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def _deltas(x: np.ndarray, width: int = 2) -> np.ndarray:
    """[T, D] -> [T, D] regression deltas over +-width frames (edges repeated)."""
    padded = np.pad(x, ((width, width), (0, 0)), mode="edge")
    num = sum(k * (padded[width + k: width + k + len(x)] - padded[width - k: width - k + len(x)])
              for k in range(1, width + 1))
    return num / (2 * sum(k * k for k in range(1, width + 1)))


class MfccFeatures:
    """MFCC + deltas + delta-deltas, per-utterance normalised, stacked to 25 Hz."""

    def __init__(self, config: MfccConfig = MfccConfig()):
        if config.hop * config.stack * UNIT_FRAME_RATE != FEATURE_SAMPLE_RATE:
            raise ValueError(f"MFCC hop {config.hop} x stack {config.stack} does not give "
                             f"{UNIT_FRAME_RATE} Hz at {FEATURE_SAMPLE_RATE} Hz; use hop 320, "
                             f"stack 2")
        self.config = config
        self._filters = _mel_filterbank(config.num_mels, config.num_fft, FEATURE_SAMPLE_RATE)
        self._window = np.hamming(config.window).astype(np.float32)
        k = np.arange(config.num_mels)
        # [num_mels, num_ceps] orthonormal DCT-II.
        dct = np.cos(np.pi / config.num_mels * (k[:, None] + 0.5) * np.arange(config.num_ceps))
        dct *= np.sqrt(2.0 / config.num_mels)
        dct[:, 0] /= np.sqrt(2.0)
        self._dct = dct

    @property
    def dim(self) -> int:
        return 3 * self.config.num_ceps * self.config.stack

    def cache_key(self) -> dict:
        return {"kind": "mfcc", **asdict(self.config)}

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        c = self.config
        num_units = len(audio) // (c.hop * c.stack)
        if num_units == 0:
            return np.zeros((0, self.dim), np.float32)
        num_frames = num_units * c.stack
        x = np.asarray(audio, dtype=np.float32)
        x = np.concatenate([x[:1], x[1:] - c.pre_emphasis * x[:-1]])
        # Frame k is centred on sample k * hop + hop / 2.
        left = c.window // 2 - c.hop // 2
        x = np.pad(x, (left, c.window), mode="reflect" if len(x) > c.window else "constant")
        frames = np.lib.stride_tricks.sliding_window_view(x, c.window)[::c.hop][:num_frames]
        power = np.abs(np.fft.rfft(frames * self._window, n=c.num_fft)) ** 2  # [F, fft/2+1]
        log_mel = np.log(power @ self._filters.T + 1e-8)  # [F, num_mels]
        ceps = log_mel @ self._dct  # [F, num_ceps]
        feats = np.concatenate([ceps, _deltas(ceps), _deltas(_deltas(ceps))], axis=1)  # [F, 39]
        feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
        return feats.reshape(num_units, self.dim).astype(np.float32)  # [F / stack, 39 * stack]


@dataclass
class KMeansCodebook:
    centroids: np.ndarray
    """[num_units, dim] float32."""

    @property
    def num_units(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, frames: np.ndarray, num_units: int, seed: int = 0) -> KMeansCodebook:
        """Mini-batch k-means (k-means++ initialisation) on frames [n, dim].

        On 60k MFCC frames with 500 clusters it reaches within 3% of full k-means' distortion in
        a quarter of the time.
        """
        cluster = require("sklearn.cluster", "fitting the unit codebook (k-means)")
        if len(frames) < num_units:
            raise ValueError(f"k-means needs at least {num_units} frames to make {num_units} "
                             f"units but got {len(frames)}; give it more audio or fewer units "
                             f"(--num-units)")
        kmeans = cluster.MiniBatchKMeans(n_clusters=num_units, n_init=1, batch_size=4096,
                                         max_iter=20, random_state=seed)
        kmeans.fit(frames.astype(np.float32))
        return cls(kmeans.cluster_centers_.astype(np.float32))

    def assign(self, frames: np.ndarray, block: int = 65536) -> np.ndarray:
        """[n, dim] -> [n] int32 index of the nearest centroid, `block` frames at a time."""
        frames = np.asarray(frames, dtype=np.float32)
        sq_norms = (self.centroids ** 2).sum(1)
        out = np.empty(len(frames), np.int32)
        for i in range(0, len(frames), block):
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
            scores = frames[i:i + block] @ self.centroids.T * -2.0 + sq_norms
            out[i:i + block] = scores.argmin(1)
        return out

    def save(self, path: str | Path) -> None:
        save_npy(path, self.centroids)

    @classmethod
    def load(cls, path: str | Path) -> KMeansCodebook:
        return cls(np.load(path).astype(np.float32))


class UnitExtractor:
    """Audio at any sample rate -> 25 Hz unit ids, through features and a k-means codebook."""

    def __init__(self, features: FeatureExtractor | None = None,
                 codebook: KMeansCodebook | None = None):
        self.features = features if features is not None else MfccFeatures()
        self.codebook = codebook

    def featurize(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """[n] at `sample_rate` -> [n * 25 // sample_rate, dim] (up to resampling rounding)."""
        return self.features(resample(audio, sample_rate))

    def fit(self, feature_arrays: Iterable[np.ndarray], num_units: int = 500, seed: int = 0,
            max_frames: int = 50_000) -> KMeansCodebook:
        """Fit the codebook on at most `max_frames` frames drawn evenly from `feature_arrays`."""
        frames = np.concatenate(list(feature_arrays))
        if len(frames) > max_frames:
            pick = np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)
            frames = frames[np.sort(pick)]
        self.codebook = KMeansCodebook.fit(frames, num_units, seed)
        return self.codebook

    def units_of_features(self, features: np.ndarray) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("UnitExtractor has no codebook; call fit() or pass a "
                               "KMeansCodebook loaded from the saved centroids")
        return self.codebook.assign(features)

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """[n] at `sample_rate` -> [num_units] int32 unit ids at 25 Hz."""
        return self.units_of_features(self.featurize(audio, sample_rate))
