"""Command-line arguments and error handling shared by tools/extract_units.py and
tools/train_kmeans.py."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_lst.audio.audio_io import AudioError
from megatron_lst.audio.codebook import CodebookError
from megatron_lst.audio.corpus import CORPUS_READERS, CorpusError
from megatron_lst.demo_corpus.optional import MissingDependencyError
from megatron_lst.demo_corpus.units import UNIT_FRAME_RATE

USER_ERRORS = (AudioError, CodebookError, CorpusError, MissingDependencyError, ValueError,
               OSError)
"""Errors that name a bad input and its fix: a tool prints them as one line, no traceback.
(OSError: a path that cannot be read or written, e.g. an unreadable audio file or a read-only
--units-dir.)"""


def error_line(error: BaseException) -> str:
    """The one line a tool prints for a `USER_ERRORS` error."""
    if isinstance(error, OSError) and error.filename is not None:
        return (f"error: {error.filename}: {error.strerror}; check the path, its permissions "
                f"and the free space there")
    return f"error: {error}"


def run_tool(main: Callable[[], Any]) -> None:
    """Run a tool's `main`; a `USER_ERRORS` error exits with status 1 and its `error_line`."""
    try:
        main()
    except USER_ERRORS as error:
        sys.exit(error_line(error))


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, type=Path,
                       help="the corpus: a folder (audio-dir, transcripts) or a TSV file (tsv)")
    group.add_argument("--input-format", choices=sorted(CORPUS_READERS), required=True,
                       help="audio-dir: every wav/flac under a folder; transcripts: LibriSpeech "
                            "*.trans.txt or MLS transcripts.txt with their audio; tsv: lines "
                            "PATH<TAB>TEXT")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--hubert-dir", required=True, type=Path,
                       help="local Hugging Face HuBERT model directory (config.json + weights)")
    group.add_argument("--layer", type=int, default=6,
                       help="transformer layer whose output is quantised (1-based; 0 = input)")
    group.add_argument("--frame-rate", type=positive_int, default=UNIT_FRAME_RATE,
                       help="unit frames per second; the model's frames are averaged to it")
    group.add_argument("--device", default=None,
                       help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--batch-size", type=positive_int, default=8, help="utterances per batch")
    group.add_argument("--max-batch-seconds", type=positive_seconds, default=120.0,
                       help="padded audio per batch, in seconds")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds above 0, got "
                                         f"{text!r}")
    return value


def resolve_device(device: str | None) -> str:
    """`--device`, checked against what torch sees here; None: cuda when available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N, or "
                         f"leave it out") from None
    if parsed.type == "cuda" and not (
            torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                         f"device(s) here; use --device cpu, or leave --device out")
    return device
