"""How learnable is a demo corpus's speech? Unit statistics that bound spoken story completion.

    python tools/analyze_demo_speech.py data_cache/demo [data_cache/study_cpu ...] \
        [--out speech_analysis.json] [--words 40] [--pairs 60]

For each built demo corpus (tools/build_demo_corpus.py output), from its training speech
(`speech/train.on_the_fly.jsonl`, one line per story, voices as the build drew them):

- units per second and per word, and the mean run length of a repeated unit;
- unigram entropy (bits per unit and per second of audio) and the bigram conditional entropy
  H(u_t | u_t-1) (a plug-in estimate: biased low when bigrams are sparse);
- word consistency: the normalised edit distance (Levenshtein / longer length) between two
  renditions of one frequent word, spoken by the same voice and by two voices, against two
  different words of similar length: a word whose renditions lie as far apart as two different
  words gives a language model over units nothing to recognise it by;
- voice variety: the voices and the mean Jensen-Shannon divergence (bits) between two voices'
  unit distributions;
- a copy heuristic on the story sets (`eval/{topic,storycloze}.jsonl`): pick the ending whose unit
  n-grams (speech) or words (text) occur most in the context; on the topic set also with the
  spoken context cut to its last K units. It says whether the units carry the cue a model
  could copy from the context.

With `--checkpoints RUN_DIR...` (training save directories of models trained on the first corpus)
it also scores S->S on the topic set with the context cut to its last K units: a model whose
choice does not move with K does not use the spoken context.

Prints one table (a column per corpus) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.demo_corpus.alignment import MODE_SEP, SILENCE
from megatron_lst.demo_corpus.build import DemoCorpusConfig, training_voice


def parse_line(line: str) -> list[tuple[str, list[int]]]:
    """One on-the-fly line -> [(word or [SIL], its units)]."""
    record = json.loads(line)
    segments = []
    for part in record["interleaved"].split(MODE_SEP + "TEXT ")[1:]:
        word, _, units = part.partition(" " + MODE_SEP + "HUBERT ")
        segments.append((word.strip(), [int(u) for u in units.split()]))
    return segments


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insertions, deletions and substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalised_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return edit_distance(a, b) / max(len(a), len(b), 1)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2)


def analyze(corpus_dir: Path, num_words: int = 40, num_pairs: int = 60, seed: int = 0) -> dict:
    summary = json.loads((corpus_dir / "summary.json").read_text())
    config = DemoCorpusConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in summary["config"].items()})
    lines = (corpus_dir / "speech" / "train.on_the_fly.jsonl").read_text().splitlines()
    renditions: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)  # word -> (voice, units)
    per_voice: dict[str, Counter] = defaultdict(Counter)
    unigram, bigram = Counter(), Counter()
    num_units = num_runs = num_words_spoken = 0
    for index, line in enumerate(lines):
        voice = training_voice(config, index)
        units = []
        for word, word_units in parse_line(line):
            units.extend(word_units)
            if word != SILENCE:
                renditions[word].append((voice, word_units))
                num_words_spoken += 1
        units_array = np.asarray(units)
        num_units += len(units)
        num_runs += int(1 + (units_array[1:] != units_array[:-1]).sum()) if len(units) else 0
        unigram.update(units)
        bigram.update(zip(units[:-1], units[1:], strict=True))
        per_voice[voice].update(units)
    seconds = summary["speech"]["train"]["seconds"]
    codebook = summary["config"]["num_units"]
    unigram_counts = np.bincount(list(unigram.elements()), minlength=codebook).astype(float)
    unigram_bits = entropy_bits(unigram_counts)
    # H(u_t | u_t-1) = H(u_t-1, u_t) - H(u_t-1).
    joint_bits = entropy_bits(np.array(list(bigram.values()), dtype=float))
    conditional_bits = joint_bits - unigram_bits

    rng = np.random.default_rng(seed)
    frequent = [w for w, r in sorted(renditions.items(), key=lambda kv: -len(kv[1]))
                if len(r) >= 4][:num_words]
    same_voice, cross_voice, different_words = [], [], []
    for word in frequent:
        by_voice = defaultdict(list)
        for voice, units in renditions[word]:
            by_voice[voice].append(units)
        voices = list(by_voice)
        for _ in range(num_pairs):
            v = voices[rng.integers(len(voices))]
            if len(by_voice[v]) >= 2:
                i, j = rng.choice(len(by_voice[v]), 2, replace=False)
                same_voice.append(normalised_distance(by_voice[v][i], by_voice[v][j]))
            if len(voices) >= 2:
                a, b = rng.choice(len(voices), 2, replace=False)
                x, y = by_voice[voices[a]], by_voice[voices[b]]
                cross_voice.append(normalised_distance(x[rng.integers(len(x))],
                                                       y[rng.integers(len(y))]))
    for a, b in combinations(frequent, 2):
        if abs(len(a) - len(b)) <= 1:  # similar spelling length, so similar duration
            x, y = renditions[a], renditions[b]
            different_words.append(normalised_distance(x[rng.integers(len(x))][1],
                                                       y[rng.integers(len(y))][1]))
    voice_histograms = [np.bincount(list(c.elements()), minlength=codebook).astype(float)
                        for c in per_voice.values()]
    divergences = [js_divergence_bits(p, q) for p, q in combinations(voice_histograms, 2)]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "corpus": str(corpus_dir),
        "num_units": codebook,
        "unit_kind": summary["config"].get("units", "kmeans"),
        "deduplicated": bool(summary["config"].get("deduplicate_units", False)),
        "voices": len(per_voice),
        "documents": len(lines),
        "units_per_second": num_units / seconds,
        "units_per_word": num_units / max(num_words_spoken, 1),
        "mean_run_length": num_units / max(num_runs, 1),
        "unigram_bits_per_unit": unigram_bits,
        "unigram_bits_per_second": unigram_bits * num_units / seconds,
        "bigram_conditional_bits_per_unit": conditional_bits,
        "codebook_bits": math.log2(codebook),
        "word_distance_same_voice": mean(same_voice),
        "word_distance_cross_voice": mean(cross_voice),
        "word_distance_different_words": mean(different_words),
        "voice_js_divergence_bits": mean(divergences),
        "words_compared": len(frequent),
    }


COPY_NGRAMS = (2, 3, 4, 6)
CONTEXT_UNITS = (32, 64, 128, None)  # None: the whole context


def _ngrams(sequence: Sequence, n: int) -> set[tuple]:
    return {tuple(sequence[i:i + n]) for i in range(len(sequence) - n + 1)}


def truncate_context(record: dict, num_units: int | None) -> dict:
    """The item with its spoken context cut to the last `num_units` units (segments trimmed)."""
    context = record["context"]
    units = context["units"]
    if num_units is None or len(units) <= num_units:
        return record
    drop, segments = len(units) - num_units, []
    for word, count in context["segments"]:
        if drop >= count:
            drop -= count
            continue
        segments.append([word, count - drop])
        drop = 0
    return {**record, "context": {**context, "units": units[-num_units:], "segments": segments}}


def copy_accuracy(records: Sequence[dict], n: int | None) -> float:
    """Accuracy of picking the ending with the largest share of its unit n-grams in the context
    (n None: of its words in the context's words)."""
    correct = 0
    for record in records:
        if n is None:
            context = set(record["context"]["text"].split())
            pieces = [set(e["text"].split()) for e in record["endings"]]
        else:
            context = _ngrams(record["context"]["units"], n)
            pieces = [_ngrams(e["units"], n) for e in record["endings"]]
        shares = [len(p & context) / max(len(p), 1) for p in pieces]
        correct += int(np.argmax(shares)) == record["label"]
    return correct / len(records)


def copy_heuristic(corpus_dir: Path) -> dict:
    from megatron_lst.demo_corpus.eval_sets import read_items

    out = {}
    for eval_set in ("topic", "storycloze"):
        records = read_items(corpus_dir / "eval" / f"{eval_set}.jsonl")
        out[eval_set] = {"words": copy_accuracy(records, None),
                         **{f"unit_{n}grams": copy_accuracy(records, n) for n in COPY_NGRAMS}}
    topic = read_items(corpus_dir / "eval" / "topic.jsonl")
    out["topic_unit_3grams_by_context_units"] = {
        str(k or "all"): copy_accuracy([truncate_context(r, k) for r in topic], 3)
        for k in CONTEXT_UNITS}
    return out


def checkpoint_context_curve(corpus_dir: Path, checkpoints: Sequence[Path], num_items: int,
                             work_dir: Path) -> dict:
    """Per checkpoint: S->S topic accuracy (summed, normalised) with the context cut to K units."""
    from megatron_lst.demo_corpus.eval_sets import read_items, write_items
    from megatron_lst.evaluation import load_items
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.evaluation.scoring import score_items
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    records = read_items(corpus_dir / "eval" / "topic.jsonl")[:num_items]
    paths = {}
    for k in CONTEXT_UNITS:
        paths[str(k or "all")] = work_dir / f"topic_context_{k or 'all'}.jsonl"
        write_items(paths[str(k or "all")], [truncate_context(r, k) for r in records])
    curves = {}
    for checkpoint in checkpoints:
        initialize_parallel()
        try:
            model = load_inference_model(checkpoint)
            curves[str(checkpoint)] = {}
            for k, path in paths.items():
                items = load_items(path, model.tokenizer, model.vocab)
                scores = score_items(model.model_chunks, items, model.vocab, model.patcher,
                                     "S->S", 16)
                curves[str(checkpoint)][k] = [float(scores.correct().mean()),
                                              float(scores.correct(normalised=True).mean())]
        finally:
            destroy_parallel()
    return curves


_ROWS = (
    ("units", "unit_kind", "{}"), ("unit vocabulary", "num_units", "{:d}"),
    ("deduplicated runs", "deduplicated", "{}"),
    ("voices", "voices", "{:d}"), ("units per second", "units_per_second", "{:.1f}"),
    ("units per word", "units_per_word", "{:.2f}"), ("mean run length", "mean_run_length", "{:.2f}"),
    ("unigram entropy (bits/unit)", "unigram_bits_per_unit", "{:.2f}"),
    ("unigram entropy (bits/s)", "unigram_bits_per_second", "{:.0f}"),
    ("H(u_t | u_t-1) (bits/unit)", "bigram_conditional_bits_per_unit", "{:.2f}"),
    ("word edit dist., same voice", "word_distance_same_voice", "{:.3f}"),
    ("word edit dist., two voices", "word_distance_cross_voice", "{:.3f}"),
    ("edit dist., two different words", "word_distance_different_words", "{:.3f}"),
    ("voice JS divergence (bits)", "voice_js_divergence_bits", "{:.3f}"),
)


def format_table(results: list[dict]) -> str:
    names = [Path(r["corpus"]).name for r in results]
    rows = [["", *names]]
    for label, key, fmt in _ROWS:
        rows.append([label, *("-" if r[key] is None else fmt.format(r[key]) for r in results)])
    for eval_set in ("topic", "storycloze"):
        for key in ("words", *(f"unit_{n}grams" for n in COPY_NGRAMS)):
            rows.append([f"copy acc., {eval_set}, {key.replace('_', ' ')}",
                         *(f"{r['copy'][eval_set][key]:.3f}" for r in results)])
    for k in CONTEXT_UNITS:
        rows.append([f"copy acc., topic, 3-grams, context {k or 'all'} units",
                     *(f"{r['copy']['topic_unit_3grams_by_context_units'][str(k or 'all')]:.3f}"
                       for r in results)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus_dirs", nargs="+", type=Path, help="built demo corpus directories")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--words", type=int, default=40, help="frequent words compared")
    parser.add_argument("--pairs", type=int, default=60, help="rendition pairs drawn per word")
    parser.add_argument("--checkpoints", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="save directories of models trained on the first corpus: score S->S "
                             "on its topic set with the spoken context cut to K units")
    parser.add_argument("--checkpoint-items", type=int, default=200,
                        help="topic items scored per checkpoint and context length")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for directory in args.corpus_dirs:
        if not (directory / "summary.json").is_file():
            print(f"analyze_demo_speech: {directory} is not a built demo corpus (no summary.json); "
                  f"build one with tools/build_demo_corpus.py --out-dir {directory}",
                  file=sys.stderr)
            return 2
    results = [{**analyze(d, args.words, args.pairs), "copy": copy_heuristic(d)}
                for d in args.corpus_dirs]
    print(format_table(results))
    output: dict = {"corpora": results}
    if args.checkpoints:
        import tempfile

        with tempfile.TemporaryDirectory() as work_dir:
            curves = checkpoint_context_curve(args.corpus_dirs[0], args.checkpoints,
                                              args.checkpoint_items, Path(work_dir))
        output["checkpoint_context_curves"] = curves
        for checkpoint, curve in curves.items():
            print(f"S->S topic, context cut to K units (summed/normalised), {checkpoint}: " +
                  ", ".join(f"K={k} {a:.3f}/{b:.3f}" for k, (a, b) in curve.items()))
    if args.out is not None:
        replace_file_durably(args.out, json.dumps(output, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
