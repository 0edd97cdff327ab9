"""Audio -> unit files, batched, in worker processes, resumable: the engine of
`tools/extract_units.py`.

Each utterance gets `<units_dir>/<id>.npy`, a 1-D int32 array of 25 Hz unit ids (what
`tools/preprocess_data.py --input-format textgrid` reads beside `<textgrid_dir>/<id>.TextGrid`).
Files are written under a temporary name and renamed, so a file that exists is whole; a re-run
skips every utterance whose file holds the expected number of units and does the rest.
`<units_dir>/units.json` records the model, layer and codebook the units were made with, and a
re-run with other settings stops instead of mixing two kinds of units in one folder.

Batches are planned from the file headers before any worker starts: utterances sorted by length
(longest first), cut into batches of at most `batch_size` utterances and `max_batch_seconds` of
padded audio. The plan does not depend on the number of workers, and padding does not change the
features (see hubert.py), so the units are the same for any `workers` and `batch_size`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import time
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_lst.audio.audio_io import AudioError, AudioInfo, audio_info, load_audio_16k
from megatron_lst.audio.codebook import CodebookError, codebook_metadata, load_codebook
from megatron_lst.audio.corpus import Utterance
from megatron_lst.audio.hubert import HubertFeatures, load_transformers
from megatron_lst.audio.units_record import UNITS_RECORD, read_units_record
from megatron_lst.checkpoint.durable_files import replace_file_durably, save_npy
from megatron_lst.checkpoint.stale_scratch import remove_stale_scratch, writer_tag
from megatron_lst.data.input_files import regular_file_sha256
from megatron_lst.demo_corpus.units import FEATURE_SAMPLE_RATE, UNIT_FRAME_RATE, KMeansCodebook


@dataclass(frozen=True)
class ExtractConfig:
    model_dir: str
    """Local Hugging Face HuBERT directory."""
    codebook: str
    """`.npy` or `.safetensors` centroids (codebook.py)."""
    units_dir: str
    layer: int = 6
    frame_rate: int = UNIT_FRAME_RATE
    device: str = "cpu"
    batch_size: int = 8
    max_batch_seconds: float = 120.0
    """Padded audio per batch (batch size x longest utterance), in seconds."""
    workers: int = 1
    threads_per_worker: int = 1

    def __post_init__(self):
        if self.workers < 1 or self.batch_size < 1 or self.threads_per_worker < 1:
            raise ValueError("workers, batch_size and threads_per_worker must be at least 1")
        if not (math.isfinite(self.max_batch_seconds) and self.max_batch_seconds > 0):
            raise ValueError(f"max_batch_seconds must be positive and finite, got "
                             f"{self.max_batch_seconds}")
        if self.frame_rate < 1:
            raise ValueError(f"frame_rate must be at least 1 unit frame per second, got "
                             f"{self.frame_rate}")
        if self.device != "cpu" and self.workers > 1:
            raise ValueError(f"one process drives {self.device}: use workers=1 there (workers "
                             f"are for CPU extraction)")


@dataclass(frozen=True)
class Job:
    """One utterance to extract."""

    id: str
    audio: str
    num_samples_16k: int
    num_units: int


@dataclass
class ExtractSummary:
    utterances: int = 0
    """Extracted in this run."""
    skipped: int = 0
    """Already complete from an earlier run."""
    audio_seconds: float = 0.0
    """Extracted in this run."""
    units: int = 0
    wall_seconds: float = 0.0
    cores: int = 1
    """CPU cores the run had: worker processes x threads each, at most the CPUs this process may
    use (more threads than cores share them)."""

    @property
    def units_per_second(self) -> float:
        return self.units / max(self.wall_seconds, 1e-9)

    def format(self) -> str:
        hours = self.audio_seconds / 3600
        return (f"extracted {self.utterances} utterances ({hours:.3f} h of audio, "
                f"{self.units:,} units) in {self.wall_seconds:.1f}s (model loading included); "
                f"skipped {self.skipped} already done\n  {self.units_per_second:,.0f} units/s, "
                f"{self.units_per_second / self.cores:,.0f} units/s per core ({self.cores} "
                f"cores), {self.audio_seconds / max(self.wall_seconds, 1e-9):.1f}x real time")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` cut
    below `os.cpu_count()`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def units_path(units_dir: str | Path, utterance_id: str) -> Path:
    return Path(units_dir) / f"{utterance_id}.npy"


def is_complete(path: Path, num_units: int) -> bool:
    """Whether `path` holds a 1-D integer array of `num_units` units."""
    try:
        units = np.load(path, mmap_mode="r", allow_pickle=False)
    # EOFError: an empty file; SyntaxError, TokenError: a damaged header
    except (OSError, EOFError, ValueError, SyntaxError, tokenize.TokenError):
        return False
    return units.ndim == 1 and units.dtype.kind in "iu" and len(units) == num_units


def write_units(path: Path, units: np.ndarray) -> None:
    """Write [U] units as int32 `.npy`, atomically (a temporary file renamed over `path`) and
    durably: the data reaches the disk before the rename, so a crash of the machine cannot
    leave a file of the right name and length whose units were never written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial{writer_tag()}")  # see remove_stale_scratch
    try:
        with open(partial, "wb") as f:
            save_npy(f, units.astype(np.int32))  # OSError when the disk fills
            os.fsync(f.fileno())
        partial.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the write is the one to see
            partial.unlink(missing_ok=True)
        raise


def _remove_stale_unit_scratch(units_dir: str | Path) -> None:
    """Remove the temporary unit files (`<id>.npy.partial<pid>[@<host>]`) of workers killed
    mid-write (SIGKILL: no cleanup ran); a live writer's are kept."""
    folder = Path(units_dir)
    if folder.is_dir():
        remove_stale_scratch(folder.rglob("*.npy.partial*"),  # ids may name subfolders
                             # Without a host: written before the host was named, by this host's
                             # extraction (one machine's tool).
                             r".+\.npy\.partial(?P<pid>[0-9]+)(?:@(?P<host>[^/@]+))?",
                             "temporary unit files", folder)


def _check_codebook_settings(config: ExtractConfig) -> None:
    """Refuse a `.safetensors` codebook whose metadata names another layer or frame rate: its
    centroids have the right dimension, and the units would be silently meaningless."""
    recorded = codebook_metadata(config.codebook)
    for key, flag, value in (("layer", "--layer", config.layer),
                             ("frame_rate", "--frame-rate", config.frame_rate)):
        if key in recorded and recorded[key] != str(value):
            raise CodebookError(f"{config.codebook} was fitted on {key} {recorded[key]} "
                                f"features, but this run extracts {flag} {value}; pass "
                                f"{flag} {recorded[key]}, or the codebook fitted on {key} {value}")


def _check_units_record(config: ExtractConfig, codebook: KMeansCodebook,
                        utterances: Sequence[Utterance]) -> None:
    """Write `units.json`, or check that the units already there were made the same way (a
    folder holding unit files of `utterances` without the record is refused). A record beside
    no unit file (a run stopped before its first, e.g. by a bad audio file) is replaced."""
    record = {"model_dir": str(Path(config.model_dir).resolve()), "layer": config.layer,
              "frame_rate": config.frame_rate, "num_units": codebook.num_units,
              "codebook_sha256": regular_file_sha256(config.codebook, CodebookError, "codebook file")}
    path = Path(config.units_dir) / UNITS_RECORD
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--units-dir {config.units_dir} is a file; pass a folder (it is created "
                         f"when missing)")
    if path.is_file() and next(path.parent.rglob("*.npy"), None) is not None:
        previous = read_units_record(path)
        changed = {k: (previous.get(k), v) for k, v in record.items() if previous.get(k) != v}
        if changed:
            raise ValueError(f"{config.units_dir} holds units made with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                             f"write to a new --units-dir, or delete the old units")
        return
    present = [u.id for u in utterances if units_path(config.units_dir, u.id).exists()]
    if present:  # a run writes the record first, so these come from elsewhere
        raise ValueError(f"{config.units_dir} holds unit files of {len(present)} of these "
                         f"utterances (e.g. {present[0]}.npy) but no {UNITS_RECORD}, so how they "
                         f"were made is unknown and a re-run would keep them; write to a new "
                         f"--units-dir, or delete them")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file_durably(path, json.dumps(record, indent=2) + "\n")


def make_jobs(utterances: Sequence[Utterance], frame_rate: int = UNIT_FRAME_RATE) -> list[Job]:
    """One job per utterance, sized from the audio file headers (no samples are read). Refuses
    unreadable audio, naming the first five such files and their count, and audio shorter than
    one unit frame, likewise: it would give an empty unit file (an empty or cut-off recording,
    seen as an utterance that was extracted)."""
    samples_per_unit = FEATURE_SAMPLE_RATE // frame_rate
    jobs, unreadable = [], []
    for utterance in utterances:
        try:
            info: AudioInfo = audio_info(utterance.audio)
        except AudioError as error:  # all of them named at once, not one per run
            unreadable.append(str(error))
            continue
        jobs.append(Job(utterance.id, str(utterance.audio), info.num_samples_16k,
                        info.num_samples_16k // samples_per_unit))
    if len(unreadable) == 1:
        raise AudioError(unreadable[0])
    if unreadable:
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        raise AudioError(f"{len(unreadable)} audio files cannot be used{more}: "
                         + " | ".join(unreadable[:5]))
    empty = [job for job in jobs if job.num_units == 0]
    if empty:
        shown = ", ".join(f"{job.audio} ({job.num_samples_16k / FEATURE_SAMPLE_RATE * 1000:.0f} ms)"
                          for job in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise AudioError(f"{len(empty)} audio file(s) are shorter than one unit frame "
                         f"({1000 / frame_rate:g} ms at {frame_rate} Hz), so they would give no "
                         f"units: {shown}{more}; they are empty or cut off: leave them out of "
                         f"the corpus (or re-export them from their source)")
    return jobs


def plan_jobs(utterances: Sequence[Utterance], config: ExtractConfig
              ) -> tuple[list[Job], int]:
    """(jobs still to do, utterances already complete)."""
    jobs = make_jobs(utterances, config.frame_rate)
    todo = [j for j in jobs if not is_complete(units_path(config.units_dir, j.id), j.num_units)]
    return todo, len(jobs) - len(todo)


def plan_batches(jobs: Sequence[Job], batch_size: int, max_batch_samples: int
                 ) -> list[list[Job]]:
    """Jobs sorted longest first, cut into batches of at most `batch_size` jobs and
    `max_batch_samples` padded samples (an utterance longer than that goes alone)."""
    batches: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: (-j.num_samples_16k, j.id)):
        # The first job of a batch is its longest: padded size = count x that length.
        if batches and len(batches[-1]) < batch_size and (
                (len(batches[-1]) + 1) * batches[-1][0].num_samples_16k <= max_batch_samples):
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def featurize(jobs: Sequence[Job], features: HubertFeatures, batch_size: int = 8,
              max_batch_seconds: float = 120.0,
              progress: Callable[[float], None] | None = None) -> list[np.ndarray]:
    """Features [num_units, dim] of each job, in the order of `jobs`, in this process."""
    out: dict[str, np.ndarray] = {}
    for batch in plan_batches(jobs, batch_size, int(max_batch_seconds * FEATURE_SAMPLE_RATE)):
        for job, array in zip(batch, features.batch([load_audio_16k(j.audio) for j in batch]),
                              strict=True):
            out[job.id] = array
        if progress is not None:
            progress(sum(j.num_samples_16k for j in batch) / FEATURE_SAMPLE_RATE)
    return [out[job.id] for job in jobs]


class _Worker:
    """The features and codebook of one process, loaded by its first batch (not in a pool
    initializer: an initializer that raises makes the pool restart workers forever)."""

    config: ExtractConfig | None = None
    features: HubertFeatures | None = None
    codebook: KMeansCodebook | None = None

    @classmethod
    def init(cls, config: ExtractConfig) -> None:
        import torch

        torch.set_num_threads(config.threads_per_worker)
        if multiprocessing.parent_process() is not None:
            # A pool worker: transformers' weight-loading bar would print once per worker, and
            # its tqdm lock (a semaphore) outlives the worker the pool terminates, which the
            # resource tracker reports after the tool's last line.
            load_transformers().utils.logging.disable_progress_bar()
        cls.features = HubertFeatures(config.model_dir, config.layer, config.frame_rate,
                                      config.device)
        cls.codebook = load_codebook(config.codebook)
        if cls.codebook.centroids.shape[1] != cls.features.dim:
            raise CodebookError(
                f"{config.codebook}: centroids of dimension {cls.codebook.centroids.shape[1]} do "
                f"not match the model's hidden size {cls.features.dim}; use the codebook fitted "
                f"on this model's features")
        cls.config = config

    @classmethod
    def run(cls, config: ExtractConfig, batch: list[Job]) -> list[tuple[Job, int]]:
        if cls.config != config:
            cls.init(config)
        waves = [load_audio_16k(job.audio) for job in batch]
        out = []
        for job, wave, features in zip(batch, waves, cls.features.batch(waves), strict=True):
            units = cls.codebook.assign(features)
            if len(wave) != job.num_samples_16k or len(units) != job.num_units:
                raise AudioError(f"{job.audio}: read {len(wave)} samples ({len(units)} units) "
                                 f"at 16 kHz, but its header promised {job.num_samples_16k} "
                                 f"({job.num_units} units) when the run began; if the file was "
                                 f"being written meanwhile, re-run to extract it again")
            write_units(units_path(config.units_dir, job.id), units)
            out.append((job, len(units)))
        return out


def extract_units(utterances: Sequence[Utterance], config: ExtractConfig,
                  progress: Callable[[float], None] | None = None) -> ExtractSummary:
    """Write the unit file of every utterance not done yet; `progress(seconds)` after each batch
    with the seconds of audio it held."""
    start = time.perf_counter()
    codebook = load_codebook(config.codebook)
    _check_codebook_settings(config)
    _check_units_record(config, codebook, utterances)
    _remove_stale_unit_scratch(config.units_dir)
    jobs, skipped = plan_jobs(utterances, config)
    batches = plan_batches(jobs, config.batch_size,
                           int(config.max_batch_seconds * FEATURE_SAMPLE_RATE))
    summary = ExtractSummary(skipped=skipped, cores=min(config.workers * config.threads_per_worker,
                                                        usable_cpus()))

    def account(done: list[tuple[Job, int]]) -> None:
        seconds = sum(job.num_samples_16k for job, _ in done) / FEATURE_SAMPLE_RATE
        summary.utterances += len(done)
        summary.units += sum(n for _, n in done)
        summary.audio_seconds += seconds
        if progress is not None:
            progress(seconds)

    run = functools.partial(_Worker.run, config)
    if batches and config.workers == 1:
        for batch in batches:
            account(run(batch))
    elif batches:
        # A fresh server process (not a fork of this one, whose thread pools may be in use)
        # imports the model code once; the workers fork from it.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "transformers.models.hubert"])
        with context.Pool(config.workers) as pool:
            for done in pool.imap_unordered(run, batches):
                account(done)
    summary.wall_seconds = time.perf_counter() - start
    return summary
