"""`make demo`: a tiny LST and its token baseline trained at equal compute on CPU, then compared.

    python examples/demo/run_demo.py [--out-dir runs/demo] [--corpus-dir data_cache/demo]
                                     [--train-iters 3600] [--eval-items 300]

1. builds the offline demo corpus (cached under --corpus-dir: a re-run reads it back);
2. trains the tiny LST (curriculum patching) and the tiny token baseline with
   `examples/configs/tiny_cpu_{lst,baseline}.yaml`: compute-controlled as in the paper, the same
   steps of the same global positions (LST's positions are patches, the baseline's tokens), on
   67% text / 33% interleaved speech-text rows; checkpoints land in `<out-dir>/{lst,baseline}`
   (replacing those of an earlier demo) and are ordinary `pretrain_lst.py` checkpoints (resume
   with --load, evaluate, convert with tools/convert_checkpoint.py);
3. scores both on the demo's 2-way story-completion sets (`eval/storycloze.jsonl`: an ending with
   one fact changed; `eval/topic.jsonl`: another story's ending) in the S->S and T->T modes with `megatron_lst.evaluation` (accuracy of the summed ending log-likelihood, 95%
   bootstrap interval);
4. prints a table and writes `<out-dir>/loss_vs_flops.png` (validation loss against cumulative
   model training FLOPs) and `<out-dir>/results.json`; its last line is the demo's wall time,
   split into the corpus, each model's training and scoring, and the rest.

Validation loss is the held-out token mean over `--split`'s validation documents of the training
sets, each model on its own rows: an LST row of 128 patches holds several times the tokens of a
baseline row of 128 tokens, mostly speech units, which are harder to predict than text pieces, so
the two losses measure different token mixtures and are not comparable across models. Compare the
models by their story-completion accuracy; compare a model's curve with itself. Everything runs in
this process, one model at a time, on one CPU process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The tiny models' operations are too small to gain from intra-op threads; on 2 shared cores
# extra threads only spin. Set before torch is imported (here or in spawned helpers).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "examples" / "configs"
MODELS = {"lst": CONFIGS / "tiny_cpu_lst.yaml", "baseline": CONFIGS / "tiny_cpu_baseline.yaml"}
EVAL_SETS = ("storycloze", "topic")  # the 2-way sets: a wrong fact, and another story's ending
EVAL_MODES = ("S->S", "T->T")
TEXT_WEIGHT, SPEECH_WEIGHT = 0.67, 0.33  # the paper's blend (here a share of rows)
# The fewest story-completion items per set a --corpus-scale below 1 keeps (2-way items: a 95%
# interval of about +-14 points).
MIN_SCALED_EVAL_ITEMS = 50


@dataclass
class ModelReport:
    name: str
    steps: int
    global_positions: int
    tokens: int
    flops: float
    final_train_loss: float
    valid_loss: float
    checkpoint: str
    accuracy: dict[str, dict[str, float]]
    valid_curve: dict[int, float]
    flops_curve: dict[int, float]
    train_seconds: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "runs" / "demo",
                        help="the two runs' save directories, results.json and the plot")
    parser.add_argument("--corpus-dir", type=Path, default=REPO_ROOT / "data_cache" / "demo",
                        help="the demo corpus: built there, or read back from its cache when "
                             "built with the same settings")
    parser.add_argument("--corpus-scale", type=float, default=1.0,
                        help="multiplies the number of training documents of the corpus; below 1 "
                             "(a quick try) also its story-completion items per set, 300 at 1, "
                             f"at least {MIN_SCALED_EVAL_ITEMS}")
    parser.add_argument("--train-iters", type=int, default=3600,
                        help="training steps of each model (the same global positions per step)")
    parser.add_argument("--eval-items", type=int, default=300,
                        help="story-completion items scored per mode (at most the set's size: "
                             "see --corpus-scale)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of both runs")
    return parser


def corpus_config(parser: argparse.ArgumentParser, scale: float):
    """The demo corpus's `DemoCorpusConfig` at `--corpus-scale` `scale`: at scale 1 and above
    with the default items per evaluation set (at 1 it is the default config, which the README's
    results and the corpus cache come from); below 1 (a quick try, whose speech synthesis is then
    mostly the evaluation sets') those shrink by the same factor, to no fewer than
    `MIN_SCALED_EVAL_ITEMS`. A scale that is no positive number is a usage error."""
    from megatron_lst.demo_corpus.build import DemoCorpusConfig

    try:
        config = DemoCorpusConfig(seed=0, scale=scale)
    except ValueError as error:
        parser.error(f"--corpus-scale: {error}")
    items = min(config.eval_items, max(MIN_SCALED_EVAL_ITEMS, round(config.eval_items * scale)))
    return replace(config, eval_items=items)


def print_stage(message: str) -> None:
    """A demo's progress line: the stage it starts now."""
    print(f"\n=== {message}", flush=True)


def training_flags(name: str, corpus, out_dir: Path, train_iters: int, seed: int) -> list[str]:
    """`pretrain_lst.py` flags of one demo model: its YAML plus the corpus and the run length.
    The curriculum goes aligned -> static over the middle third of the run."""
    indexed = corpus.paths
    flags = [
        "--config", str(MODELS[name]),
        "--data-path", str(TEXT_WEIGHT), str(indexed["indexed_text_train"]),
        str(SPEECH_WEIGHT), str(indexed["indexed_speech_train"]),
        "--split", "98,2,0",
        "--tokenizer-model", str(indexed["tokenizer"]),
        "--train-iters", str(train_iters),
        "--eval-interval", str(max(1, train_iters // 10)),
        "--eval-iters", "4",
        "--log-interval", str(max(1, train_iters // 20)),
        "--save", str(out_dir / name), "--save-interval", str(train_iters),
        "--num-workers", "0", "--seed", str(seed),
        *curriculum_flags(name, train_iters),
    ]
    return flags


def curriculum_flags(name: str, train_iters: int) -> list[str]:
    if name != "lst":
        return []
    return ["--curriculum-tau1", str(train_iters // 3),
            "--curriculum-tau2", str(2 * train_iters // 3)]


def check_train_iters(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a --train-iters the models' YAMLs cannot train (one not past their warm-up)
    before the corpus is built and the previous demo run removed. The flags are checked with an
    empty --save: the previous run's checkpoints, which `run` removes, are no reason to stop."""
    from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args

    with tempfile.TemporaryDirectory() as empty_save:
        for name in MODELS:
            flags = ["--config", str(MODELS[name]), "--train-iters", str(args.train_iters),
                     "--save", empty_save, *curriculum_flags(name, args.train_iters)]
            try:
                validate_args(parse_args(flags), world_size=1)
            except ArgumentError as error:
                parser.error(f"--train-iters {args.train_iters}: {error}")


def check_previous_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out-dir whose `lst/` or `baseline/` is not an earlier demo
    run: `run` removes those folders before training, and `--out-dir ckpt` removed a real run's
    `ckpt/lst`."""
    tokenizer = (args.corpus_dir / "tokenizer" / "spm.model").resolve()
    for name in MODELS:
        save_dir = args.out_dir / name
        if save_dir.exists() and not is_demo_run(save_dir, tokenizer):
            parser.error(f"--out-dir: {save_dir} is not an earlier demo run (its checkpoints "
                         f"were not trained with the demo corpus's tokenizer {tokenizer}), and "
                         f"the demo would remove it: give another --out-dir")


def is_demo_run(save_dir: Path, tokenizer: Path) -> bool:
    """Whether `save_dir` is a demo run: its latest checkpoint trained with the demo corpus's
    `tokenizer`, or, stopped before its first save, it holds only the files lst-train writes."""
    from megatron_lst.checkpoint.errors import CheckpointError
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpointing import METADATA_FILENAME

    try:
        latest = find_latest_checkpoint(save_dir)
        if latest is None:
            return save_dir.is_dir() and all(
                entry.name in ("lst_row_index", "metrics.jsonl", "lst_train.lock")
                or ".tmp-" in entry.name for entry in save_dir.iterdir())
        recorded = json.loads((latest / METADATA_FILENAME).read_text(encoding="utf-8"))
        used = (recorded.get("args") or {}).get("tokenizer_model")
    except (CheckpointError, OSError, ValueError, AttributeError):  # unreadable: not ours
        return False
    return isinstance(used, str) and Path(used).resolve() == tokenizer


def train(flags: list[str]) -> tuple[object, object, float]:
    """Run `pretrain_lst.py`'s loop in this process on `flags`: (its validated args, its result,
    the seconds it took)."""
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain

    args = validate_args(parse_args(flags), world_size=1)
    start = time.perf_counter()
    result = pretrain(args)
    return args, result, time.perf_counter() - start


def evaluate_checkpoint(checkpoint_dir: Path, items_paths: dict[str, Path], num_items: int
                        ) -> dict[str, dict[str, float]]:
    """Accuracy per `"<set> <mode>"` of the checkpoint on each story-completion set."""
    from megatron_lst.evaluation import evaluate_items, load_items
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    initialize_parallel()
    try:
        model = load_inference_model(checkpoint_dir)
        accuracy = {}
        for name, path in items_paths.items():
            items = load_items(path, model.tokenizer, model.vocab)[:num_items]
            scores = evaluate_items(model.model_chunks, items, model.vocab, model.patcher,
                                    EVAL_MODES, batch_size=16)
            accuracy.update({f"{name} {mode}": scores[mode] for mode in EVAL_MODES})
        return accuracy
    finally:
        destroy_parallel()


def format_table(reports: list[ModelReport]) -> str:
    header = ["model", "steps", "global pos.", "tokens", "train FLOPs", "train loss",
              "valid loss", *(f"{key} acc. [95% CI]" for key in _accuracy_keys())]
    rows = [header]
    for r in reports:
        accuracies = []
        for key in _accuracy_keys():
            a = r.accuracy[key]
            accuracies.append(f"{100 * a['accuracy']:.1f}% [{100 * a['accuracy_ci_low']:.1f}, "
                              f"{100 * a['accuracy_ci_high']:.1f}]")
        rows.append([r.name, str(r.steps), f"{r.global_positions:,}", f"{r.tokens:,}",
                     f"{r.flops:.3e}", f"{r.final_train_loss:.3f}", f"{r.valid_loss:.3f}",
                     *accuracies])
    return text_table(rows)


def text_table(rows: list[list[str]]) -> str:
    """Rows of cells, the first the header, as left-aligned columns under a dashed rule."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _accuracy_keys() -> list[str]:
    return [f"{name} {mode}" for name in EVAL_SETS for mode in EVAL_MODES]


def plot(reports: list[ModelReport], path: Path) -> None:
    lines = {}
    for report in reports:
        iterations = sorted(report.valid_curve)
        lines[report.name] = ([report.flops_curve[i] for i in iterations],
                              [report.valid_curve[i] for i in iterations])
    plot_lines(lines, path, "cumulative model training FLOPs",
               "validation loss (nats / token, own rows)",
               "Tiny LST vs token baseline, equal steps x global positions (CPU demo)")


def plot_lines(lines: dict[str, tuple[list[float], list[float]]], path: Path, xlabel: str,
               ylabel: str, title: str) -> None:
    """Write a demo figure to `path`: one line of points per model, `{name: (xs, ys)}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o", label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(argv: list[str] | None = None) -> list[ModelReport]:
    # The demo's time counts from here: the flag checks import megatron (5-15 s on 2 cores).
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    parser = build_parser()
    args = parser.parse_args(argv)
    check_train_iters(parser, args)
    check_previous_runs(parser, args)
    config = corpus_config(parser, args.corpus_scale)
    from megatron_lst.demo_corpus.build import (
        OutputDirectoryError,
        build_demo_corpus,
        format_summary,
    )

    print_stage(f"demo corpus in {args.corpus_dir} (built once, then read from its cache)")
    try:
        with timed(stage_seconds, "corpus"):
            corpus = build_demo_corpus(args.corpus_dir, config=config)
    except OutputDirectoryError as error:
        parser.error(f"--corpus-dir: {error}")
    print(format_summary(corpus.summary), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    reports = []
    for name in MODELS:
        save_dir = args.out_dir / name
        if save_dir.exists():
            print(f"removing the previous demo run {save_dir}", flush=True)
            shutil.rmtree(save_dir)
        print_stage(f"training {name} for {args.train_iters} steps ({MODELS[name].name})")
        with timed(stage_seconds, f"{name} training"):
            train_args, result, seconds = train(
                training_flags(name, corpus, args.out_dir, args.train_iters, args.seed))
        print_stage(f"scoring {name} on {', '.join(EVAL_SETS)} ({', '.join(EVAL_MODES)}), "
                    f"{min(args.eval_items, config.eval_items)} items each")
        with timed(stage_seconds, f"{name} scoring"):
            accuracy = evaluate_checkpoint(
                save_dir, {s: corpus.paths[f"eval_{s}"] for s in EVAL_SETS}, args.eval_items)
        final = result.iteration
        reports.append(ModelReport(
            name=name, steps=final,
            global_positions=final * train_args.global_batch_size * train_args.seq_length,
            tokens=int(result.tokens), flops=result.flops[final],
            final_train_loss=_mean_tail(result.losses),
            valid_loss=result.eval_losses[final], checkpoint=result.checkpoints[-1],
            accuracy=accuracy, valid_curve=result.eval_losses, flops_curve=result.flops,
            train_seconds=seconds))

    print_stage("results")
    print(format_table(reports))
    print("(validation losses are per token of each model's own rows, which mix speech and text "
          "differently: not comparable across models; accuracy is)")
    png = args.out_dir / "loss_vs_flops.png"
    plot(reports, png)
    (args.out_dir / "results.json").write_text(
        json.dumps([asdict(r) for r in reports], indent=1) + "\n")
    print(f"\nplot: {png}\nresults: {args.out_dir / 'results.json'}\n"
          f"checkpoints: {', '.join(r.checkpoint for r in reports)}\n"
          f"{format_time_report(time.perf_counter() - started, stage_seconds)}")
    return reports


@contextlib.contextmanager
def timed(stage_seconds: dict[str, float], stage: str):
    """Add the wall-clock seconds of the block to `stage_seconds[stage]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - start


def format_time_report(total_seconds: float, stage_seconds: dict[str, float]) -> str:
    """The demo's closing time line: the total and each stage in minutes, then what no stage
    counts (flag checks, imports, the table and the plot)."""
    rest = total_seconds - sum(stage_seconds.values())
    parts = [f"{stage} {seconds / 60:.1f}" for stage, seconds in stage_seconds.items()]
    return (f"demo took {total_seconds / 60:.1f} min ({', '.join(parts)}, "
            f"the rest {rest / 60:.1f})")


def _mean_tail(losses: dict[int, float], fraction: float = 0.1) -> float:
    """Mean training loss over the last `fraction` of the iterations (one batch is noisy)."""
    values = [losses[i] for i in sorted(losses)]
    tail = values[-max(1, math.ceil(fraction * len(values))):]
    return sum(tail) / len(tail)


# The guard matters: saving a dist checkpoint spawns processes that re-import this file.
if __name__ == "__main__":
    run()
    sys.exit(0)
