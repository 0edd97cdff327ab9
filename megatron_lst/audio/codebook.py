"""K-means codebooks stored without pickle: fit, save, load, and import of pickled quantizers.

A codebook is its centroids, [num_units, dim] float32, saved as `.npy` (read back with
`allow_pickle=False`) or `.safetensors` (tensor `centroids`, plus string metadata such as the
HuBERT layer it was fitted on). Fitting and nearest-centroid assignment are
`megatron_lst.demo_corpus.units.KMeansCodebook`'s (scikit-learn's mini-batch k-means).

The released textless quantizers (fairseq's `km.bin` files) are joblib pickles of scikit-learn
`MiniBatchKMeans` objects: unpickling runs whatever code the file names, so `load_codebook`
refuses them, and `import_pickled_codebook` reads one only when the caller says the file is
trusted, keeping just its `cluster_centers_`.
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import numpy as np

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.data.input_files import check_npy_data_size, checked_file_size
from megatron_lst.demo_corpus.units import KMeansCodebook

CODEBOOK_SUFFIXES = (".npy", ".safetensors")
_NPY_MAGIC = b"\x93NUMPY"


class CodebookError(ValueError):
    """A codebook file is unsafe, malformed or of the wrong kind."""


def _looks_pickled(head: bytes) -> bool:
    # Pickle protocol 2+ starts with PROTO (0x80); compressed joblib files are zlib streams
    # (0x78, then a checksum byte) or gzip (1f 8b) around a pickle.
    zlib = head[:1] == b"x" and len(head) > 1 and int.from_bytes(head[:2], "big") % 31 == 0
    return head[:1] == b"\x80" or zlib or head[:2] == b"\x1f\x8b"


def _checked(centroids: np.ndarray, where: str) -> np.ndarray:
    if centroids.ndim != 2 or centroids.dtype.kind != "f" or 0 in centroids.shape:
        raise CodebookError(f"{where}: expected centroids [num_units, dim] of floats, got "
                            f"{centroids.dtype} with shape {centroids.shape}")
    # Checked in the file's own dtype before any arithmetic: casting a (signalling) NaN or a
    # value past float32's range printed a RuntimeWarning before the refusal.
    if not np.isfinite(centroids).all():
        raise CodebookError(f"{where}: the centroids hold NaN or infinite values")
    float32_max = np.finfo(np.float32).max
    if (np.abs(centroids) > float32_max).any():
        raise CodebookError(f"{where}: the centroids hold values beyond float32's range "
                            f"(+-{float32_max:.3g}), which would be infinite as float32; this is "
                            f"not a k-means codebook of speech features")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    squared_norms = (centroids.astype(np.float64) ** 2).sum(1)  # [num_units], at most ~1e77 each
    if not (squared_norms < float32_max).all():
        raise CodebookError(f"{where}: the centroids are too large for float32 distances "
                            f"(squared norm up to {squared_norms.max():.3g}); this is not a "
                            f"k-means codebook of speech features")
    distinct = len(np.unique(centroids, axis=0))
    if distinct < len(centroids):
        raise CodebookError(f"{where}: only {distinct} of its {len(centroids)} centroids are "
                            f"distinct, and a repeated centroid is a unit that never occurs; "
                            f"this is not a fitted k-means codebook")
    return centroids


def check_codebook_suffix(path: Path, name: str | None = None) -> None:
    """Raise CodebookError unless `path` (called `name` in the message) is a codebook file name."""
    if path.suffix not in CODEBOOK_SUFFIXES:
        raise CodebookError(f"{name or path}: a codebook is saved as "
                            f"{' or '.join(CODEBOOK_SUFFIXES)}")


def save_codebook(codebook: KMeansCodebook, path: str | Path,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write the centroids to `path` (`.npy`, or `.safetensors` with `metadata`), atomically: a
    write that fails (a full disk) or is killed leaves the file that was there, and a failed
    write removes its partial file."""
    path = Path(path)
    check_codebook_suffix(path)
    if metadata and path.suffix == ".npy":
        raise CodebookError(f"{path}: .npy files carry no metadata; save as .safetensors")
    centroids = _checked(codebook.centroids, str(path))
    if path.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, centroids)
        content = buffer.getvalue()
    else:
        from safetensors.numpy import save

        content = save({"centroids": centroids},
                       metadata={k: str(v) for k, v in (metadata or {}).items()})
    replace_file_durably(path, content)
    return path


def load_codebook(path: str | Path) -> KMeansCodebook:
    """The codebook saved at `path`; refuses pickles and anything but a float [K, D] array."""
    path = Path(path)
    checked_file_size(path, CodebookError, "codebook file")  # a FIFO was "no such codebook"
    with open(path, "rb") as f:
        head = f.read(8)
    if _looks_pickled(head):
        raise CodebookError(
            f"{path}: is a pickle (e.g. a joblib-saved scikit-learn k-means, as the textless "
            f"quantizers are released); loading it could run arbitrary code. If you trust the "
            f"file, convert it once: python tools/train_kmeans.py import {path} --trust-pickle "
            f"--output codebook.npy")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CodebookError(f"{path}: not a readable safetensors file ({error})") from None
        except TypeError as error:  # a dtype numpy lacks, e.g. bfloat16
            raise CodebookError(f"{path}: holds a tensor numpy cannot read ({error}); save the "
                                f"centroids as float32") from None
        if "centroids" not in tensors:
            raise CodebookError(f"{path}: has no 'centroids' tensor (found {sorted(tensors)})")
        return KMeansCodebook(_checked(tensors["centroids"], str(path)))
    if head[:6] != _NPY_MAGIC:
        raise CodebookError(f"{path}: not a .npy or .safetensors codebook (a pickled k-means "
                            f"converts with: python tools/train_kmeans.py import {path} "
                            f"--trust-pickle --output codebook.npy)")
    check_npy_data_size(path, CodebookError)
    try:
        centroids = np.load(path, allow_pickle=False)
    # ValueError: an object array (numpy would need to unpickle it) or cut short; SyntaxError,
    # TokenError: a damaged header, which numpy parses as a Python literal.
    except (ValueError, SyntaxError, tokenize.TokenError) as error:
        raise CodebookError(f"{path}: not a plain numeric array ({error})") from None
    return KMeansCodebook(_checked(centroids, str(path)))


def codebook_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` codebook ({} for `.npy`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def import_pickled_codebook(path: str | Path, trust_pickle: bool = False) -> KMeansCodebook:
    """The centroids of a pickled k-means model (a scikit-learn object saved with joblib or
    pickle, like the textless quantizers' `km.bin`), read only with `trust_pickle=True`."""
    path = Path(path)
    if not trust_pickle:
        raise CodebookError(
            f"{path}: importing a pickled quantizer unpickles it, which runs any code the file "
            f"names; do it only for a file from a source you trust, with --trust-pickle")
    import joblib

    try:
        model = joblib.load(path)  # the trusted unpickling: the one place that runs file code
    except OSError:
        raise
    except Exception as error:  # not a pickle, cut short, or naming a module not installed
        raise CodebookError(f"{path}: cannot unpickle it ({type(error).__name__}: {error}); "
                            f"expected a joblib or pickle file of a scikit-learn k-means (like "
                            f"the textless quantizers' km.bin), read with its packages "
                            f"installed") from None
    centroids = getattr(model, "cluster_centers_", None)
    if centroids is None:
        raise CodebookError(f"{path}: unpickled a {type(model).__name__}, which has no "
                            f"cluster_centers_; expected a scikit-learn k-means model")
    return KMeansCodebook(_checked(np.asarray(centroids), str(path)))


def fit_codebook(features: list[np.ndarray], num_units: int, max_frames: int,
                 seed: int = 0) -> KMeansCodebook:
    """Mini-batch k-means on at most `max_frames` frames drawn uniformly from `features`
    (arrays [T_i, dim]), seeded: the same inputs give the same centroids."""
    frames = np.concatenate(features)
    if len(frames) > max_frames:
        pick = np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)
        frames = frames[np.sort(pick)]
    rows = np.ascontiguousarray(frames)  # [n, dim], each row compared as one opaque value
    distinct = len(np.unique(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1])))))
    if distinct < num_units:  # scikit-learn would repeat centroids: units that never occur
        raise CodebookError(f"the sampled features hold only {distinct} distinct frames for "
                            f"{num_units} clusters (silent or repeated audio?); fit on more "
                            f"varied speech, or ask for fewer --num-units")
    return KMeansCodebook.fit(frames, num_units, seed)
