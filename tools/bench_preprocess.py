"""Benchmark reference-format preprocessing: parse + tokenize + write, in units per second.

    python tools/bench_preprocess.py --lines 20000 --workers 1 2 --output-json bench.json

The corpus is the lines of a reference-format JSONL file repeated (--source, e.g. the
reference's mls.chunk.00.on_the_fly) or, without it, a synthetic MLS-like corpus (Zipfian words,
[SIL] between words, 25 Hz units); the tokenizer is --tokenizer-model or, without it, a
512-piece one trained on the corpus's first 2000 lines. Two measurements:

- parse: `parse_reference_line` over the corpus in this process (one core, no I/O);
- tool: `tools/preprocess_data.py` end to end for each --workers value, as units/s of wall time
  in total and per worker (the main process that writes is not counted as a worker).

Both also report units per CPU-second (this process plus its workers), which stays meaningful
on a machine whose cores are shared with other jobs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.data.document_parsing import SEGMENT_SEP, parse_reference_line
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=20000, help="documents in the corpus")
    parser.add_argument("--source", type=Path,
                        help="reference JSONL whose lines are repeated (default: synthetic lines)")
    parser.add_argument("--tokenizer-model", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_lines(count: int, seed: int) -> list[str]:
    """MLS-like documents: ~40 Zipfian words, 2-12 frames each, short [SIL]s between words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
                  for _ in range(5000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    lines = []
    for n in range(count):
        words = rng.choices(vocabulary, weights, k=rng.randint(20, 60))
        parts = []
        for word in words:
            for text, frames in (("[SIL]", rng.randint(0, 3)), (word, rng.randint(2, 12))):
                units = " ".join(str(rng.randrange(500)) for _ in range(frames))
                parts.append(f"{SEGMENT_SEP}TEXT {text} {SEGMENT_SEP}HUBERT {units}")
        lines.append(json.dumps({"file_id": f"synthetic/{n}", "interleaved": " ".join(parts)}))
    return lines


def _words(line: str) -> str:
    parts = json.loads(line)["interleaved"].split(SEGMENT_SEP)
    return " ".join(p.split()[1] for p in parts if p.startswith("TEXT ") and len(p.split()) > 1
                    and p.split()[1] != "[SIL]")


def _load_preprocess():
    spec = importlib.util.spec_from_file_location("preprocess_data",
                                                  REPO / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(args: argparse.Namespace, workdir: Path) -> dict:
    """Parse timing and one tool run per --workers value, with every file under `workdir`."""
    if args.source:
        text = args.source.read_text(encoding="utf-8")
        base = [line for line in text.splitlines() if line.strip()]
        lines = [base[i % len(base)] for i in range(args.lines)]
        corpus_name = f"{args.source} repeated"
    else:
        lines = synthetic_lines(args.lines, args.seed)
        corpus_name = "synthetic"
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")

    tokenizer_path = args.tokenizer_model
    if tokenizer_path is None:
        tokenizer_path = train_sentencepiece((_words(line) for line in lines[:2000]),
                                             workdir / "spm.model", 512)
    tokenizer = load_text_tokenizer(tokenizer_path)

    start, cpu_start = time.perf_counter(), time.process_time()
    units = 0
    for number, line in enumerate(lines, 1):
        units += parse_reference_line(line, tokenizer, 502, f"{corpus}:{number}")[1].units
    parse_seconds = time.perf_counter() - start
    parse_cpu = time.process_time() - cpu_start
    results = {"corpus": corpus_name, "lines": len(lines), "units": units,
               "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
               "parse": {"seconds": parse_seconds, "units_per_s": units / parse_seconds,
                         "units_per_cpu_s": units / parse_cpu,
                         "lines_per_s": len(lines) / parse_seconds},
               "tool": []}

    preprocess = _load_preprocess()
    for workers in args.workers:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        preprocess.main(["--input", str(corpus), "--input-format", "reference-jsonl",
                         "--tokenizer-model", str(tokenizer_path), "--output-prefix",
                         str(workdir / f"out{workers}"), "--workers", str(workers)])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        results["tool"].append({"workers": workers, "seconds": seconds,
                                "units_per_s": units / seconds,
                                "units_per_s_per_worker": units / seconds / workers,
                                "units_per_cpu_s": units / cpu,
                                "lines_per_s": len(lines) / seconds})
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        results = _measure(args, workdir)
    finally:
        shutil.rmtree(workdir)
    corpus_name, lines, units = results["corpus"], results["lines"], results["units"]

    print(f"\ncorpus: {corpus_name}, {lines} lines, {units} units, "
          f"{os.cpu_count()} CPUs, load average {results['load_average_1min']:.1f}")
    print(f"{'stage':<22}{'seconds':>9}{'units/s':>14}{'units/s/worker':>16}"
          f"{'units/cpu-s':>14}{'lines/s':>11}")
    parse = results["parse"]
    rows = [("parse (1 core)", parse["seconds"], parse["units_per_s"], parse["units_per_s"],
             parse["units_per_cpu_s"], parse["lines_per_s"])]
    rows += [(f"tool, {row['workers']} worker(s)", row["seconds"], row["units_per_s"],
              row["units_per_s_per_worker"], row["units_per_cpu_s"], row["lines_per_s"])
             for row in results["tool"]]
    for name, seconds, rate, per_worker, per_cpu, lines_per_s in rows:
        print(f"{name:<22}{seconds:>9.2f}{rate:>14,.0f}{per_worker:>16,.0f}{per_cpu:>14,.0f}"
              f"{lines_per_s:>11,.0f}")
    if args.output_json:
        replace_file_durably(args.output_json, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
