"""Damaged copies of one valid file of each kind the product reads, each read back.

A reader must either load a mutant (a harmless damage: a changed label, a changed unit) into a
result that still holds its invariants, or refuse it with the product's own error type, naming
the file. Anything else is a bug: another exception type (a RuntimeWarning included), a message
without the file, a hang (each case runs under an alarm), or an attempt to allocate what a
damaged header declares (each case runs under an address-space limit, so the attempt is a
MemoryError instead of a machine out of memory). Mutations are deterministic: empty file, truncations, byte flips in the header
region, appended bytes, and per kind a header declaring a huge length or count, NaN/inf samples,
impossible sample rates and channel counts.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import struct
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.audio.audio_io import MAX_FLOAT_PEAK, AudioError, audio_info, read_audio
from megatron_lst.audio.codebook import CodebookError, load_codebook, save_codebook
from megatron_lst.audio.corpus import CorpusError, read_tsv
from megatron_lst.audio.units_record import read_units_record
from megatron_lst.data.documents import AlignedDocument, DocumentError, check_document_of
from megatron_lst.data.indexed import DocumentStore, DocumentWriter
from megatron_lst.data.jsonl_corpus import read_reference_jsonl
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.data.textgrid import Interval, read_textgrid, write_textgrid
from megatron_lst.data.unit_files import load_units
from megatron_lst.demo_corpus.units import KMeansCodebook
from megatron_lst.evaluation.items import ItemError, load_items
from megatron_lst.tokenizer.text_tokenizer import (
    joint_vocab,
    load_text_tokenizer,
)
from megatron_lst.tokenizer.vocab import VocabularyError

NUM_UNITS = 20
CASE_SECONDS = 10
"""A case that runs longer hangs (a real read of these files takes milliseconds)."""
MEMORY_HEADROOM = 1 << 30
"""Bytes a case may map beyond what the process holds: far more than any of these files needs."""


@dataclass(frozen=True)
class Kind:
    """One kind of input file: how to read it, and what a read result must satisfy."""

    name: str
    build: Callable[[Path], Path]
    """Writes the valid file under the folder given; returns its path."""
    read: Callable[[Path], object]
    errors: tuple[type[Exception], ...]
    check: Callable[[object], None] = lambda result: None
    """Asserts the invariants of a result read from a harmless mutant."""
    header: int = 64
    """Bytes at the start whose every byte is flipped."""


# Builders of the valid files

def _write_pcm(path: Path, samples: np.ndarray, width: int, rate: int = 16000) -> Path:
    """`samples` ([n, channels] float in [-1, 1]) as a `width`-byte integer PCM wav."""
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(samples * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.ravel())
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


def _tone(channels: int = 1, n: int = 400) -> np.ndarray:
    """[n, channels] float64: a sine at amplitude 0.5."""
    wave_ = 0.5 * np.sin(np.arange(n) / 7.0)
    return np.stack([wave_ * (c + 1) / channels for c in range(channels)], axis=1)


def _write_soundfile(path: Path, subtype: str) -> Path:
    """A mono tone written by libsndfile: a float wav, or a flac, by the suffix of `path`."""
    import soundfile

    soundfile.write(str(path), _tone().astype(np.float32), 16000, subtype=subtype)
    return path


def _write_textgrid(path: Path) -> Path:
    write_textgrid(path, [Interval(0.0, 0.4, "hello"), Interval(0.4, 0.6, ""),
                          Interval(0.6, 1.0, "world")])
    return path


def _write_utf16_textgrid(path: Path) -> Path:
    """The TextGrid as Praat saves one with non-ASCII labels: UTF-16 with a byte-order mark."""
    _write_textgrid(path)
    path.write_bytes(path.read_text(encoding="utf-8").replace("hello", "héllo").encode("utf-16"))
    return path


def _write_items(path: Path) -> Path:
    def part(words: str, seed: int) -> dict:
        units = np.random.default_rng(seed).integers(0, NUM_UNITS, 3 * len(words.split()))
        return {"text": words, "units": units.tolist(),
                "segments": [[word, 3] for word in words.split()]}

    records = [{"id": f"item-{i}", "context": part("the model is", i),
                "endings": [part("a word", i + 10), part("the time", i + 20)], "label": i % 2}
               for i in range(2)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _write_reference_jsonl(path: Path) -> Path:
    sep = "<LST MODE SEP>"
    lines = [{"file_id": f"u{i}", "interleaved": f"{sep}TEXT hello {sep}HUBERT 1 2 3 {sep}HUBERT "
                                                 f"4 5 {sep}TEXT world {sep}HUBERT 6 7 {i}"}
             for i in range(3)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _write_units_npy(path: Path) -> Path:
    np.save(path, np.arange(25, dtype=np.int64) % NUM_UNITS)
    return path


def _write_store(folder: Path, tokenizer, damaged: str) -> Path:
    """An aligned dataset of 3 documents, as tools/preprocess_data.py writes it, at
    `folder/data.*`; returns its `damaged` file (".idx", ".bin" or ".json")."""
    writer = DocumentWriter(folder / "data", "aligned")
    counts = Counts(documents=3)
    for i in range(3):
        document = AlignedDocument(np.array([5, 6, 7 + i], np.int32), np.arange(1, 5, dtype=np.int32),
                                   np.array([2, 1], np.int32), np.array([3, 1], np.int32))
        writer.add_aligned(document)
        counts.segments, counts.text_pieces, counts.units = (
            counts.segments + 2, counts.text_pieces + 3, counts.units + 4)
    writer.finalize(Manifest(
        "aligned", joint_vocab(tokenizer, NUM_UNITS).to_dict(),
        TokenizerInfo(tokenizer.path, tokenizer.sha256, tokenizer.vocab_size), NUM_UNITS, 25.0,
        counts, ["memory"]))
    return folder / f"data{damaged}"


def _read_store(path: Path) -> DocumentStore:
    """The store of the damaged file `path` (`m<k>_data.idx`), its other files copied beside it
    under its name, each document checked as the row-index build checks it."""
    prefix = path.with_suffix("")
    for suffix in (".idx", ".bin", ".json"):
        if suffix != path.suffix:
            Path(f"{prefix}{suffix}").write_bytes((path.parent / f"data{suffix}").read_bytes())
    store = DocumentStore(prefix)
    for doc_id in range(len(store)):
        check_document_of(store, doc_id, store[doc_id], store.vocab)
    return store


def _write_tsv(path: Path) -> Path:
    for name in ("a", "b"):
        _write_pcm(path.parent / f"{name}.wav", _tone(), 2)
    path.write_text("path\ttext\na.wav\thello world\nb.wav\tthe model\n")
    return path


def _write_units_record(path: Path) -> Path:
    path.write_text(json.dumps({"model": "hubert-base", "layer": 6, "num_units": NUM_UNITS,
                                "frame_rate": 25.0, "codebook_sha256": "0" * 64}))
    return path


def _copy(source: Path, path: Path) -> Path:
    path.write_bytes(source.read_bytes())
    return path


def _write_codebook(path: Path) -> Path:
    """A codebook of 4 centroids, `.npy` or `.safetensors` (with metadata) by `path`'s suffix."""
    centroids = KMeansCodebook(np.arange(24, dtype=np.float32).reshape(4, 6))
    metadata = {"layer": "6"} if path.suffix == ".safetensors" else None
    return save_codebook(centroids, path, metadata)


# Checks of what a harmless mutant reads as

def _check_audio(result) -> None:
    samples, rate = result
    # Integer PCM reads into [-1, 1]; a float file may hold louder samples, up to a bound.
    assert samples.ndim == 1 and np.isfinite(samples).all()
    assert np.abs(samples).max(initial=0.0) <= MAX_FLOAT_PEAK
    assert 1000 <= rate <= 1_000_000


def _check_units(result) -> None:
    assert result.dtype == np.int64 and result.ndim == 1


def _check_intervals(result) -> None:
    assert all(np.isfinite([iv.start, iv.end]).all() and iv.start <= iv.end for iv in result)


def _check_documents(result) -> None:
    for source in result:
        source.document.validate(NUM_UNITS, source.where)


def _kinds(tokenizer) -> list[Kind]:
    vocab = joint_vocab(tokenizer, NUM_UNITS)
    audio = dict(read=read_audio, errors=(AudioError,), check=_check_audio)
    wavs = [Kind(f"wav-{name}", lambda d, name=name, width=width, channels=channels:
                 _write_pcm(d / f"{name}.wav", _tone(channels), width), **audio)
            for name, width, channels in (("pcm8", 1, 1), ("pcm16", 2, 1), ("pcm24", 3, 1),
                                          ("pcm32", 4, 1), ("pcm16-stereo", 2, 2))]
    return [
        *wavs,
        Kind("wav-float", lambda d: _write_soundfile(d / "float.wav", "FLOAT"), **audio),
        Kind("flac", lambda d: _write_soundfile(d / "a.flac", "PCM_16"), **audio),
        Kind("wav-info", lambda d: _write_pcm(d / "info.wav", _tone(2), 2), audio_info,
             (AudioError,)),
        Kind("textgrid", lambda d: _write_textgrid(d / "a.TextGrid"), read_textgrid,
             (DocumentError,), _check_intervals, header=120),
        Kind("textgrid-utf16", lambda d: _write_utf16_textgrid(d / "a.TextGrid"), read_textgrid,
             (DocumentError,), _check_intervals, header=240),
        Kind("units-npy", lambda d: _write_units_npy(d / "a.npy"), load_units,
             (DocumentError,), _check_units, header=128),
        Kind("units-txt", lambda d: (d / "a.txt").write_text("1 2 3 4 5 17 0\n") and d / "a.txt",
             load_units, (DocumentError,), _check_units),
        Kind("codebook", lambda d: _write_codebook(d / "codebook.npy"), load_codebook,
             (CodebookError,), header=128),
        Kind("codebook-safetensors", lambda d: _write_codebook(d / "codebook.safetensors"),
             load_codebook, (CodebookError,), header=128),
        Kind("items", lambda d: _write_items(d / "items.jsonl"),
             lambda path: load_items(path, tokenizer, vocab), (ItemError,)),
        Kind("sentencepiece", lambda d: _copy(Path(tokenizer.path), d / "spm.model"),
             load_text_tokenizer, (VocabularyError,), header=160),
        *[Kind(f"dataset{suffix}", lambda d, suffix=suffix: _write_store(d, tokenizer, suffix),
               _read_store, (DocumentError,)) for suffix in (".idx", ".bin", ".json")],
        Kind("tsv", lambda d: _write_tsv(d / "list.tsv"), read_tsv, (CorpusError,)),
        # The record's reader raises ValueError naming the file.
        Kind("units-record", lambda d: _write_units_record(d / "units.json"), read_units_record,
             (ValueError,)),
        Kind("reference-jsonl", lambda d: _write_reference_jsonl(d / "corpus.jsonl"),
             lambda path: list(read_reference_jsonl(path, tokenizer, NUM_UNITS)),
             (DocumentError, VocabularyError), _check_documents),
    ]


# Mutations

def _mutants(data: bytes, header: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each damaged copy of `data`."""
    yield "empty", b""
    for cut in sorted({1, 4, 8, 12, 16, 24, 36, 40, 44, len(data) // 2, len(data) - 1}):
        if 0 < cut < len(data):
            yield f"truncated at {cut}", data[:cut]
    for position in range(min(header, len(data))):
        yield f"byte {position} flipped", _flip(data, position, 0xFF)
    rng = random.Random(seed)
    for _ in range(RANDOM_FLIPS):
        position = rng.randrange(len(data))
        mask = rng.randrange(1, 256)
        yield f"byte {position} xor {mask:#x}", _flip(data, position, mask)
    for _ in range(RANDOM_FIELDS):  # a length or count field, wherever it is, made extreme
        position = rng.randrange(len(data))
        field = rng.choice(_EXTREME_FIELDS)
        yield f"bytes {position}.. = {field.hex()}", (data[:position] + field + data[
            position + len(field):])[:max(len(data), position + len(field))]
    for tail in (b"\x00" * 3, b"\n{}\n", b"\xff\xfe\x00garbage", bytes(range(256))):
        yield f"{len(tail)} bytes appended", data + tail


RANDOM_FLIPS, RANDOM_FIELDS = 200, 60
_EXTREME_FIELDS = (b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                   b"\x00\x00\x00\x00", b"\xff" * 8, b"\x00" * 7 + b"\x10")


def _flip(data: bytes, position: int, mask: int) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1:]


def _wav_header_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """A wav header with impossible fields, at their offsets in a canonical 44-byte header
    (`fmt ` at 12, `data` at 36)."""
    fields = {"RIFF length": (4, "<I"), "channels": (22, "<H"), "sample rate": (24, "<I"),
              "byte rate": (28, "<I"), "block align": (32, "<H"), "bits": (34, "<H"),
              "data length": (40, "<I"), "fmt length": (16, "<I")}
    for name, (offset, fmt) in fields.items():
        for value in (0, 1, 3, 2**(8 * struct.calcsize(fmt)) - 1, 2**(8 * struct.calcsize(fmt)) // 2):
            yield f"{name} = {value}", data[:offset] + struct.pack(fmt, value) + data[
                offset + struct.calcsize(fmt):]


def _float_samples_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    body = np.frombuffer(data[-400 * 4:], "<f4").copy()
    for name, value in (("NaN", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("1e30", 1e30)):
        body[7] = value
        yield f"a {name} sample", data[:-400 * 4] + body.tobytes()


def _npy_header_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The .npy header declaring a huge or impossible shape, same header length."""
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10:10 + header_len].decode("latin1")
    for shape in ("(1152921504606846976,)", "(4611686018427387904, 4)", "(-5,)", "(3, -4)",
                  "(99999999999999999999999,)", "(1e3,)"):
        for old in ("(25,)", "(4, 6)"):
            if old in header:
                new = header.replace(old, shape)
                new = new[:header_len - 1].ljust(header_len - 1) + "\n"
                yield f"shape {shape}", data[:10] + new.encode("latin1") + data[10 + header_len:]


def _textgrid_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    text = data.decode("utf-8")
    for old, new in (("intervals: size = 3", "intervals: size = 1152921504606846976"),
                     ("size = 1", "size = 1152921504606846976"),
                     ("size = 1", "size = 1e300"), ("xmax = 1", "xmax = nan"),
                     ("xmin = 0.4", "xmin = inf"), ('text = "hello"', 'text = "hel'),
                     ("intervals: size = 3", "intervals: size = -3")):
        yield f"{old!r} -> {new!r}", text.replace(old, new, 1).encode("utf-8")


def _kind_mutants(kind: Kind, data: bytes) -> Iterator[tuple[str, bytes]]:
    if kind.name.startswith("wav-"):  # the fields up to `fmt `'s end lie alike in every wav
        yield from _wav_header_mutants(data)
    if kind.name == "wav-float":
        yield from _float_samples_mutants(data)
    if kind.name in ("units-npy", "codebook"):
        yield from _npy_header_mutants(data)
    if kind.name == "textgrid":
        yield from _textgrid_mutants(data)
    if kind.name in ("items", "reference-jsonl", "units-record", "dataset.json"):
        yield "nested 100000 deep", b"[" * 100_000 + b"\n"


# Running one case

class _Hang(Exception):
    pass


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """An alarm after CASE_SECONDS, and an address space of what the process maps now plus
    MEMORY_HEADROOM, both lifted on leaving."""
    def alarm(signum, frame):
        raise _Hang

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    resource.setrlimit(resource.RLIMIT_AS, (min(mapped + MEMORY_HEADROOM, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(kind: Kind, path: Path) -> str | None:
    """None when the reader did its job on the file at `path`; else what went wrong."""
    try:
        with _guarded():
            result = kind.read(path)
    except _Hang:
        return f"no answer in {CASE_SECONDS} s"
    except kind.errors as error:
        if path.name not in str(error):
            return f"{type(error).__name__} without the file's name: {error}"
        return None
    except Exception as error:  # noqa: BLE001 - any other type is what this test finds
        return f"{type(error).__name__}: {error}"
    try:
        kind.check(result)
    except AssertionError:
        return f"read as a result that breaks its invariants: {result!r:.200}"
    return None


KIND_NAMES = ["wav-pcm8", "wav-pcm16", "wav-pcm24", "wav-pcm32", "wav-pcm16-stereo",
              "wav-float", "flac", "wav-info", "textgrid", "textgrid-utf16", "units-npy", "units-txt", "codebook", "codebook-safetensors", "items",
              "sentencepiece", "dataset.idx", "dataset.bin", "dataset.json", "tsv", "units-record",
              "reference-jsonl"]


# A RuntimeWarning printed before a refusal (a cast of a damaged codebook's NaN) is a bug too.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("name", KIND_NAMES)
def test_every_damaged_copy_is_read_or_refused_naming_the_file(name, tokenizer, tmp_path):
    kind = next(kind for kind in _kinds(tokenizer) if kind.name == name)
    valid = kind.build(tmp_path)
    assert _outcome(kind, valid) is None, "the valid file itself"
    data = valid.read_bytes()
    failures = []
    for seed, (mutation, mutant) in enumerate([*_mutants(data, kind.header, seed=len(name)),
                                               *_kind_mutants(kind, data)]):
        path = valid.with_name(f"m{seed}_{valid.name}")
        path.write_bytes(mutant)
        problem = _outcome(kind, path)
        if problem is not None:
            failures.append(f"{mutation}: {problem}")
        path.unlink()
    assert not failures, f"{len(failures)} mutants of {name}:\n" + "\n".join(failures)
