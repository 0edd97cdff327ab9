"""`make demo-downstream`: the demo's LST and token baseline fine-tuned on ASR and TTS for the
same steps, then evaluated on held-out utterances (the paper's low-data ASR comparison, tiny).

    python examples/demo/run_downstream.py [--demo-dir runs/demo] [--out-dir runs/downstream]
                                           [--corpus-dir data_cache/demo] [--train-iters 240]

1. reads the pretrained checkpoints `<demo-dir>/{lst,baseline}` (`make demo` writes them; when
   they are missing this runs the demo first) and the demo corpus;
2. fine-tunes each with `pretrain_lst.py`'s own loop, `--finetune --task asr` and then
   `--task tts`: weights only, a fresh optimizer, batch 4, the same `--train-iters` for both
   models, on the utterances of `--split 98,2,0`'s train part of `speech_train`; LST with static
   patches of 4 (the rule it generates with), the baseline one position a token. Each model's
   rows are sized to hold the longest utterance (LST: about 4x fewer global positions);
3. evaluates on held-out utterances no training step ever saw, neither in pretraining nor in
   fine-tuning: the valid part of `speech_train` under that split and the corpus's
   `speech_valid`. ASR: greedy decoding with the KV cache, WER, CER and the hallucination rate
   (outputs that end without EOS, at the length cap or the model's context) at every saved step (the curve) and at the end; TTS: unit
   edit rate, ASR-CER (the generated units transcribed by the final ASR model with the lower
   WER, the same one for both TTS models), hallucination rate and global generation steps per
   second of speech (`megatron_lst.evaluation.downstream`);
4. prints one table with 95% bootstrap intervals over utterances and writes
   `<out-dir>/wer_vs_steps.png` and `<out-dir>/results.json`.

Everything runs in this process, one model at a time, on one CPU process group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # see run_demo.py

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The demo's two model configs, its training run in this process, its table and figure layout.
from run_demo import MODELS, is_demo_run, plot_lines, print_stage, text_table, train  # noqa: E402

TASKS = ("asr", "tts")
SPLIT = "98,2,0"  # the split the demo pretrained with: its valid utterances stay held out
PATCH_SIZE = 4


@dataclass
class ModelResult:
    name: str
    asr: dict[str, float] = field(default_factory=dict)
    tts: dict[str, float] = field(default_factory=dict)
    wer_curve: dict[int, float] = field(default_factory=dict)
    """Held-out WER (first --curve-utterances utterances) after each saved fine-tuning step."""
    rows: dict[str, list[int]] = field(default_factory=dict)
    """Per task: [--max-tokens, --seq-length] of the fine-tuning rows."""
    finetune_seconds: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=REPO_ROOT / "runs" / "demo",
                        help="`make demo`'s output: the two pretrained checkpoints (the demo "
                             "runs first when it holds none)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "runs" / "downstream",
                        help="the fine-tuning runs, results.json and the WER plot")
    parser.add_argument("--corpus-dir", type=Path, default=REPO_ROOT / "data_cache" / "demo",
                        help="the demo corpus the checkpoints were trained on")
    parser.add_argument("--train-iters", type=int, default=240,
                        help="fine-tuning steps of 4 utterances, per model and task")
    parser.add_argument("--curve-points", type=int, default=4,
                        help="saved checkpoints (evenly spaced) the WER curve is measured at")
    parser.add_argument("--curve-utterances", type=int, default=12,
                        help="held-out utterances the WER curve decodes at each of them")
    parser.add_argument("--tts-utterances", type=int, default=12,
                        help="held-out utterances the TTS models speak")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fine-tuning runs")
    return parser


def patcher_of(name: str):
    from megatron_lst.patching import Patcher, PatchingConfig

    return Patcher(PatchingConfig("static", patch_size=PATCH_SIZE) if name == "lst"
                   else PatchingConfig("none"))


def row_shape(name: str, task: str, stores: list, space_id: int) -> tuple[int, int]:
    """(--max-tokens, --seq-length) that hold every `task` row of `stores` for model `name`."""
    from megatron_lst.data.task_rows import max_row_shape

    shapes = [max_row_shape(store, task, patcher_of(name), space_id) for store in stores]
    inputs, patches = max(s[0] for s in shapes), max(s[1] for s in shapes)
    return (patches, patches) if name == "baseline" else (inputs, patches)


def finetune_flags(name: str, task: str, corpus, shape: tuple[int, int], save: Path,
                   train_iters: int, save_interval: int, seed: int) -> list[str]:
    max_tokens, seq_length = shape
    flags = [
        "--config", str(MODELS[name]),
        "--load", str(corpus["pretrained"] / name), "--finetune", "--task", task,
        "--data-path", str(corpus["indexed_speech_train"]), "--split", SPLIT,
        "--tokenizer-model", str(corpus["tokenizer"]),
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(train_iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", str(max(1, train_iters // 20)), "--lr-decay-style", "cosine",
        "--eval-interval", str(train_iters), "--eval-iters", "4",
        "--log-interval", str(max(1, train_iters // 8)),
        "--save", str(save), "--save-interval", str(save_interval),
        "--num-workers", "0", "--seed", str(seed),
    ]
    if name == "lst":
        flags += ["--patching-mode", "static", "--patch-size", str(PATCH_SIZE),
                  "--max-tokens", str(max_tokens)]
    return flags


def load_task_model(checkpoint: Path):
    """The model of one checkpoint directory, ready for decoding (call within a process group)."""
    from megatron_lst.evaluation.downstream import TaskModel
    from megatron_lst.evaluation.loading import load_inference_model

    return TaskModel.from_inference_model(load_inference_model(checkpoint))


def held_out_utterances(corpus) -> list:
    """The utterances no training step saw: `SPLIT`'s valid part of `speech_train` (pretraining
    and fine-tuning only validated on them), then the corpus's `speech_valid`."""
    from megatron_lst.data.documents import AlignedDocument
    from megatron_lst.data.indexed import DocumentStore
    from megatron_lst.training.data_provider import split_bounds

    train = DocumentStore(corpus["indexed_speech_train"])
    start, stop = split_bounds(SPLIT, len(train))["valid"]
    held_out = DocumentStore(corpus["indexed_speech_valid"])
    documents = ([train[i] for i in range(start, stop)] +
                 [held_out[i] for i in range(len(held_out))])
    # Copies: a store's documents are views of its memory map, which closes with the store.
    return [AlignedDocument(*(array.copy() for array in astuple(doc))) for doc in documents]


def format_table(results: list[ModelResult], steps: int) -> str:
    def rate(summary: dict[str, float], key: str) -> str:
        return (f"{100 * summary[key]:.1f} [{100 * summary[key + '_ci_low']:.1f}, "
                f"{100 * summary[key + '_ci_high']:.1f}]")

    header = ["model", "steps", "ASR WER %", "ASR CER %", "ASR halluc. %", "TTS unit ER %",
              "TTS ASR-CER %", "TTS halluc. %", "global steps / s speech"]
    rows = [header]
    for r in results:
        rows.append([r.name, str(steps), rate(r.asr, "wer"), rate(r.asr, "cer"),
                     rate(r.asr, "hallucination_rate"), rate(r.tts, "unit_edit_rate"),
                     rate(r.tts, "asr_cer"), rate(r.tts, "hallucination_rate"),
                     f"{r.tts['global_steps_per_second']:.1f}"])
    return text_table(rows)


def plot(results: list[ModelResult], path: Path) -> None:
    lines = {}
    for r in results:
        steps = sorted(r.wer_curve)
        lines[r.name] = (steps, [100 * r.wer_curve[s] for s in steps])
    plot_lines(lines, path, "ASR fine-tuning steps (batch 4)", "held-out WER (%)",
               "Tiny LST vs token baseline: ASR fine-tuning (CPU demo)")


def check_previous_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out-dir whose `asr/` or `tts/` runs are not earlier
    fine-tuning runs of this script: `run` removes them before fine-tuning."""
    tokenizer = (args.corpus_dir / "tokenizer" / "spm.model").resolve()
    for task in TASKS:
        for name in MODELS:
            save = args.out_dir / task / name
            if save.exists() and not is_demo_run(save, tokenizer):
                parser.error(f"--out-dir: {save} is not an earlier demo fine-tuning run (its "
                             f"checkpoints were not trained with the demo corpus's tokenizer "
                             f"{tokenizer}), and this script would remove it: give another "
                             f"--out-dir")


def run(argv: list[str] | None = None) -> list[ModelResult]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_previous_runs(parser, args)
    started, cpu_started = time.perf_counter(), time.process_time()
    from megatron_lst.data.indexed import DocumentStore
    from megatron_lst.demo_corpus.build import build_demo_corpus
    from megatron_lst.evaluation.downstream import run_asr, run_tts, summarise_asr, summarise_tts
    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint

    if any(find_latest_checkpoint(args.demo_dir / name) is None for name in MODELS):
        print_stage(f"no pretrained demo checkpoints in {args.demo_dir}: running the demo first")
        import run_demo

        run_demo.run(["--out-dir", str(args.demo_dir), "--corpus-dir", str(args.corpus_dir)])
    corpus = dict(build_demo_corpus(args.corpus_dir, seed=0, progress=False).paths)
    corpus["pretrained"] = args.demo_dir
    train_store = DocumentStore(corpus["indexed_speech_train"])
    space_id = train_store.manifest.tokenizer.space_id
    frame_rate = train_store.manifest.frame_rate
    evaluation = held_out_utterances(corpus)
    stores = [train_store, DocumentStore(corpus["indexed_speech_valid"])]
    save_interval = max(1, args.train_iters // args.curve_points)
    print(f"{len(evaluation)} held-out utterances; fine-tuning {args.train_iters} steps of 4 "
          f"utterances on the {len(train_store)} of {corpus['indexed_speech_train']} "
          f"(split {SPLIT}: the valid ones held out)", flush=True)

    results = {name: ModelResult(name) for name in MODELS}
    for task in TASKS:
        for name, result in results.items():
            shape = row_shape(name, task, stores, space_id)
            result.rows[task] = list(shape)
            save = args.out_dir / task / name
            if save.exists():
                shutil.rmtree(save)
            print_stage(f"fine-tuning {name} on {task}: {args.train_iters} steps, rows of "
                   f"{shape[0]} tokens in {shape[1]} global positions")
            interval = save_interval if task == "asr" else args.train_iters  # the WER curve's
            _, _, seconds = train(finetune_flags(name, task, corpus, shape, save,
                                                 args.train_iters, interval, args.seed))
            result.finetune_seconds[task] = seconds

    print_stage("ASR: decoding the held-out utterances at every saved step")
    initialize_parallel(seed=args.seed)
    try:
        for name, result in results.items():
            save = args.out_dir / "asr" / name
            for step in range(save_interval, args.train_iters + 1, save_interval):
                asr = load_task_model(save / f"iter_{step:07d}")
                curve = summarise_asr(run_asr(asr, evaluation[:args.curve_utterances]))
                result.wer_curve[step] = curve["wer"]
                print(f"{name} step {step}: WER {100 * curve['wer']:.1f}% on "
                      f"{args.curve_utterances} utterances", flush=True)
            outputs = run_asr(asr, evaluation)
            result.asr = summarise_asr(outputs)
            result.examples = [{"reference": o.reference, "hypothesis": o.hypothesis}
                               for o in outputs[:2]]
        best = min(results.values(), key=lambda r: r.asr["wer"]).name
        print_stage(f"TTS: generating speech for {args.tts_utterances} held-out utterances; ASR-CER "
               f"by the {best} ASR model")
        judge = load_task_model(args.out_dir / "asr" / best)
        for name, result in results.items():
            tts = load_task_model(args.out_dir / "tts" / name)
            result.tts = summarise_tts(run_tts(tts, evaluation[:args.tts_utterances], judge),
                                       frame_rate)
            result.tts["asr_model"] = best
    finally:
        destroy_parallel()

    print_stage("results")
    ordered = list(results.values())
    print(format_table(ordered, args.train_iters))
    print(f"(ASR on {len(evaluation)} held-out utterances, TTS on {args.tts_utterances}; 95% "
          f"bootstrap intervals over utterances; ASR-CER by the fine-tuned {best} ASR model)")
    for r in ordered:
        print(f"{r.name} transcribes: {r.examples[0]['hypothesis']!r}\n"
              f"{' ' * len(r.name)} reference:   {r.examples[0]['reference']!r}")
    png = args.out_dir / "wer_vs_steps.png"
    plot(ordered, png)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    (args.out_dir / "results.json").write_text(json.dumps(
        {"train_iters": args.train_iters, "held_out_utterances": len(evaluation),
         "wall_seconds": wall, "cpu_seconds": cpu,
         "models": [asdict(r) for r in ordered]}, indent=1) + "\n")
    print(f"\nplot: {png}\nresults: {args.out_dir / 'results.json'}\n"
          f"downstream demo took {wall / 60:.1f} min ({cpu / 60:.1f} min of CPU time)")
    return ordered


# The guard matters: saving a dist checkpoint spawns processes that re-import this file.
if __name__ == "__main__":
    run()
    sys.exit(0)
