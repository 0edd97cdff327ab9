"""Extract HuBERT units from audio: one `<units-dir>/<id>.npy` per utterance, for
`tools/preprocess_data.py --input-format textgrid`.

    python tools/extract_units.py --input LibriSpeech/train-clean-100 --input-format transcripts \
        --hubert-dir models/hubert-base --layer 6 --codebook km500.npy \
        --units-dir units/train-clean-100 --workers 8

Audio (wav/flac, any sample rate, resampled to 16 kHz) goes through layer --layer of the local
Hugging Face HuBERT model in --hubert-dir, then to the nearest centroid of --codebook (made by
tools/train_kmeans.py). Batched, on the GPU when there is one, in --workers processes on CPU;
re-running skips utterances already done. See docs/audio.md for the whole recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from megatron_lst.audio.cli_args import add_corpus_args, add_model_args, resolve_device, run_tool
from megatron_lst.audio.corpus import CORPUS_READERS, write_mfa_corpus
from megatron_lst.audio.extract import ExtractConfig, ExtractSummary, extract_units, usable_cpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_args(parser)
    add_model_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--codebook", required=True, type=Path,
                       help="k-means centroids (.npy or .safetensors) from tools/train_kmeans.py")
    group.add_argument("--units-dir", required=True, type=Path)
    group.add_argument("--mfa-corpus-dir", type=Path,
                       help="also write the forced aligner's input here: <id>.lab transcripts "
                            "beside links to the audio")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="processes (CPU extraction)")
    group.add_argument("--threads-per-worker", type=int, default=None,
                       help="torch threads per process (default: the CPUs this process may use / "
                            "workers)")
    group.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> ExtractSummary:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    utterances = CORPUS_READERS[args.input_format](args.input)
    if args.mfa_corpus_dir:
        count = write_mfa_corpus(utterances, args.mfa_corpus_dir)
        print(f"wrote the aligner's corpus ({count} utterances) to {args.mfa_corpus_dir}")
    workers = max(1, args.workers)
    threads = args.threads_per_worker or max(1, usable_cpus() // workers)
    config = ExtractConfig(
        model_dir=str(args.hubert_dir), codebook=str(args.codebook), units_dir=str(args.units_dir),
        layer=args.layer, frame_rate=args.frame_rate, device=device,
        batch_size=args.batch_size, max_batch_seconds=args.max_batch_seconds,
        workers=args.workers, threads_per_worker=threads)
    with tqdm(desc="extract", unit="s audio", disable=True if args.no_progress else None,
              bar_format="{l_bar}{n:.0f}s audio [{elapsed}, {rate_fmt}]") as bar:
        summary = extract_units(utterances, config, progress=bar.update)
    print(summary.format())
    return summary


if __name__ == "__main__":
    run_tool(main)
