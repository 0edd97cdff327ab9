import numpy as np
import pytest

from megatron_lst.demo_corpus.tts import Voice
from megatron_lst.demo_corpus.units import (
    KMeansCodebook,
    MfccFeatures,
    UnitExtractor,
    resample,
)

pytest.importorskip("scipy", reason="scipy is not installed (pip install 'megatron-lst[data]')")
pytest.importorskip("sklearn", reason="scikit-learn is not installed "
                    "(pip install 'megatron-lst[data]')")


def _tone(seconds, hz, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_resample_22050_to_16000_keeps_the_duration_and_the_tone():
    x = _tone(1.0, 440, rate=22050)
    y = resample(x, 22050)
    assert len(y) == 16000  # 160/441 would give 7256 samples
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
@pytest.mark.parametrize("rate", [22050, 24000, 8000])
def test_resample_with_its_filter_made_once_is_resample_polys_default(dtype, rate):
    """The low-pass filter made once per ratio gives scipy's own output bit for bit (the demo
    corpus resamples eSpeak NG's float32 at 22.05 kHz; floats get the filter in their dtype)."""
    from scipy.signal import resample_poly

    x = (_tone(0.3, 440, rate=rate) * (30000 if dtype == np.int16 else 1)).astype(dtype)
    g = np.gcd(16000, rate)
    want = resample_poly(x, 16000 // g, rate // g).astype(np.float32)
    for _ in range(2):  # the filter made, then reused
        assert np.array_equal(resample(x, rate), want)


def test_mfcc_shape_rate_and_normalisation():
    audio = np.random.default_rng(0).normal(size=16000 * 2 + 123).astype(np.float32)
    feats = MfccFeatures()(audio)
    assert feats.shape == (50, 78) and feats.dtype == np.float32  # 25 Hz, 39 x 2 stacked
    per_frame = feats.reshape(100, 39)  # back to the 50 Hz frames
    np.testing.assert_allclose(per_frame.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(per_frame.std(0), 1, atol=1e-3)
    assert MfccFeatures()(audio[:639]).shape == (0, 78)


def test_mfcc_follows_the_sound_in_time():
    # 1 s of a low tone then 1 s of a high tone: the first coefficients flip halfway.
    audio = np.concatenate([_tone(1.0, 300), _tone(1.0, 3000)])
    c1 = MfccFeatures()(audio)[:, 1]
    assert len(set(np.sign(c1[2:23]))) == 1 and len(set(np.sign(c1[27:48]))) == 1
    assert np.sign(c1[10]) != np.sign(c1[40])


def test_codebook_assigns_the_nearest_centroid_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 5)).astype(np.float32) * 10
    frames = (centers[rng.integers(8, size=2000)] + rng.normal(size=(2000, 5))).astype(np.float32)
    codebook = KMeansCodebook.fit(frames, 8, seed=0)
    brute = ((frames[:, None] - codebook.centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(codebook.assign(frames, block=300), brute)
    # Every true cluster maps to one unit.
    labels = codebook.assign(centers)
    assert len(set(labels.tolist())) == 8
    codebook.save(tmp_path / "c.npy")
    np.testing.assert_array_equal(KMeansCodebook.load(tmp_path / "c.npy").centroids,
                                  codebook.centroids)
    # The fix it names is a flag of both tools that fit a codebook (the demo corpus builder
    # and tools/train_kmeans.py, whose audio is recorded, not synthesised).
    with pytest.raises(ValueError, match=r"at least 9 frames .* fewer units \(--num-units\)"):
        KMeansCodebook.fit(frames[:8], 9)


def test_extractor_needs_a_codebook():
    with pytest.raises(RuntimeError, match="no codebook"):
        UnitExtractor()(np.zeros(16000, np.float32), 16000)


def _edit_similarity(a, b):
    d = np.arange(len(b) + 1)
    for i in range(1, len(a) + 1):
        prev, d = d, d.copy()
        d[0] = i
        for j in range(1, len(b) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
    return 1 - d[-1] / max(len(a), len(b))


def test_units_are_real(synthesizer):
    """Two speakers saying the same word agree far more than the same speakers saying others."""
    from megatron_lst.demo_corpus.stories import generate_stories

    voices = [Voice("en-us+m3"), Voice("en+f2"), Voice("en-gb-x-rp+m1")]
    extractor = UnitExtractor()
    fit = [extractor.featurize(synthesizer.synthesize(s.text, voices[i % 3]).audio, 22050)
           for i, s in enumerate(generate_stories(0, 4, "train"))]
    extractor.fit(fit, num_units=64, seed=0)
    words = ["butterfly", "kitchen", "pancake", "umbrella", "yellow", "basket"]
    units = {(w, v.name): extractor(synthesizer.synthesize(w, v).audio, 22050)
             for w in words for v in voices}
    same, different = [], []
    for (w1, v1), u1 in units.items():
        for (w2, v2), u2 in units.items():
            if v1 < v2:
                (same if w1 == w2 else different).append(_edit_similarity(u1, u2))
    assert np.mean(same) > 3 * np.mean(different) and np.mean(same) > np.mean(different) + 0.1
