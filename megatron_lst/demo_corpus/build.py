"""Build the offline demo corpus: stories -> speech -> units -> aligned documents + evaluation sets.

Stages (the expensive ones cached under `<out_dir>/cache/<stage>-<hash of their inputs>/`, and
the outputs marked by the hash of the whole configuration in `summary.json`, so re-running with the
same configuration returns at once and a changed setting redoes only the stages it affects):

1. text: generated stories (or the user's text files), split into speech documents, text-only
   documents and a validation part of each; held-out stories for evaluation never appear in them;
2. speech: eSpeak NG synthesis with word times, featurised at 25 Hz (audio is not stored);
3. units: k-means on the training speech features (`units="kmeans"`), or eSpeak's own phonemes
   at 25 Hz (`units="phones"`, see phones.py);
4. outputs, written to `<out_dir>`:
   `speech/{train,valid}.on_the_fly.jsonl`  reference "on the fly" form (word / `[SIL]` segments),
   `textgrid/{train,valid}/<id>.TextGrid` + `units/{train,valid}/<id>.npy`  MFA-style word tiers
                                            and unit arrays, the input form of real user data,
   `text/{train,valid}.jsonl`               text-only documents, `{"id", "text"}`,
   `eval/{storycloze,topic,hellaswag}.jsonl`  evaluation items (see eval_sets.py),
   `codebook.npy` (k-means) or `phones.json` (phone units: the label of each unit id),
   `summary.json`.
5. `tools/train_tokenizer.py` trains a small SentencePiece tokenizer on the training text
   (`tokenizer/spm.model`) and `tools/preprocess_data.py` writes the indexed datasets
   `indexed/{speech,text}_{train,valid}.{bin,idx,json}`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from megatron_lst.checkpoint.durable_files import replace_file_durably, save_npy
from megatron_lst.data.input_files import (
    MAX_LARGE_TEXT_BYTES,
    read_bounded_bytes,
    regular_file_sha256,
)
from megatron_lst.data.textgrid import Interval, write_textgrid
from megatron_lst.demo_corpus.alignment import (
    SILENCE,
    deduplicate_runs,
    on_the_fly_line,
    segments_from_intervals,
)
from megatron_lst.demo_corpus.eval_sets import (
    EVAL_SETS,
    SpokenText,
    TextItem,
    endings_only_accuracy,
    item_record,
    make_text_items,
    write_items,
)
from megatron_lst.demo_corpus.ngram import NgramLM
from megatron_lst.demo_corpus.optional import require
from megatron_lst.demo_corpus.phones import PhoneInventory, frame_phones
from megatron_lst.demo_corpus.speech import SpeechRequest, Utterance, synthesize_utterances
from megatron_lst.demo_corpus.stories import Story, generate_stories, normalize_words
from megatron_lst.demo_corpus.tts import DEFAULT_VOICES, Voice
from megatron_lst.demo_corpus.units import (
    UNIT_FRAME_RATE,
    FeatureExtractor,
    KMeansCodebook,
    MfccFeatures,
    UnitExtractor,
)

# Bump when a change to this package changes what the stages produce: it is part of every key.
CORPUS_VERSION = 2
UNIT_KINDS = ("kmeans", "phones")

REPO_ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)
T = TypeVar("T")

_OUTPUT_DIRS = ("speech", "text", "textgrid", "units", "eval", "tokenizer", "indexed")
# The file that says what each unit id is, by kind of unit, and what writes it to a path.
_UNIT_TABLES = {"kmeans": "codebook.npy", "phones": "phones.json"}
UnitTableWriter = Callable[[Path], object]


@dataclass(frozen=True)
class DemoCorpusConfig:
    seed: int = 0
    scale: float = 1.0
    """Multiplies the document counts below (not the evaluation sets)."""
    speech_documents: int = 800
    """Synthesised training stories at scale 1 (about 3.5 hours of audio)."""
    text_documents: int = 8000
    """Text-only training stories at scale 1."""
    valid_fraction: float = 0.02
    """Share of each kind of document kept apart for validation."""
    eval_items: int = 300
    """Items per evaluation set."""
    voices: tuple[str, ...] = DEFAULT_VOICES
    units: str = "kmeans"
    """"kmeans": clusters of the speech features (MFCC or HuBERT, real-data practice); "phones":
    the phoneme eSpeak speaks at each frame (speaker-independent and noise-free, see phones.py)."""
    num_units: int = 500
    """k-means clusters; for phone units, the unit vocabulary (at least the phones spoken)."""
    deduplicate_units: bool = False
    """Collapse runs of a repeated unit within each word or silence to one unit (as HuBERT unit
    pipelines do); the TextGrids then time the kept units at 1/25 s each."""
    kmeans_frames: int = 50_000
    """Frames the codebook is fitted on (drawn evenly from the training speech)."""
    text_files: tuple[str, ...] = ()
    """The user's own text (paragraphs split by blank lines) instead of generated stories."""
    tokenizer_vocab_size: int = 512
    workers: int = 2

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):  # nan passed `<= 0`
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if not self.voices:
            raise ValueError("voices must name at least one eSpeak voice, e.g. 'en-us+m3'")
        if self.units not in UNIT_KINDS:
            raise ValueError(f"units must be one of {UNIT_KINDS}, got {self.units!r}")
        for name in ("eval_items", "num_units", "kmeans_frames", "tokenizer_vocab_size"):
            if getattr(self, name) < 1:  # found deep in the build, after the slow steps
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.speech_documents, self.text_documents) < 0:
            raise ValueError(f"document counts must be >= 0, got speech_documents "
                             f"{self.speech_documents} and text_documents {self.text_documents}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


@dataclass
class DemoCorpus:
    """Where the outputs are, and what they hold."""

    out_dir: Path
    paths: dict[str, Path]
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Document:
    id: str
    text: str
    """Natural text."""


def _key(*parts) -> str:
    blob = json.dumps([CORPUS_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# 1. text


def _paragraphs(paths: Sequence[str], max_words: int = 120) -> list[str]:
    """Paragraphs (split by blank lines) of the files, long ones cut into pieces of max_words.
    Each file is read whole, so only a regular one of at most `MAX_LARGE_TEXT_BYTES` is taken
    (the input-files rule), refused by name otherwise."""
    docs = []
    for path in paths:
        data = read_bounded_bytes(path, ValueError, "--text-files file", MAX_LARGE_TEXT_BYTES)
        # decoded with universal newlines, as Path.read_text read it
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            for i in range(0, len(words), max_words):
                if normalize_words(" ".join(words[i:i + max_words])):
                    docs.append(" ".join(words[i:i + max_words]))
    if not docs:
        raise ValueError(f"--text-files {list(paths)} hold no words")
    return docs


def _split(docs: list[_Document], fraction: float) -> tuple[list[_Document], list[_Document]]:
    num_valid = max(1, round(len(docs) * fraction)) if len(docs) > 1 else 0
    return docs[num_valid:], docs[:num_valid]


def _text_stage(config: DemoCorpusConfig):
    """Training/validation documents by kind, and held-out evaluation stories."""
    num_speech = max(2, round(config.speech_documents * config.scale))
    num_text = max(2, round(config.text_documents * config.scale))
    if config.text_files:
        paragraphs = _paragraphs(config.text_files)
        order = np.random.default_rng([config.seed, 1]).permutation(len(paragraphs))
        # The configured speech share of the paragraphs, at most the configured number.
        share = num_speech / (num_speech + num_text)
        num_speech = min(num_speech, max(2, round(len(paragraphs) * share)))
        if len(paragraphs) < num_speech + 2:
            raise ValueError(f"--text-files {list(config.text_files)} hold {len(paragraphs)} "
                             f"paragraphs; the build needs at least {num_speech + 2} (a training "
                             f"and a validation document of speech and of text)")
        docs = [_Document(f"user-{i:06d}", paragraphs[i]) for i in order]
        speech, text = docs[:num_speech], docs[num_speech:]
    else:
        stories = generate_stories(config.seed, num_speech + num_text, "train")
        docs = [_Document(s.id, s.text) for s in stories]
        speech, text = docs[:num_speech], docs[num_speech:]
    train_texts = frozenset(d.text for d in speech + text)
    eval_stories = generate_stories(config.seed, 3 * config.eval_items, "eval",
                                    exclude_texts=train_texts)
    speech_train, speech_valid = _split(speech, config.valid_fraction)
    text_train, text_valid = _split(text, config.valid_fraction)
    return {"speech_train": speech_train, "speech_valid": speech_valid,
            "text_train": text_train, "text_valid": text_valid}, eval_stories


def _eval_items(config: DemoCorpusConfig, stories: list[Story]) -> dict[str, list[TextItem]]:
    n = config.eval_items
    return {name: make_text_items(name, stories[i * n:(i + 1) * n], config.seed)
            for i, name in enumerate(EVAL_SETS)}


# ---------------------------------------------------------------------------------------------
# 2. speech


def _voice(config: DemoCorpusConfig, index: int, stream: int) -> Voice:
    rng = np.random.default_rng([config.seed, stream, index])
    return Voice(config.voices[int(rng.integers(len(config.voices)))])


def training_voice(config: DemoCorpusConfig, index: int) -> str:
    """The voice of speech document `index` of its split: the speaker of line `index` of
    `speech/train.on_the_fly.jsonl` (and of `speech/valid.on_the_fly.jsonl`)."""
    return _voice(config, index, 0).name


def _speech_requests(config: DemoCorpusConfig, documents: dict[str, list[_Document]],
                     items: dict[str, list[TextItem]]) -> list[SpeechRequest]:
    requests = []
    for split in ("speech_train", "speech_valid"):
        for i, doc in enumerate(documents[split]):
            requests.append(SpeechRequest(doc.id, doc.text, _voice(config, i, 0)))
    for s, name in enumerate(EVAL_SETS):
        for i, item in enumerate(items[name]):
            voice = _voice(config, i, 1 + s)
            requests.append(SpeechRequest(f"{item.id}/context", item.context, voice))
            requests.extend(SpeechRequest(f"{item.id}/ending{j}", e, voice)
                            for j, e in enumerate(item.endings))
    return requests


def _save_utterances(directory: Path, utterances: list[Utterance]) -> None:
    features = np.concatenate([u.features for u in utterances])
    save_npy(directory / "features.npy", features)
    index = [{"id": u.id, "num_units": len(u.features), "duration": u.duration,
              "words": [[w.label, w.start, w.end] for w in u.words],
              "phones": [[p.label, p.start, p.end] for p in u.phones]} for u in utterances]
    (directory / "utterances.json").write_text(json.dumps(index))


def _load_utterances(directory: Path) -> dict[str, Utterance]:
    features = np.load(directory / "features.npy")
    index = json.loads((directory / "utterances.json").read_text())
    offsets = np.concatenate([[0], np.cumsum([u["num_units"] for u in index])])
    return {u["id"]: Utterance(u["id"], [Interval(s, e, w) for w, s, e in u["words"]],
                               features[offsets[i]:offsets[i + 1]], u["duration"],
                               [Interval(s, e, p) for p, s, e in u["phones"]])
            for i, u in enumerate(index)}


def _cached(directory: Path, make) -> Path:
    """Run `make(tmp_dir)` unless `directory` exists; publish it atomically by renaming."""
    if directory.is_dir():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    make(tmp)
    tmp.rename(directory)
    return directory


def _load_cached(directory: Path, make: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """`load` of the cache `directory` (made by `make` when missing, see `_cached`). A cache that
    cannot be loaded (a file of it deleted or damaged, or cut short by a full disk before its
    files were checked) is said, removed and made again: it used to stop every later build."""
    existed = directory.is_dir()
    directory = _cached(directory, make)
    try:
        return load(directory)
    # ValueError: JSON, a .npy cut short; KeyError, TypeError: an index without its fields
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        if not existed:  # just made: not damage, and making it again would fail alike
            raise
        logger.warning("%s: damaged cache (%s: %s); building it again", directory,
                       type(error).__name__, error)
        shutil.rmtree(directory)
        return load(_cached(directory, make))


# ---------------------------------------------------------------------------------------------
# 4. outputs


def _spoken(utterance: Utterance, units: np.ndarray, deduplicate: bool) -> SpokenText:
    segments = segments_from_intervals(utterance.words, len(units))
    if deduplicate:
        units, segments = deduplicate_runs(units, segments)
    return SpokenText(" ".join(w.label for w in utterance.words), units, segments)


def _segment_intervals(segments: list[tuple[str, int]]) -> list[Interval]:
    """Word intervals timing each unit of `segments` at 1 / UNIT_FRAME_RATE seconds."""
    out, start = [], 0
    for word, count in segments:
        if word != SILENCE:
            out.append(Interval(start / UNIT_FRAME_RATE, (start + count) / UNIT_FRAME_RATE, word))
        start += count
    return out


def _textgrid_intervals(utterance: Utterance, xmax: float) -> list[Interval]:
    """Word intervals clipped to the units' duration (the TextGrid must end with the units)."""
    out = []
    for w in utterance.words:
        start, end = min(w.start, xmax), min(w.end, xmax)
        out.append(Interval(start, end, w.label))
    return out


def _write_speech_split(out_dir: Path, split: str, docs: list[_Document],
                        utterances: dict[str, Utterance], units_of: dict[str, np.ndarray],
                        deduplicate: bool) -> dict:
    """Write one split's on-the-fly JSONL, TextGrids and unit arrays; return its counts."""
    counts = {"documents": 0, "seconds": 0.0, "units": 0, "words": 0, "silences": 0,
              "static_patches": 0}
    grid_dir, unit_dir = out_dir / "textgrid" / split, out_dir / "units" / split
    grid_dir.mkdir(parents=True, exist_ok=True)
    unit_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "speech" / f"{split}.on_the_fly.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            utterance = utterances[doc.id]
            spoken = _spoken(utterance, units_of[doc.id], deduplicate)
            units = spoken.units
            f.write(on_the_fly_line(doc.id, spoken.segments, units) + "\n")
            xmax = len(units) / UNIT_FRAME_RATE
            intervals = (_segment_intervals(spoken.segments) if deduplicate
                         else _textgrid_intervals(utterance, xmax))
            write_textgrid(grid_dir / f"{doc.id}.TextGrid", intervals, xmax=xmax)
            save_npy(unit_dir / f"{doc.id}.npy", units.astype(np.int16))
            counts["documents"] += 1
            counts["seconds"] += utterance.duration
            counts["units"] += len(units)
            counts["words"] += sum(1 for w, _ in spoken.segments if w != SILENCE)
            counts["silences"] += sum(1 for w, _ in spoken.segments if w == SILENCE)
            # Static p=4 over a whole-speech document: the speech marker rides in the first patch.
            counts["static_patches"] += math.ceil((len(units) + 1) / 4)
    return counts


def _write_text_split(out_dir: Path, split: str, docs: list[_Document]) -> dict:
    words = 0
    with open(out_dir / "text" / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            normalized = normalize_words(doc.text)
            words += len(normalized)
            f.write(json.dumps({"id": doc.id, "text": " ".join(normalized)}) + "\n")
    return {"documents": len(docs), "words": words}


def _sentences(text: str) -> list[list[str]]:
    return [w for w in (normalize_words(s) for s in re.split(r"(?<=[.!?])\s+", text)) if w]


# ---------------------------------------------------------------------------------------------
# 5. tokenizer + indexed datasets


def _tool(name: str):
    """`tools/<name>.py` of this checkout as a module (tools/ is not an installed package)."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the demo corpus build runs from a checkout "
                                f"of megatron-lst that has tools/")
    spec = importlib.util.spec_from_file_location(f"_lst_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenize_and_index(out_dir: Path, config: DemoCorpusConfig) -> dict:
    """Train the tokenizer on the training text, then write the four indexed datasets."""
    tokenizer = out_dir / "tokenizer" / "spm.model"
    _tool("train_tokenizer").main([
        "--input", str(out_dir / "text" / "train.jsonl"), "--input-format", "text-jsonl",
        "--vocab-size", str(config.tokenizer_vocab_size), "--output", str(tokenizer)])
    preprocess = _tool("preprocess_data").main
    counts = {}
    for kind, name, fmt in (("speech", "{}.on_the_fly.jsonl", "reference-jsonl"),
                            ("text", "{}.jsonl", "text-jsonl")):
        for split in ("train", "valid"):
            prefix = out_dir / "indexed" / f"{kind}_{split}"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            manifest = preprocess([
                "--input", str(out_dir / kind / name.format(split)), "--input-format", fmt,
                "--tokenizer-model", str(tokenizer), "--num-units", str(config.num_units),
                "--frame-rate", str(UNIT_FRAME_RATE), "--output-prefix", str(prefix),
                "--workers", str(config.workers)])
            counts[f"{kind}_{split}"] = asdict(manifest.counts)
    return counts


# ---------------------------------------------------------------------------------------------


UNIT_FEATURES = ("mfcc", "hubert")


def unit_features(kind: str = "mfcc", hubert_dir: str | Path | None = None,
                  hubert_layer: int = 6) -> FeatureExtractor:
    """The features units are made from: "mfcc" (offline, the default) or "hubert" (layer
    `hubert_layer` of the local Hugging Face HuBERT model in `hubert_dir`, on CPU)."""
    if kind == "mfcc":
        if hubert_dir is not None:
            raise ValueError("a HuBERT directory was given with MFCC units; choose hubert units")
        return MfccFeatures()
    if kind == "hubert":
        if hubert_dir is None:
            raise ValueError("hubert units need the local HuBERT model directory (--hubert-dir)")
        from megatron_lst.audio.hubert import HubertFeatures

        return HubertFeatures(hubert_dir, hubert_layer)
    raise ValueError(f"unit features must be one of {UNIT_FEATURES}, got {kind!r}")


def build_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0,
                      config: DemoCorpusConfig | None = None,
                      features: FeatureExtractor | None = None,
                      progress: bool = True) -> DemoCorpus:
    """Build (or read back from the cache) the demo corpus under `out_dir`.

    `config` overrides `seed` and `scale` when given. `features` defaults to MFCCs; pass
    `unit_features("hubert", model_dir)` to use a local HuBERT model. Returns the output paths
    and the summary.
    """
    config = config or DemoCorpusConfig(seed=seed, scale=scale)
    features = features or MfccFeatures()
    # One BLAS/OpenMP thread per process: on a shared machine idle threads spinning made the
    # k-means and the small per-utterance products 10-100x slower; parallelism comes from workers.
    threadpoolctl = require("threadpoolctl", "the demo corpus build")
    with threadpoolctl.threadpool_limits(1):
        return _build(Path(out_dir), config, features, progress)


def _build(out_dir: Path, config: DemoCorpusConfig, features: FeatureExtractor,
           progress: bool) -> DemoCorpus:
    cache = out_dir / "cache"
    timings: dict[str, float] = {}

    # Everything the outputs depend on, known before any work; `workers` changes only the speed.
    settings = {k: v for k, v in asdict(config).items() if k != "workers"}
    output_key = _key("outputs", settings, [regular_file_sha256(p, ValueError, "--text-files file")
                                                for p in config.text_files],
                      features.cache_key())
    manifest_path = out_dir / "summary.json"
    summary = _summary_of_outputs(manifest_path)
    if summary is not None and summary.get("key") == output_key:
        return DemoCorpus(out_dir, _paths(out_dir, config.units), summary)
    _check_outputs_replaceable(out_dir)

    t = time.perf_counter()
    documents, eval_stories = _text_stage(config)
    items = _eval_items(config, eval_stories)
    timings["text"] = time.perf_counter() - t

    requests = _speech_requests(config, documents, items)
    speech_key = _key("speech", [(r.id, r.text, asdict(r.voice)) for r in requests],
                      features.cache_key())

    t = time.perf_counter()

    def make_speech(directory: Path) -> None:
        bar = _progress_bar(progress, len(requests), "synthesising + featurising")
        utterances = synthesize_utterances(requests, features, config.workers,
                                           progress=bar.update if bar else None)
        if bar:
            bar.close()
        _save_utterances(directory, utterances)

    utterances = _load_cached(cache / f"speech-{speech_key}", make_speech, _load_utterances)
    timings["speech"] = time.perf_counter() - t

    t = time.perf_counter()
    train_ids = [d.id for d in documents["speech_train"]]
    if config.units == "phones":
        units_of, unit_table = _phone_units(config, utterances)
    else:
        units_of, unit_table = _kmeans_units(config, cache, speech_key, utterances, train_ids,
                                             features)
    timings["units"] = time.perf_counter() - t

    t = time.perf_counter()
    manifest_path.unlink(missing_ok=True)  # outputs are half-written until the summary is back
    for sub in _OUTPUT_DIRS:  # no file of an earlier configuration may survive
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for old_table in _UNIT_TABLES.values():
        (out_dir / old_table).unlink(missing_ok=True)
    for sub in ("speech", "text", "eval"):
        (out_dir / sub).mkdir(parents=True)
    unit_table(out_dir / _UNIT_TABLES[config.units])
    speech_counts = {split: _write_speech_split(out_dir, split, documents[f"speech_{split}"],
                                                utterances, units_of,
                                                config.deduplicate_units)
                     for split in ("train", "valid")}
    text_counts = {split: _write_text_split(out_dir, split, documents[f"text_{split}"])
                   for split in ("train", "valid")}

    def speak(utterance_id: str) -> SpokenText:
        return _spoken(utterances[utterance_id], units_of[utterance_id], config.deduplicate_units)

    for s, name in enumerate(EVAL_SETS):
        records = []
        for i, item in enumerate(items[name]):
            endings = [speak(f"{item.id}/ending{j}") for j in range(len(item.endings))]
            records.append(item_record(item, _voice(config, i, 1 + s).name,
                                       speak(f"{item.id}/context"), endings))
        write_items(out_dir / "eval" / f"{name}.jsonl", records)
    timings["outputs"] = time.perf_counter() - t

    t = time.perf_counter()
    train_sentences = [s for split in ("speech_train", "text_train")
                       for d in documents[split] for s in _sentences(d.text)]
    lm = NgramLM(train_sentences, order=3)
    endings_only = {name: endings_only_accuracy(lm, items[name]) for name in EVAL_SETS}
    timings["ngram"] = time.perf_counter() - t

    t = time.perf_counter()
    indexed_counts = _tokenize_and_index(out_dir, config)
    timings["tokenizer+preprocess"] = time.perf_counter() - t

    summary = _summary(config, speech_counts, text_counts, indexed_counts, items, endings_only,
                       timings)
    summary["key"] = output_key
    replace_file_durably(manifest_path, json.dumps(summary, indent=2))  # the outputs are whole
    # Return what a cached re-run returns (JSON types: lists, not tuples).
    return DemoCorpus(out_dir, _paths(out_dir, config.units),
                      json.loads(manifest_path.read_text()))


class OutputDirectoryError(ValueError):
    """The output directory holds files of the names the build writes that no build wrote."""


def _check_outputs_replaceable(out_dir: Path) -> None:
    """Refuse, before any work, an `out_dir` holding output folders or unit tables that no build
    wrote: writing the outputs replaces them whole (a user's `units/` of HuBERT units, `text/` of
    their corpus). A build wrote them when its summary is there, or its speech cache (a build
    stopped while writing its outputs)."""
    if (out_dir / "summary.json").is_file() or any((out_dir / "cache").glob("speech-*")):
        return
    present = [name for name in (*_OUTPUT_DIRS, *_UNIT_TABLES.values()) if (out_dir / name).exists()]
    if present:
        raise OutputDirectoryError(
            f"{out_dir} holds {', '.join(present)}, which no demo corpus build wrote; the build "
            f"would replace them: give a new or empty output directory")


def _summary_of_outputs(path: Path) -> dict | None:
    """The summary of the outputs beside it (written last, atomically): None when there is none
    or it is no JSON object (cut short by an older build killed while writing it, or edited by
    hand), and the outputs are built again rather than the build stopping with a traceback."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSON or UTF-8
        summary = None
    return summary if isinstance(summary, dict) else None


def _kmeans_units(config: DemoCorpusConfig, cache: Path, speech_key: str,
                  utterances: dict[str, Utterance], train_ids: list[str],
                  features: FeatureExtractor) -> tuple[dict[str, np.ndarray], UnitTableWriter]:
    """Units of every utterance by a k-means codebook fitted on the training speech (cached), and
    a function that writes the codebook to a path."""
    codebook_key = _key("codebook", speech_key, config.num_units, config.kmeans_frames,
                        config.seed)
    extractor = UnitExtractor(features)

    def make_codebook(directory: Path) -> None:
        train = [utterances[i].features.astype(np.float32) for i in train_ids]
        extractor.fit(train, config.num_units, config.seed, config.kmeans_frames)
        extractor.codebook.save(directory / "codebook.npy")

    codebook_dir = cache / f"codebook-{codebook_key}"
    extractor.codebook = _load_cached(codebook_dir, make_codebook,
                                      lambda directory: KMeansCodebook.load(
                                          directory / "codebook.npy"))
    codebook_path = codebook_dir / "codebook.npy"
    ids = list(utterances)
    all_units = extractor.units_of_features(np.concatenate([utterances[i].features for i in ids]))
    ends = np.cumsum([len(utterances[i].features) for i in ids])
    units_of = dict(zip(ids, np.split(all_units, ends[:-1]), strict=True))
    return units_of, lambda path: shutil.copyfile(codebook_path, path)


def _phone_units(config: DemoCorpusConfig, utterances: dict[str, Utterance]
                 ) -> tuple[dict[str, np.ndarray], UnitTableWriter]:
    """Units of every utterance as eSpeak's phones at 25 Hz (one per feature frame), and a
    function that writes the phone of each unit id to a path.

    The inventory holds the phones of every utterance, evaluation speech included: it is a symbol
    table, nothing is learned from it.
    """
    labels = {i: frame_phones(u.phones, len(u.features)) for i, u in utterances.items()}
    inventory = PhoneInventory(label for frames in labels.values() for label in frames)
    if len(inventory) > config.num_units:
        raise ValueError(f"the speech holds {len(inventory)} distinct phones but num_units is "
                         f"{config.num_units}; phone units need --num-units {len(inventory)} or "
                         f"more")
    return {i: inventory.units(frames) for i, frames in labels.items()}, inventory.save


def _progress_bar(enabled: bool, total: int, what: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="utt")


def _paths(out_dir: Path, units: str) -> dict[str, Path]:
    paths = {f"speech_{s}": out_dir / "speech" / f"{s}.on_the_fly.jsonl" for s in ("train", "valid")}
    paths.update({f"text_{s}": out_dir / "text" / f"{s}.jsonl" for s in ("train", "valid")})
    paths.update({f"textgrid_{s}": out_dir / "textgrid" / s for s in ("train", "valid")})
    paths.update({f"units_{s}": out_dir / "units" / s for s in ("train", "valid")})
    paths.update({f"eval_{n}": out_dir / "eval" / f"{n}.jsonl" for n in EVAL_SETS})
    paths.update({f"indexed_{k}_{s}": out_dir / "indexed" / f"{k}_{s}"
                  for k in ("speech", "text") for s in ("train", "valid")})
    paths["tokenizer"] = out_dir / "tokenizer" / "spm.model"
    paths["codebook" if units == "kmeans" else "phones"] = out_dir / _UNIT_TABLES[units]
    paths["summary"] = out_dir / "summary.json"
    return paths


def _summary(config, speech_counts, text_counts, indexed_counts, items, endings_only, timings
             ) -> dict:
    train = speech_counts["train"]
    words = max(train["words"], 1)
    return {
        "config": asdict(config),
        "speech": speech_counts,
        "text": text_counts,
        "indexed": indexed_counts,
        "tokens": sum(c["text_pieces"] + c["units"] for c in indexed_counts.values()),
        "audio_hours": sum(c["seconds"] for c in speech_counts.values()) / 3600,
        "units": sum(c["units"] for c in speech_counts.values()),
        "speech_words": sum(c["words"] for c in speech_counts.values()),
        "text_words": sum(c["words"] for c in text_counts.values()),
        "units_per_word": train["units"] / words,
        "patches_per_word_static4": train["static_patches"] / words,
        "patches_per_word_aligned": (train["words"] + train["silences"]) / words,
        "eval_items": {name: len(items[name]) for name in EVAL_SETS},
        "endings_only_ngram_accuracy": endings_only,
        "chance_accuracy": {name: 1 / len(items[name][0].endings) for name in EVAL_SETS},
        "seconds": timings,
    }


def format_summary(summary: dict) -> str:
    """The summary as an aligned two-column table."""
    rows = [
        ("audio (hours)", f"{summary['audio_hours']:.2f}"),
        ("speech documents (train/valid)",
         f"{summary['speech']['train']['documents']}/{summary['speech']['valid']['documents']}"),
        ("text documents (train/valid)",
         f"{summary['text']['train']['documents']}/{summary['text']['valid']['documents']}"),
        ("speech units", f"{summary['units']:,}"),
        ("speech words", f"{summary['speech_words']:,}"),
        ("text-only words", f"{summary['text_words']:,}"),
        ("tokens (text pieces + units, all splits)", f"{summary['tokens']:,}"),
        ("units per word", f"{summary['units_per_word']:.2f}"),
        ("patches per word, static p=4 (whole-document runs)",
         f"{summary['patches_per_word_static4']:.2f}"),
        ("patches per word, aligned ([SIL] own patch)", f"{summary['patches_per_word_aligned']:.2f}"),
    ]
    for name, accuracy in summary["endings_only_ngram_accuracy"].items():
        rows.append((f"{name}: items / endings-only 3-gram acc (chance)",
                     f"{summary['eval_items'][name]} / {accuracy:.3f} "
                     f"({summary['chance_accuracy'][name]:.2f})"))
    for stage, seconds in summary["seconds"].items():
        rows.append((f"time: {stage} (s)", f"{seconds:.1f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
