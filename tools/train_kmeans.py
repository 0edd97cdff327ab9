"""Fit the k-means codebook that turns HuBERT features into units, or import a released one.

    python tools/train_kmeans.py fit --input LibriSpeech/train-clean-100 \
        --input-format transcripts --hubert-dir models/hubert-base --layer 6 \
        --num-units 500 --sample-hours 10 --output km500.safetensors

    python tools/train_kmeans.py import km.bin --trust-pickle --output km500.npy

`fit` draws a seeded random sample of utterances (--sample-hours of audio), extracts their
features and fits scikit-learn's mini-batch k-means on at most --max-frames of them. The codebook
is saved as centroids only (.npy, or .safetensors with the model, layer and frame rate as
metadata): loading it never unpickles anything. `import` converts a pickled scikit-learn k-means
(the textless quantizers' km.bin) to that form; unpickling runs code from the file, so it needs
--trust-pickle.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_lst.audio.cli_args import add_corpus_args, add_model_args, resolve_device, run_tool
from megatron_lst.audio.codebook import (
    check_codebook_suffix,
    fit_codebook,
    import_pickled_codebook,
    save_codebook,
)
from megatron_lst.audio.corpus import CORPUS_READERS
from megatron_lst.audio.extract import featurize, make_jobs
from megatron_lst.audio.hubert import HubertFeatures
from megatron_lst.demo_corpus.units import KMeansCodebook


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit k-means on a sample of a corpus' features")
    add_corpus_args(fit)
    add_model_args(fit)
    group = fit.add_argument_group("k-means")
    group.add_argument("--num-units", type=int, default=500, help="clusters (speech units)")
    group.add_argument("--sample-hours", type=float, default=10.0,
                       help="audio drawn at random from the corpus to fit on")
    group.add_argument("--max-frames", type=int, default=500_000,
                       help="frames (drawn from the sample) k-means is fitted on")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    fit.add_argument("--output", required=True, type=Path, help=".npy or .safetensors")
    fit.add_argument("--no-progress", action="store_true")

    imp = commands.add_parser("import", help="convert a pickled scikit-learn k-means (km.bin)")
    imp.add_argument("pickle", type=Path)
    imp.add_argument("--trust-pickle", action="store_true",
                     help="unpickle the file: it can run any code, so only for trusted files")
    imp.add_argument("--output", required=True, type=Path, help=".npy or .safetensors")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail only after the features are extracted and k-means is fitted."""
    check_codebook_suffix(args.output, f"--output {args.output}")
    if not args.output.parent.is_dir():
        raise ValueError(f"--output {args.output}: directory {args.output.parent} does not exist; "
                         f"create it or write elsewhere")
    inputs = ([args.pickle] if args.command == "import" else
              list(args.hubert_dir.iterdir()) if args.hubert_dir.is_dir() else [])
    replaced = next((path for path in inputs if args.output.exists() and path.exists()
                     and os.path.samefile(path, args.output)), None)
    if replaced is not None:
        raise ValueError(f"--output {args.output} would replace the input {replaced}; write the "
                         f"codebook elsewhere")
    if args.command != "fit":
        return
    if args.num_units < 1 or args.max_frames < args.num_units:
        raise ValueError(f"--num-units {args.num_units} needs at least one unit and --max-frames "
                         f"({args.max_frames}) at least one frame per unit")
    if not args.sample_hours > 0:
        raise ValueError(f"--sample-hours must be positive, got {args.sample_hours}")
    args.device = resolve_device(args.device)


def _fit(args: argparse.Namespace) -> KMeansCodebook:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    utterances = CORPUS_READERS[args.input_format](args.input)
    jobs = make_jobs(utterances, args.frame_rate)
    order = np.random.default_rng(args.seed).permutation(len(jobs))
    budget = args.sample_hours * 3600 * 16000
    sample, samples = [], 0
    for i in order:
        if samples >= budget:
            break
        sample.append(jobs[i])
        samples += jobs[i].num_samples_16k
    features = HubertFeatures(args.hubert_dir, args.layer, args.frame_rate, args.device)
    with tqdm(desc="features", unit="s audio", disable=True if args.no_progress else None,
              total=round(samples / 16000)) as bar:
        arrays = featurize(sample, features, args.batch_size, args.max_batch_seconds, bar.update)
    frames = sum(len(a) for a in arrays)
    print(f"fitting {args.num_units} clusters on {min(frames, args.max_frames):,} of {frames:,} "
          f"frames ({samples / 16000 / 3600:.2f} h, {len(sample)} utterances)")
    codebook = fit_codebook(arrays, args.num_units, args.max_frames, args.seed)
    metadata = {"model_dir": str(Path(args.hubert_dir).resolve()), "layer": str(args.layer),
                "frame_rate": str(args.frame_rate)}
    save_codebook(codebook, args.output,
                  metadata if args.output.suffix == ".safetensors" else None)
    return codebook


def main(argv: Sequence[str] | None = None) -> KMeansCodebook:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.command == "fit":
        codebook = _fit(args)
    else:
        codebook = import_pickled_codebook(args.pickle, trust_pickle=args.trust_pickle)
        save_codebook(codebook, args.output)
    print(f"wrote {args.output}: {codebook.num_units} centroids of dimension "
          f"{codebook.centroids.shape[1]}")
    return codebook


if __name__ == "__main__":
    run_tool(main)
