import errno
import pickle
import warnings

import numpy as np
import pytest

from megatron_lst.audio.codebook import (
    CodebookError,
    codebook_metadata,
    fit_codebook,
    import_pickled_codebook,
    load_codebook,
    save_codebook,
)
from megatron_lst.demo_corpus.units import KMeansCodebook

pytest.importorskip("sklearn")


def _features(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 5)) * 4
    return [(centres[rng.integers(0, 6, 80)] + 0.3 * rng.standard_normal((80, 5))
             ).astype(np.float32) for _ in range(5)]


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_fit_save_load_assign_round_trip(tmp_path, suffix):
    features = _features()
    codebook = fit_codebook(features, num_units=6, max_frames=300, seed=0)
    path = save_codebook(codebook, tmp_path / f"km{suffix}",
                         {"layer": "6"} if suffix == ".safetensors" else None)
    loaded = load_codebook(path)
    np.testing.assert_array_equal(loaded.centroids, codebook.centroids)
    frames = np.concatenate(features)
    np.testing.assert_array_equal(loaded.assign(frames), codebook.assign(frames))
    # Six well separated clusters: every frame of one cluster gets one unit, and all 6 are used.
    assert len(np.unique(codebook.assign(frames))) == 6
    assert codebook_metadata(path) == ({"layer": "6"} if suffix == ".safetensors" else {})
    # Seeded: the same sample gives the same centroids.
    again = fit_codebook(features, num_units=6, max_frames=300, seed=0)
    np.testing.assert_array_equal(again.centroids, codebook.centroids)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_a_save_that_fills_the_disk_keeps_the_codebook_there(tmp_path, suffix, disk_full_at):
    """np.save dropped the error of a full disk, and a codebook cut short replaced the one
    there (train_kmeans said it wrote it); a failed safetensors save left its partial file."""
    path = save_codebook(fit_codebook(_features(), 6, 300, seed=0), tmp_path / f"km{suffix}")
    before = path.read_bytes()
    larger = KMeansCodebook(np.random.default_rng(0).standard_normal((200, 5)).astype(np.float32))
    with disk_full_at(len(before) + 100), pytest.raises(OSError) as full:
        save_codebook(larger, path)
    assert full.value.errno == errno.EFBIG, full.value  # the write the full disk stopped
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_loader_refuses_pickles(tmp_path):
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=4, n_init=1, random_state=0).fit(
        np.concatenate(_features()))
    for name, dump in [("km.bin", lambda p: joblib.dump(kmeans, p)),
                       ("km.npy", lambda p: p.write_bytes(pickle.dumps(kmeans.cluster_centers_))),
                       ("z.bin", lambda p: joblib.dump(kmeans, p, compress=3)),
                       ("gz.bin", lambda p: joblib.dump(kmeans, p, compress=("gzip", 3)))]:
        path = tmp_path / name
        dump(path)
        with pytest.raises(CodebookError, match="is a pickle.*--trust-pickle"):
            load_codebook(path)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CodebookError, match="not a plain numeric array"):
        load_codebook(objects)


def test_pickled_quantizer_imports_only_when_trusted(tmp_path):
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=4, n_init=1, random_state=0).fit(
        np.concatenate(_features()))
    path = tmp_path / "km.bin"
    joblib.dump(kmeans, path)
    with pytest.raises(CodebookError, match="--trust-pickle"):
        import_pickled_codebook(path)
    codebook = import_pickled_codebook(path, trust_pickle=True)
    save_codebook(codebook, tmp_path / "km.npy")
    loaded = load_codebook(tmp_path / "km.npy")
    np.testing.assert_array_equal(loaded.centroids, kmeans.cluster_centers_.astype(np.float32))
    frames = np.concatenate(_features(1))
    np.testing.assert_array_equal(loaded.assign(frames), kmeans.predict(frames))

    joblib.dump({"not": "kmeans"}, tmp_path / "other.bin")
    with pytest.raises(CodebookError, match="no cluster_centers_"):
        import_pickled_codebook(tmp_path / "other.bin", trust_pickle=True)


def test_malformed_codebooks_are_refused(tmp_path):
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), np.int64))
    with pytest.raises(CodebookError, match=r"centroids \[num_units, dim\] of floats"):
        load_codebook(tmp_path / "ints.npy")
    np.save(tmp_path / "nan.npy", np.full((4, 3), np.nan, np.float32))
    with pytest.raises(CodebookError, match="NaN"):
        load_codebook(tmp_path / "nan.npy")
    np.save(tmp_path / "header.npy", np.zeros((4, 3), np.float32))
    damaged = (tmp_path / "header.npy").read_bytes().replace(b"}", b" ")  # tokenize.TokenError
    for broken in (damaged, damaged.replace(b"'<f4'", b"',f4'")):  # SyntaxError
        (tmp_path / "header.npy").write_bytes(broken)
        with pytest.raises(CodebookError, match=r"header\.npy: not a plain numeric array"):
            load_codebook(tmp_path / "header.npy")
    (tmp_path / "text.npy").write_text("0 1 2")
    with pytest.raises(CodebookError, match="not a .npy or .safetensors codebook"):
        load_codebook(tmp_path / "text.npy")


def test_bfloat16_safetensors_codebook_is_refused_by_name(tmp_path):
    """numpy has no bfloat16: safetensors' TypeError was a traceback."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"centroids": torch.ones(4, 3, dtype=torch.bfloat16)}, tmp_path / "bf16.safetensors")
    with pytest.raises(CodebookError, match=r"bf16\.safetensors: .*bfloat16.*save the centroids "
                                            r"as float32"):
        load_codebook(tmp_path / "bf16.safetensors")


SIGNALLING_NAN = np.array([0x7F800001], np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("value, dtype, message", [
    (1e200, np.float64, r"km.npy: the centroids hold values beyond float32's range \(\+-3.4e\+38"
                        r"\), which would be infinite as float32"),  # finite float64
    (3e38, np.float64, "too large for float32 distances"),  # finite float32, ||c||^2 overflows
    (SIGNALLING_NAN, np.float32, "the centroids hold NaN or infinite values"),
])
def test_centroids_that_are_nan_or_overflow_float32_are_refused(tmp_path, value, dtype, message):
    """Such centroids loaded as inf (or gave inf distances), and every frame became unit 0.
    They are refused without a RuntimeWarning: casting a signalling NaN printed one first."""
    np.save(tmp_path / "km.npy", np.full((4, 3), value, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CodebookError, match=message):
            load_codebook(tmp_path / "km.npy")


@pytest.mark.parametrize("content", [b"", b"0 1 2\n", b"\x80\x04\x95\x10", b"NUMPY\x00\x01"])
def test_importing_a_file_that_is_no_pickle_names_it(tmp_path, content):
    """An empty, text, cut-off or other file was an EOFError, IndexError or KeyError from the
    unpickler."""
    pytest.importorskip("joblib")
    path = tmp_path / "km.bin"
    path.write_bytes(content)
    with pytest.raises(CodebookError, match=r"km\.bin: cannot unpickle it \(.*scikit-learn"):
        import_pickled_codebook(path, trust_pickle=True)


@pytest.mark.parametrize("distinct", [1, 3])
def test_fit_on_too_few_distinct_frames_is_refused(distinct):
    """Silent audio gives identical frames: k-means returned 8 equal centroids (every frame
    unit 0) and train_kmeans wrote that codebook without a word."""
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((distinct, 5)).astype(np.float32)[rng.integers(0, distinct, 200)]
    with pytest.raises(CodebookError, match=rf"features hold only {distinct} distinct frames "
                                            r"for 8 clusters \(silent or repeated audio\?\)"):
        fit_codebook([frames[:120], frames[120:]], num_units=8, max_frames=1000)


def test_codebook_with_repeated_centroids_is_refused(tmp_path):
    """An all-zero (or otherwise repeated) centroid array loaded, and every frame became unit 0."""
    centroids = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    centroids[2] = centroids[0]
    np.save(tmp_path / "km.npy", centroids)
    with pytest.raises(CodebookError, match=r"km\.npy: only 3 of its 4 centroids are distinct"):
        load_codebook(tmp_path / "km.npy")
    np.save(tmp_path / "zeros.npy", np.zeros((8, 3), np.float32))
    with pytest.raises(CodebookError, match=r"zeros\.npy: only 1 of its 8 centroids"):
        load_codebook(tmp_path / "zeros.npy")
