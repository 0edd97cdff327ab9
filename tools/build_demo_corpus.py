"""Build the offline demo corpus: synthetic speech, units, alignments and story-completion sets.

    python tools/build_demo_corpus.py --out-dir data/demo [--seed 0] [--scale 1.0]

Runs offline in a few minutes on 2 CPU cores (see megatron_lst/demo_corpus/build.py for the
outputs); re-running with the same arguments reads everything back from the cache. Needs the data
extra: pip install 'megatron-lst[data]'.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_lst.demo_corpus.build import (
    UNIT_FEATURES,
    DemoCorpus,
    DemoCorpusConfig,
    OutputDirectoryError,
    build_demo_corpus,
    format_summary,
    unit_features,
)
from megatron_lst.demo_corpus.optional import MissingDependencyError
from megatron_lst.demo_corpus.tts import DEFAULT_VOICES


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoCorpusConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--scale", type=float, default=defaults.scale,
                        help="multiplies the number of training documents")
    parser.add_argument("--text-files", nargs="+", default=[], metavar="PATH",
                        help="your own text (paragraphs split by blank lines) instead of stories")
    parser.add_argument("--eval-items", type=int, default=defaults.eval_items,
                        help="items per evaluation set")
    parser.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES),
                        help="eSpeak NG voices, one per speaker (e.g. en-us+m3)")
    parser.add_argument("--num-units", type=int, default=defaults.num_units,
                        help="k-means clusters (speech units); with --units phones, the unit "
                             "vocabulary (at least the number of phones spoken)")
    parser.add_argument("--deduplicate-units", action="store_true",
                        help="collapse runs of a repeated unit within each word to one unit")
    parser.add_argument("--units", choices=(*UNIT_FEATURES, "phones"), default="mfcc",
                        help="k-means units of MFCCs (offline default) or of a local HuBERT "
                             "model (--hubert-dir), or 'phones': the phoneme eSpeak speaks at "
                             "each frame (speaker-independent, noise-free units)")
    parser.add_argument("--hubert-dir", type=Path,
                        help="--units hubert: local Hugging Face HuBERT model directory")
    parser.add_argument("--hubert-layer", type=int, default=6,
                        help="--units hubert: transformer layer whose output is quantised")
    parser.add_argument("--tokenizer-vocab-size", type=int, default=defaults.tokenizer_vocab_size)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> DemoCorpus:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = DemoCorpusConfig(
            seed=args.seed, scale=args.scale, eval_items=args.eval_items,
            voices=tuple(args.voices), units="phones" if args.units == "phones" else "kmeans",
            num_units=args.num_units, deduplicate_units=args.deduplicate_units,
            text_files=tuple(args.text_files),
            tokenizer_vocab_size=args.tokenizer_vocab_size, workers=args.workers)
    except ValueError as error:  # DemoCorpusConfig names the field and the rule
        parser.error(str(error))
    try:
        feature_kind = "mfcc" if args.units == "phones" else args.units
        features = unit_features(feature_kind, args.hubert_dir, args.hubert_layer)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        corpus = build_demo_corpus(args.out_dir, config=config, features=features,
                                   progress=not args.no_progress)
    except OutputDirectoryError as error:
        raise SystemExit(f"error: --out-dir: {error}") from None
    print(format_summary(corpus.summary))
    print(f"outputs in {corpus.out_dir}")
    return corpus


if __name__ == "__main__":
    try:
        main()
    except MissingDependencyError as error:
        sys.exit(f"error: {error}")
