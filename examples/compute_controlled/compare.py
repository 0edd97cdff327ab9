"""Plan, evaluate and compare an LST run and its token baseline trained under one budget.

    python examples/compute_controlled/compare.py plan --lst-config L.yaml --baseline-config B.yaml \
        --tokenizer-model spm.model --budget-flops 1e20 --control compute --out plan.json
    python examples/compute_controlled/compare.py evaluate --checkpoint RUN_DIR \
        --items eval/storycloze.jsonl [--modes 'S->S' 'T->T'] --out RUN_DIR/eval.json
    python examples/compute_controlled/compare.py report --runs lst=LST_DIR baseline=BASE_DIR \
        --out-dir OUT

`plan` reads the two training configs the way `pretrain_lst.py` does, hands their model
dimensions and step shape to `tools/plan_compute.py` (which prints its table) and writes the
steps each model gets under the chosen control mode. `evaluate` scores the latest checkpoint of a
run on story-completion items with `megatron_lst.evaluation` (single process). `report` reads each
run's `metrics.jsonl` (written by the training loop next to its checkpoints) and `eval.json`, prints
a comparison table and writes `loss_vs_flops.png` and `comparison.json`; it refuses runs trained
on different vocabularies, data or splits (read from their latest checkpoints) or scored on
different numbers of items, which are no comparison, and notes a run that trained short of the
steps of `<out-dir>/plan.json`, was scored at an older checkpoint, or has NaN or infinite losses.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- plan ---------------------------------------------------------------------------------

def _validated(config: Path, world_size: int):
    from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args

    try:
        args = parse_args(["--config", str(config)])
        # Planning saves nothing (the runs pass --save): no warning about --save-interval.
        args.save_interval = None
        return validate_args(args, world_size)
    except ArgumentError as error:
        raise SystemExit(f"plan: {config}: {error}") from None


def _positive(kind):
    """argparse type: a finite `kind` > 0 (a budget, a rate, a process count)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: "
                                             f"{text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def plan_compute_flags(lst_args, text_vocab_size: int, tokens_per_patch: float) -> list[str]:
    """`tools/plan_compute.py` flags describing the LST model and step of validated `lst_args`."""
    from megatron_lst.tokenizer.vocab import JointVocab
    from megatron_lst.training.model_provider import lst_config_from_args

    vocab = JointVocab(text_vocab_size, lst_args.num_units)
    config = lst_config_from_args(lst_args, vocab.size, vocab.eos_id)
    g, enc, dec, xattn = config.global_model, config.encoder, config.decoder, config.cross_attention
    # plan_compute.py describes both local models with one set of flags.
    differing = [name for name in ("hidden_size", "num_heads", "num_query_groups", "kv_channels",
                                   "ffn_hidden_size", "window")
                 if getattr(enc, name) != getattr(dec, name)]
    if xattn.encoder_window != xattn.decoder_window:
        differing.append("cross-attention window")
    if xattn.all_encoder_layers != xattn.all_decoder_layers:
        differing.append("cross-attention layers")
    if differing:
        raise SystemExit(f"plan: tools/plan_compute.py describes the encoder and decoder with one "
                         f"set of sizes; these configs differ in {', '.join(differing)}")
    optional = {"--global-kv-heads": g.num_query_groups, "--global-kv-channels": g.kv_channels,
                "--local-kv-heads": enc.num_query_groups, "--local-kv-channels": enc.kv_channels}
    return [
        "--global-dim", str(g.hidden_size), "--global-layers", str(g.num_layers),
        "--global-heads", str(g.num_heads), "--global-ffn-hidden", str(g.ffn_hidden_size),
        *(x for flag, value in optional.items() if value is not None for x in (flag, str(value))),
        "--local-dim", str(enc.hidden_size), "--encoder-layers", str(enc.num_layers),
        "--decoder-layers", str(dec.num_layers), "--local-heads", str(enc.num_heads),
        "--local-ffn-hidden", str(enc.ffn_hidden_size),
        "--local-window", str(enc.window), "--cross-attn-k", str(xattn.slots_per_patch),
        "--cross-attn-heads", str(xattn.num_heads),
        "--cross-attn-window", str(xattn.encoder_window),
        "--cross-attn-all-layers" if xattn.all_encoder_layers else "--no-cross-attn-all-layers",
        "--text-vocab-size", str(text_vocab_size), "--num-units", str(lst_args.num_units),
        "--seq-length", str(lst_args.seq_length),
        "--global-batch-size", str(lst_args.global_batch_size),
        # LST rows are padded to --max-tokens: FLOPs count them all, as the runs log them.
        "--max-tokens", str(lst_args.max_tokens),
        "--tokens-per-patch", str(tokens_per_patch),
    ]


def plan(options: argparse.Namespace) -> int:
    from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer

    lst = _validated(options.lst_config, options.world_size)
    baseline = _validated(options.baseline_config, options.world_size)
    for name in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "kv_channels", "ffn_hidden_size", "seq_length", "global_batch_size"):
        if getattr(lst, name) != getattr(baseline, name):
            raise SystemExit(f"plan: the configs differ in {name} ({getattr(lst, name)} vs "
                             f"{getattr(baseline, name)}); the baseline must share LST's global "
                             f"model and step shape")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    text_vocab_size = load_text_tokenizer(options.tokenizer_model).vocab_size
    budget = (["--budget-flops", str(options.budget_flops)] if options.budget_flops is not None
              else ["--budget-steps", str(options.budget_steps)])
    planned = options.out.with_suffix(".plan_compute.json")
    finished = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plan_compute.py"),
                               *budget, "--control", options.control, "--out", str(planned),
                               *plan_compute_flags(lst, text_vocab_size, options.tokens_per_patch)],
                              check=False)
    if finished.returncode != 0:  # it printed why; a plan of an earlier call may be in `planned`
        raise SystemExit(f"plan: tools/plan_compute.py found no plan (above); {options.out} "
                         f"is left as it was")
    [computed] = json.loads(planned.read_text())["plans"]
    steps = {"lst": computed["lst"]["steps"], "baseline": computed["baseline"]["steps"]}
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    # Whole or not at all: run.sh and `report` read the steps of a plan that may be there already.
    replace_file_durably(options.out, json.dumps({"control": options.control, "steps": steps,
                                                  "plan": computed}, indent=1) + "\n")
    print(f"steps: lst {steps['lst']}, baseline {steps['baseline']} -> {options.out}")
    return 0


# --- evaluate -----------------------------------------------------------------------------

def evaluate(options: argparse.Namespace) -> int:
    from megatron_lst.evaluation import evaluate_items, load_items
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    stems = [Path(path).stem for path in options.items]
    if len(set(stems)) != len(stems):  # results are keyed by the file's stem
        raise SystemExit(f"evaluate: --items {' '.join(options.items)}: two files share a name "
                         f"({stems}); their results would overwrite each other")
    initialize_parallel()
    try:
        model = load_inference_model(options.checkpoint, tokenizer_model=options.tokenizer_model)
        results = {}
        for items_path in options.items:
            items = load_items(items_path, model.tokenizer, model.vocab)
            results[Path(items_path).stem] = evaluate_items(
                model.model_chunks, items, model.vocab, model.patcher, options.modes,
                batch_size=options.batch_size)
    finally:
        destroy_parallel()
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    # Written whole or not at all: a half-written eval.json would read as a damaged result.
    options.out.parent.mkdir(parents=True, exist_ok=True)
    replace_file_durably(options.out, json.dumps(
        {"checkpoint": str(model.checkpoint), "iteration": model.iteration, "results": results},
        indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


# --- report -------------------------------------------------------------------------------

def _named_runs(specs: list[str]) -> dict[str, Path]:
    """`--runs NAME=SAVE_DIR ...` as {name: directory}; refuses a malformed, repeated or missing
    one."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, equals, directory = spec.partition("=")
        if not equals or not name or not directory:
            raise SystemExit(f"report: --runs {spec!r} is not NAME=SAVE_DIR")
        if name in runs:
            raise SystemExit(f"report: --runs names {name!r} twice")
        if not Path(directory).is_dir():
            raise SystemExit(f"report: run {name}: no directory {directory}")
        runs[name] = Path(directory)
    return runs


def _training_setup(directory: Path) -> dict | None:
    """What makes two runs comparable, from the latest checkpoint of `directory` (None when it
    has none): the vocabulary (tokenizer included) and the training data and split."""
    from megatron_lst.checkpoint.errors import CheckpointError
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    try:
        path = find_latest_checkpoint(directory)
        metadata = None if path is None else read_checkpoint_metadata(path, strict=False)
    except CheckpointError as error:
        raise SystemExit(f"report: {error}") from None
    if metadata is None:
        return None
    args = metadata.get("args") or {}
    return {"vocabulary": metadata.get("vocab"), "data": args.get("data_path"),
            "split": args.get("split")}


def check_comparable(setups: dict[str, dict | None],
                     evaluations: dict[str, dict]) -> None:
    """Refuses runs trained on different vocabularies or data, or scored on different numbers
    of items of one set: their losses and accuracies are no comparison."""
    known = {name: setup for name, setup in setups.items() if setup is not None}
    for field in ("vocabulary", "data", "split"):
        values = {name: setup[field] for name, setup in known.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            raise SystemExit(f"report: the runs were trained with different {field}: "
                             f"{json.dumps(values)}; compare runs of one vocabulary and data")
    for eval_set in dict.fromkeys(s for results in evaluations.values() for s in results):
        counts = {name: {mode: summary.get("num_items") for mode, summary in
                         results[eval_set].items()}
                  for name, results in evaluations.items() if eval_set in results}
        if len({json.dumps(c, sort_keys=True) for c in counts.values()}) > 1:
            raise SystemExit(f"report: {eval_set} was scored on different items per run "
                             f"{json.dumps(counts)}; score every run on the same items")


def _evaluation(name: str, path: Path) -> dict:
    """A run's eval.json ({"results": {}} when it has none); refuses a damaged one."""
    if not path.is_file():
        return {"results": {}}
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
        results = evaluation["results"]
        if not isinstance(results, dict) or not all(
                isinstance(modes, dict) and all(isinstance(m, dict) for m in modes.values())
                for modes in results.values()):
            raise TypeError("results is no mapping of sets to modes to scores")
    except (ValueError, KeyError, TypeError) as error:  # ValueError: JSON, UTF-8
        raise SystemExit(f"report: run {name}: {path} is damaged ({error!r}); score the run "
                         f"again with `compare.py evaluate --out {path}`") from None
    return evaluation


def _notes(name: str, metrics: list[dict], evaluation: dict, planned: dict) -> list[str]:
    """What makes a run's row no like-for-like comparison: training short of (or past) its
    planned steps, scores of an older checkpoint than the metrics' last, NaN or infinite
    losses."""
    notes, trained = [], metrics[-1]["iteration"]
    if name in planned and trained != planned[name]:
        notes.append(f"trained {trained} of its planned {planned[name]} steps")
    scored = evaluation.get("iteration")
    if evaluation["results"] and scored is not None and scored != trained:
        notes.append(f"scored at iteration {scored}, not its last {trained}")
    non_finite = [m["iteration"] for m in metrics
                  if any(isinstance(m.get(k), float) and not math.isfinite(m[k])
                         for k in ("loss", "valid_loss"))]
    if non_finite:
        notes.append(f"NaN or infinite loss at {len(non_finite)} iteration(s), first "
                     f"{non_finite[0]}")
    return notes


def _planned_steps(out_dir: Path) -> dict:
    """{run name: steps} of `<out_dir>/plan.json` (run.sh's plan), {} when there is none."""
    try:
        steps = json.loads((out_dir / "plan.json").read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return steps if isinstance(steps, dict) else {}


def report(options: argparse.Namespace) -> int:
    from study_report import StudyReportError, read_run_metrics

    runs = _named_runs(options.runs)
    evaluations, setups, curves = {}, {}, {}
    for name, directory in runs.items():
        try:
            curves[name] = read_run_metrics(directory)
        except StudyReportError as error:
            raise SystemExit(f"report: run {name}: {error}") from None
        evaluations[name] = _evaluation(name, directory / "eval.json")
        setups[name] = _training_setup(directory)
    check_comparable(setups, {name: e["results"] for name, e in evaluations.items()})
    rows, planned = [], _planned_steps(options.out_dir)
    for name, metrics in curves.items():
        evaluation = evaluations[name]["results"]
        last = metrics[-1]
        valid = [m for m in metrics if "valid_loss" in m]
        valid_loss = valid[-1]["valid_loss"] if valid else None
        row = {"model": name, "steps": last["iteration"], "tokens": last["tokens"],
               "global positions": last["global_positions"], "FLOPs": last["flops"],
               # null for NaN or infinity (then in the note): comparison.json stays JSON
               "valid loss": valid_loss if valid_loss is None or math.isfinite(valid_loss)
               else None}
        for eval_set, modes in evaluation.items():
            for mode, summary in modes.items():
                row[f"{eval_set} {mode}"] = summary["accuracy"]
        notes = _notes(name, metrics, evaluations[name], planned)
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    print(_table(rows))
    for row in rows:
        if "note" in row:
            print(f"note: {row['model']}: {row['note']}")
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    options.out_dir.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a failed write (a full disk) keeps the previous comparison.
    replace_file_durably(options.out_dir / "comparison.json", json.dumps(rows, indent=1) + "\n")
    _plot(curves, options.out_dir / "loss_vs_flops.png")
    print(f"wrote {options.out_dir / 'comparison.json'} and {options.out_dir / 'loss_vs_flops.png'}")
    return 0


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if value < 1e4 else f"{value:.3e}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))
                     for line in table)


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axes, valid_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, metrics in curves.items():
        train_axes.plot([m["flops"] for m in metrics], [m["loss"] for m in metrics],
                        label=name, alpha=0.8)
        valid = [m for m in metrics if "valid_loss" in m]
        valid_axes.plot([m["flops"] for m in valid], [m["valid_loss"] for m in valid],
                        marker="o", label=name)
    for axes, title in ((train_axes, "training loss"), (valid_axes, "validation loss")):
        axes.set_xlabel("cumulative model training FLOPs")
        axes.set_ylabel("nats / token")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="steps for both models under one budget")
    p.add_argument("--lst-config", type=Path, required=True,
                   help="lst-train YAML of the LST run (examples/configs)")
    p.add_argument("--baseline-config", type=Path, required=True,
                   help="lst-train YAML of the token baseline: the same global model and step")
    p.add_argument("--tokenizer-model", required=True,
                   help="the runs' tokenizer (its size sets the vocabulary's FLOPs)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--budget-flops", type=_positive(float),
                        help="total training FLOPs of the baseline, e.g. 1e20")
    amount.add_argument("--budget-steps", type=_positive(int),
                        help="training steps of the baseline")
    p.add_argument("--control", choices=("compute", "flops", "data"), default="compute",
                   help="what the two runs share: compute (equal steps of equal global "
                        "positions, the paper's), flops or data (raw tokens) (default: compute)")
    p.add_argument("--tokens-per-patch", type=_positive(float), default=3.1,
                   help="mean input tokens per LST patch on your data (flops/data control; "
                        "default 3.1)")
    p.add_argument("--world-size", type=_positive(int), default=1,
                   help="processes of the training runs (default 1)")
    p.add_argument("--out", type=Path, required=True,
                   help="the plan JSON to write (the runs' steps); tools/plan_compute.py's full "
                        "plan goes beside it (plan.json: plan.plan_compute.json)")
    p.set_defaults(run=plan)

    p = commands.add_parser("evaluate", help="story-completion accuracy of a run's checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="the run's --save directory")
    p.add_argument("--items", nargs="+", required=True, help="evaluation JSONL files")
    p.add_argument("--modes", nargs="+", default=["S->S", "T->T"],
                   choices=("S->S", "T->T", "S->T", "T->S"))
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=evaluate)

    p = commands.add_parser("report", help="table and plots of finished runs")
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=SAVE_DIR")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(run=report)
    return parser


# The guard matters: loading dist checkpoints may spawn processes that re-import this file.
if __name__ == "__main__":
    options = build_parser().parse_args()
    sys.exit(options.run(options))
