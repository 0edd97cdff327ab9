"""A compute-controlled study on the demo corpus: LST (curriculum, static) against the token
baseline, several seeds, under each control mode, scored on spoken and written story completion.

    python examples/compute_controlled/study.py run --preset cpu [--out-dir runs/study_cpu]
        [--corpus-dir data_cache/study_cpu] [--seeds 1 2 3]
    python examples/compute_controlled/study.py plan --preset h200   # runs and FLOPs (builds the corpus)
    python examples/compute_controlled/study.py report --preset cpu [--out-dir runs/study_cpu]

`run` builds (or reads back) the preset's demo corpus, plans each model's steps under every
control with the FLOP planner (compute: equal steps of equal global positions, the paper's;
flops: equal total FLOPs; data: equal raw tokens; the baseline's `budget_steps` is the budget),
then trains and scores every distinct run, one at a time, and ends with `report`.
Runs are ordinary `pretrain_lst.py` save directories under `<out-dir>/runs/<model>-<N>steps-seed<S>`
(resume, evaluate or convert them with the usual tools): each is trained by `pretrain_lst.py` in a
child process (its log in the run's `train.log`) and scored in this one. A run whose `eval.json`
is there is skipped; a run interrupted during training resumes from its latest checkpoint; one
line per run reports what happened. A run records the flags it started with (`study_run.json`):
a preset edited since (model flags, train_flags, corpus) is refused for that run, never trained
on top of it or reported as its result.

`report` writes `<out-dir>/study.json` (every number, per-item outcomes aside), `study.md` (the
tables, for the summed and the length-normalised log-likelihood score: accuracy as the mean over
seeds and items with its 95% two-level bootstrap interval and the seeds' sd, then LST minus the
baseline per control with its paired interval; see study_stats.py) and `accuracy_vs_flops.png` (accuracy against each run's measured training FLOPs).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

# The tiny models' operations gain nothing from intra-op threads on a shared CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_config import (  # noqa: E402
    REPO_ROOT,
    ModelSpec,
    Run,
    StudyConfigError,
    StudyPreset,
    load_preset,
    plan_runs,
)

EVAL_FILENAME = "eval.json"
TRAIN_LOG = "train.log"
RUN_RECORD = "study_run.json"
RUN_DIR_MARK = "<run directory>"
BATCH_SIZE = 16


# --- corpus and plan -----------------------------------------------------------------------

class CorpusDirectoryError(ValueError):
    """A corpus folder the study cannot build its corpus in; `main` exits with it, one line."""


def build_corpus(preset: StudyPreset, corpus_dir: Path):
    """The preset's demo corpus under `corpus_dir`, built once and then read from its cache.
    Refuses (`CorpusDirectoryError`) a `corpus_dir` that cannot be created, or that holds
    outputs no build wrote, which the build would replace."""
    from megatron_lst.demo_corpus.build import OutputDirectoryError, build_demo_corpus

    try:
        corpus_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, or one of its parents; no permission
        raise CorpusDirectoryError(
            f"cannot use {corpus_dir} as the corpus folder ({error.strerror or error}); give a "
            f"new or empty folder as --corpus-dir") from None
    try:
        return build_demo_corpus(corpus_dir, config=preset.corpus_config(), progress=False)
    except OutputDirectoryError as error:
        raise CorpusDirectoryError(f"{error} (--corpus-dir)") from None


def _validated_args(preset: StudyPreset, model: ModelSpec, tokenizer: str):
    """lst-train's validated arguments of `model`'s runs: its config, the preset's train_flags,
    then its own flags (as `training_flags` orders them); refuses invalid ones naming the model."""
    from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args

    flags = ["--config", str(model.config_path), *preset.train_flags, *model.flags,
             "--tokenizer-model", tokenizer]
    try:
        args = parse_args(flags)
        # Planning saves nothing (each run passes its --save): no warning about --save-interval.
        args.save_interval = None
        return validate_args(args, world_size=1)
    except ArgumentError as error:
        raise SystemExit(f"study: model {model.name}: {error}") from None
    except SystemExit as error:  # argparse has printed which flag is wrong
        raise SystemExit(f"study: model {model.name}: its config, the preset's train_flags or "
                         f"its flags are no valid lst-train arguments (above)") from error


def plan_steps(preset: StudyPreset, corpus) -> tuple[dict[str, dict[str, int]], dict]:
    """`(steps[control][model], the planner's output per control)` for the preset's budget."""
    from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer
    from megatron_lst.tokenizer.vocab import JointVocab
    from megatron_lst.training.compute_plan import Budget, StepShape, plan
    from megatron_lst.training.flops import ModelShape
    from megatron_lst.training.model_provider import lst_config_from_args

    tokenizer = str(corpus.paths["tokenizer"])
    vocab = JointVocab(load_text_tokenizer(tokenizer).vocab_size,
                       corpus.summary["config"]["num_units"])
    shapes, step, row_tokens = {}, None, {}
    for model in preset.lst_models:
        args = _validated_args(preset, model, tokenizer)
        config = lst_config_from_args(args, vocab.size, vocab.eos_id)
        shapes[model.name] = ModelShape.from_model_config(config)
        row_tokens[model.name] = args.max_tokens
        this_step = (args.seq_length, args.global_batch_size)
        if step not in (None, this_step):
            raise SystemExit(f"study: the LST models' steps differ ({step} vs {this_step}); "
                             f"every model must share the global step shape")
        step = this_step
    baseline = _validated_args(preset, preset.baseline, tokenizer)
    if (baseline.seq_length, baseline.global_batch_size) != step:
        raise SystemExit(f"study: the baseline's step {(baseline.seq_length, baseline.global_batch_size)}"
                         f" differs from LST's {step}; compute control needs equal steps")
    # The baseline as lst-train builds it: the plan costs it as the LST models' global stack over
    # tokens, so another global model would train differently from its plan.
    baseline_shape = ModelShape.from_model_config(
        lst_config_from_args(baseline, vocab.size, vocab.eos_id)).baseline_of()
    for name, shape in shapes.items():
        if shape.baseline_of() != baseline_shape:
            raise SystemExit(f"study: the baseline's global model {baseline_shape.global_stack} "
                             f"differs from model {name}'s {shape.global_stack}; compute control "
                             f"compares equal global models")
    budget = Budget(steps=preset.budget_steps, reference="baseline")
    steps: dict[str, dict[str, int]] = {}
    plans: dict[str, dict] = {}
    for control in preset.controls:
        steps[control], plans[control] = {}, {}
        for name, shape in shapes.items():
            # An LST row computes all --max-tokens token positions, padding included: that is
            # what its FLOPs count (and its runs log); the data it consumes is the real tokens
            # per patch.
            try:
                step_shape = StepShape(step[0], step[1], preset.tokens_per_patch,
                                       max_tokens=row_tokens[name])
                computed = plan(budget, shape, baseline_shape, control, step_shape)
            except ValueError as error:  # a budget below one step, tokens that do not fit a row
                raise SystemExit(f"study: budget_steps {preset.budget_steps} (of the baseline) "
                                 f"for model {name}: {error}") from None
            steps[control][name] = computed.lst.steps
            steps[control][preset.baseline.name] = computed.baseline.steps
            plans[control][name] = computed.as_dict()
    return steps, plans


# --- one run -------------------------------------------------------------------------------

def training_flags(preset: StudyPreset, run: Run, corpus, runs_dir: Path) -> list[str]:
    """`pretrain_lst.py` flags of one run. A curriculum goes aligned -> static over the middle
    third of the run, as in the demo."""
    model = next(m for m in preset.models if m.name == run.model)
    paths = corpus.paths
    save = runs_dir / run.name
    flags = [
        "--config", str(model.config_path),
        "--data-path", str(preset.text_weight), str(paths["indexed_text_train"]),
        str(preset.speech_weight), str(paths["indexed_speech_train"]),
        "--split", "98,2,0",
        "--tokenizer-model", str(paths["tokenizer"]),
        "--train-iters", str(run.steps),
        "--eval-interval", str(max(1, run.steps // 5)),
        "--eval-iters", "4",
        "--log-interval", str(max(1, run.steps // 5)),
        "--save", str(save), "--load", str(save),
        "--save-interval", str(max(1, run.steps // 2)),
        "--num-workers", "0", "--seed", str(run.seed),
        # Row indices planned in the training process: the study corpus is small enough that
        # index worker processes would cost more to start than they save.
        "--index-workers", "0",
        "--curriculum-tau1", str(run.steps // 3), "--curriculum-tau2", str(2 * run.steps // 3),
        *preset.train_flags, *model.flags,
    ]
    return flags


def latest_iteration(save_dir: Path) -> int:
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    path = find_latest_checkpoint(save_dir)
    return 0 if path is None else int(read_checkpoint_metadata(path)["iteration"])


def train(flags: list[str], log_path: Path) -> None:
    """Run `pretrain_lst.py flags` in a child process (in the study's process group, so that
    Ctrl-C stops both), its output appended to `log_path`."""
    import subprocess

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        finished = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain_lst.py"), *flags],
                                  stdout=log, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"study: training failed (exit status {finished.returncode}); see "
                         f"{log_path}. Re-running the study resumes from the last checkpoint; "
                         f"`study.py report` aggregates the runs finished so far")


def evaluate(save_dir: Path, preset: StudyPreset, corpus) -> dict:
    """Per-item outcomes and accuracies of the latest checkpoint on each set and mode."""
    from megatron_lst.evaluation import load_items
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.evaluation.scoring import score_items, summarise
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    initialize_parallel()
    try:
        model = load_inference_model(save_dir)
        results: dict[str, dict] = {}
        for eval_set in preset.eval_sets:
            items = load_items(corpus.paths[f"eval_{eval_set}"], model.tokenizer,
                               model.vocab)[:preset.eval_items]
            results[eval_set] = {}
            for mode in preset.modes:
                scores = score_items(model.model_chunks, items, model.vocab, model.patcher, mode,
                                     BATCH_SIZE)
                results[eval_set][mode] = {
                    **summarise(scores),
                    "correct": scores.correct().astype(int).tolist(),
                    "correct_normalised": scores.correct(normalised=True).astype(int).tolist(),
                }
        return {"iteration": model.iteration, "checkpoint": str(model.checkpoint),
                "results": results}
    finally:
        destroy_parallel()


def check_run_flags(save_dir: Path, flags: list[str]) -> None:
    """Refuses to resume or reuse the run in `save_dir` when it was started with other flags
    than `flags` (a preset edited between two starts of a study: its model, train_flags or
    corpus); records `flags` in `<save_dir>/study_run.json` when the run starts afresh. A run
    directory of an older study, without the record, is taken as it is."""
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    record_path = save_dir / RUN_RECORD
    # The run's own directory differs with --out-dir alone; it is no part of what was trained.
    written = [RUN_DIR_MARK if flag == str(save_dir) else flag for flag in flags]
    if record_path.is_file():
        try:
            recorded = json.loads(record_path.read_text(encoding="utf-8"))["flags"]
        except (ValueError, KeyError, TypeError) as error:  # ValueError: JSON, UTF-8
            raise SystemExit(f"study: {record_path} is damaged ({error!r}); it records the flags "
                             f"the run was started with: restore it, or delete it to take the "
                             f"run as it is") from None
        if recorded != written:
            changes = []
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
                    a=recorded, b=written, autojunk=False).get_opcodes():
                if tag == "equal":
                    continue
                # A changed value is shown after its flag.
                flag = (f"{recorded[i1 - 1]} " if i1 and i2 > i1 and j2 > j1
                        and not recorded[i1].startswith("--") else "")
                changes.append(f"{flag}{' '.join(recorded[i1:i2]) or '(none)'!r} -> "
                               f"{flag}{' '.join(written[j1:j2]) or '(none)'!r}")
            raise SystemExit(
                f"study: {save_dir} was started with other training flags than the preset gives "
                f"it now ({'; '.join(changes[:4])}); restore the preset (or --corpus-dir), or "
                f"give another --out-dir: the run is kept as it is")
    elif latest_iteration(save_dir) == 0 and not (save_dir / EVAL_FILENAME).exists():
        save_dir.mkdir(parents=True, exist_ok=True)
        replace_file_durably(record_path, json.dumps({"flags": written}, indent=1) + "\n")


def run_one(preset: StudyPreset, run: Run, corpus, runs_dir: Path) -> str:
    """Train (or resume) and score one run unless it is finished; returns what was done."""
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    save_dir = runs_dir / run.name
    eval_path = save_dir / EVAL_FILENAME
    flags = training_flags(preset, run, corpus, runs_dir)
    check_run_flags(save_dir, flags)
    if eval_path.is_file():
        return "finished earlier, skipped"
    done = []
    start_iteration = latest_iteration(save_dir)
    if start_iteration < run.steps:
        started = time.perf_counter()
        train(flags, save_dir / TRAIN_LOG)
        resumed = f" (resumed from {start_iteration})" if start_iteration else ""
        done.append(f"trained {run.steps - start_iteration} steps{resumed} in "
                    f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    evaluation = evaluate(save_dir, preset, corpus)
    if evaluation["iteration"] != run.steps:
        raise SystemExit(f"study: {save_dir} ends at iteration {evaluation['iteration']}, not the "
                         f"planned {run.steps}; remove the directory to retrain it")
    # A run counts as finished only once its scores are complete.
    replace_file_durably(eval_path, json.dumps(evaluation) + "\n")
    scores = ", ".join(f"{s} {m} {100 * r['accuracy']:.1f}%"
                       for s, modes in evaluation["results"].items()
                       for m, r in modes.items() if m in ("S->S", "T->T"))
    done.append(f"scored in {time.perf_counter() - started:.0f} s: {scores}")
    return "; ".join(done)


def write_plan(preset: StudyPreset, out_dir: Path, corpus_dir: Path):
    """Build the corpus, plan every run and write `<out_dir>/plan.json`; returns
    `(corpus, steps, runs)` and prints the runs with their planned training FLOPs."""
    from megatron_lst.checkpoint.durable_files import replace_file_durably

    corpus = build_corpus(preset, corpus_dir)
    steps, plans = plan_steps(preset, corpus)
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_file_durably(out_dir / "plan.json", json.dumps(  # whole or not at all
        {"preset": _preset_dict(preset), "corpus_dir": str(corpus_dir), "steps": steps,
         "plans": plans}, indent=1) + "\n")
    runs = plan_runs(preset, steps)
    flops_per_step = {name: plan[("baseline" if name == preset.baseline.name else "lst")]
                      ["flops_per_step"]["total"]
                      for control in plans.values() for lst_name, plan in control.items()
                      for name in (lst_name, preset.baseline.name)}
    total = sum(run.steps * flops_per_step[run.model] for run in runs)
    print(f"study {preset.name}: {len(runs)} runs, {total:.3e} planned training FLOPs "
          f"(LST rows counted at their --max-tokens positions, as the runs log them)")
    for run in runs:
        print(f"  {run.name}: {run.steps * flops_per_step[run.model]:.3e} FLOPs")
    return corpus, steps, runs


def run_study(preset: StudyPreset, out_dir: Path, corpus_dir: Path) -> dict:
    started = time.perf_counter()
    corpus, steps, runs = write_plan(preset, out_dir, corpus_dir)
    print(f"study {preset.name}: {len(runs)} runs ({len(preset.seeds)} seeds; steps per control "
          f"{json.dumps(steps)}) in {out_dir / 'runs'}", flush=True)
    for i, run in enumerate(runs, 1):
        outcome = run_one(preset, run, corpus, out_dir / "runs")
        print(f"[{i}/{len(runs)}] {run.name}: {outcome} "
              f"({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    return report(preset, out_dir)


def _preset_dict(preset: StudyPreset) -> dict:
    return json.loads(json.dumps(asdict(preset)))


# --- report --------------------------------------------------------------------------------

def report(preset: StudyPreset, out_dir: Path) -> dict:
    """Aggregate the finished runs of `<out_dir>` into study.json, study.md and the plot."""
    from study_report import StudyReportError, aggregate, format_table, plot

    from megatron_lst.checkpoint.durable_files import replace_file_durably

    plan_path = out_dir / "plan.json"
    if not plan_path.is_file():
        raise SystemExit(f"study: no {plan_path}: {out_dir} holds no study of this preset; give "
                         f"the --out-dir of `study.py run`, or run `study.py plan` first")
    plan = json.loads(plan_path.read_text())
    unplanned = [f"{control}/{model.name}" for control in preset.controls for model in preset.models
                 if model.name not in plan["steps"].get(control, {})]
    if unplanned:
        raise SystemExit(f"study: {plan_path} plans no {', '.join(unplanned)}: it was planned for "
                         f"another preset; report with that preset, or plan this one first")
    try:
        study = aggregate(preset, plan["steps"], out_dir / "runs")
    except StudyReportError as error:
        raise SystemExit(f"study: no report: {error}") from None
    table = format_table(study)
    print(table)
    normalised = format_table(study, score="normalised")
    replace_file_durably(out_dir / "study.md", f"{table}\n\n{normalised}\n")
    replace_file_durably(out_dir / "study.json", json.dumps(study, indent=1) + "\n")
    plot(study, out_dir / "accuracy_vs_flops.png")
    print(f"wrote {out_dir / 'study.md'}, {out_dir / 'study.json'} and "
          f"{out_dir / 'accuracy_vs_flops.png'}")
    return study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train and score every run, then report"),
                            ("plan", "build the corpus, print the runs and their FLOPs"),
                            ("report", "aggregate the finished runs")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--preset", default="cpu",
                       help="a preset name of examples/compute_controlled/presets or a YAML file")
        p.add_argument("--out-dir", type=Path,
                       help="default: runs/study_<preset name> in the checkout")
        p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
        if name != "report":
            p.add_argument("--corpus-dir", type=Path,
                           help="default: data_cache/study_<preset name> in the checkout")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        preset = load_preset(options.preset)
        if options.seeds:
            preset = preset.replace(seeds=tuple(options.seeds))
    except StudyConfigError as error:
        raise SystemExit(f"study: {error}") from None
    out_dir = options.out_dir or REPO_ROOT / "runs" / f"study_{preset.name}"
    if options.command == "report":
        report(preset, out_dir)
        return 0
    corpus_dir = options.corpus_dir or REPO_ROOT / "data_cache" / f"study_{preset.name}"
    try:
        if options.command == "plan":
            write_plan(preset, out_dir, corpus_dir)
        else:
            try:
                run_study(preset, out_dir, corpus_dir)
            except KeyboardInterrupt:  # the training child, in this process group, got it too
                raise SystemExit("study: interrupted; finished runs are kept, and the same "
                                 "command resumes the rest (`study.py report` aggregates the "
                                 "finished ones)") from None
    except CorpusDirectoryError as error:
        raise SystemExit(f"study: {error}") from None
    return 0


# The guard matters: saving a dist checkpoint spawns processes that re-import this file.
if __name__ == "__main__":
    sys.exit(main())
