"""Generated audio for the audio tests: sines plus noise at several sample rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_lst.audio.audio_io import write_wav

# (sample rate, seconds): 8k, 22.05k and 44.1k exercise the resampling, 16k passes through.
CLIPS = [(8000, 1.30), (22050, 0.95), (44100, 1.72), (16000, 2.07), (22050, 1.51), (8000, 0.66)]


def tone(sample_rate: int, seconds: float, seed: int) -> np.ndarray:
    """[round(sample_rate * seconds)] float32: two sines that change pitch, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    pitch = rng.uniform(120, 300) * (1 + 0.5 * (t > seconds / 2))
    wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.2 * np.sin(2 * np.pi * 3.1 * pitch * t)
    return (wave + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def write_clips(directory: Path) -> list[Path]:
    """The CLIPS as 16-bit wav files `<directory>/spk<k>/utt<i>.wav`."""
    paths = []
    for i, (rate, seconds) in enumerate(CLIPS):
        path = directory / f"spk{i % 2}" / f"utt{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, tone(rate, seconds, seed=i), rate)
        paths.append(path)
    return paths
