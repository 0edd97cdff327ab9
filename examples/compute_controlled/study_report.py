"""The study's numbers from its finished runs: per (control, model) accuracy over seeds, the
LST-minus-baseline differences, a markdown table and a plot against training FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from study_config import Run, StudyPreset
from study_stats import accuracy_estimate, difference_estimate, seed_spread

EVAL_FILENAME = "eval.json"
SCORES = {"summed": "correct", "normalised": "correct_normalised"}


class StudyReportError(ValueError):
    """A finished run whose files the report cannot use as they are."""


def read_run_metrics(save_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl by iteration; refuses a missing, empty or damaged
    file by name (a finished run's file is never repaired by a resume)."""
    import json

    path = save_dir / "metrics.jsonl"
    records: dict[int, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StudyReportError(f"{path} is missing: {save_dir} holds no training metrics") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iteration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise StudyReportError(
                f"{path}: line {number} is no metrics record ({line[:60]!r}); remove or repair "
                f"that line (keep a copy) and report again") from None
        records[iteration] = record
    if not records:
        raise StudyReportError(f"{path} holds no metrics records")
    return [records[i] for i in sorted(records)]


def check_evaluation(name: str, evaluation: dict, preset: StudyPreset) -> None:
    """Refuses an eval.json that lacks a set or mode of `preset`, or whose scores are on no
    items (it was scored under another preset, or damaged)."""
    for eval_set in preset.eval_sets:
        for mode in preset.modes:
            scores = evaluation.get("results") if isinstance(evaluation, dict) else None
            for key in (eval_set, mode):
                scores = scores.get(key) if isinstance(scores, dict) else None
            if not isinstance(scores, dict) or not all(
                    isinstance(scores.get(f), list) for f in SCORES.values()):
                raise StudyReportError(
                    f"run {name}: its {EVAL_FILENAME} has no {eval_set} {mode} scores (scored "
                    f"under another preset?); delete it and run the study again to rescore "
                    f"the run's checkpoint")
            if not scores[SCORES["summed"]]:
                raise StudyReportError(f"run {name}: its {EVAL_FILENAME} scored no {eval_set} "
                                       f"items; an accuracy needs at least one")


def run_record(run: Run, save_dir: Path, preset: StudyPreset) -> dict | None:
    """What one finished run measured (None while it is unfinished)."""
    import json

    eval_path = save_dir / EVAL_FILENAME
    if not eval_path.is_file():
        return None
    try:
        evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StudyReportError(f"{eval_path} is damaged ({error}); delete it and run the study "
                               f"again to rescore the run's checkpoint") from None
    check_evaluation(run.name, evaluation, preset)
    metrics = read_run_metrics(save_dir)
    last = metrics[-1]
    valid = [m for m in metrics if "valid_loss" in m]
    return {"run": run.name, "model": run.model, "steps": run.steps, "seed": run.seed,
            "flops": last["flops"], "tokens": last["tokens"],
            "global_positions": last["global_positions"],
            "tokens_per_global_position": last["tokens"] / last["global_positions"],
            # null for a NaN or infinite one: study.json stays standard JSON
            "valid_loss": _finite(valid[-1]["valid_loss"]) if valid else None,
            "non_finite_loss_iterations": [
                m["iteration"] for m in metrics
                if any(_finite(m.get(key, 0.0)) is None for key in ("loss", "valid_loss"))],
            "results": evaluation["results"]}


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def aggregate(preset: StudyPreset, steps: dict[str, dict[str, int]], runs_dir: Path) -> dict:
    """Every (control, model) group's accuracy and every LST model's difference to the baseline,
    per set, mode and score (summed or length-normalised log-likelihood)."""
    records: dict[str, dict] = {}
    missing: list[str] = []
    groups: list[dict] = []
    outcomes: dict[tuple, np.ndarray] = {}  # (control, model, set, mode, score) -> [S, I]
    item_counts: dict[tuple[str, str], tuple[str, int]] = {}  # (set, mode) -> a run, its items
    for control in preset.controls:
        for model in preset.models:
            runs = [Run(model.name, steps[control][model.name], seed) for seed in preset.seeds]
            finished = []
            for run in runs:
                if run.name not in records:
                    record = run_record(run, runs_dir / run.name, preset)
                    if record is None:
                        if run.name not in missing:
                            missing.append(run.name)
                        continue
                    records[run.name] = record
                finished.append(records[run.name])
            if not finished:
                continue
            group = {"control": control, "model": model.name, "steps": runs[0].steps,
                     "seeds": [r["seed"] for r in finished],
                     "flops": float(np.mean([r["flops"] for r in finished])),
                     "tokens": float(np.mean([r["tokens"] for r in finished])),
                     "tokens_per_global_position": float(np.mean(
                         [r["tokens_per_global_position"] for r in finished])),
                     "accuracy": {}}
            for eval_set in preset.eval_sets:
                for mode in preset.modes:
                    for score, field in SCORES.items():
                        array = _outcomes(finished, eval_set, mode, field, item_counts)
                        outcomes[control, model.name, eval_set, mode, score] = array
                        group["accuracy"][f"{eval_set} {mode} {score}"] = {
                            **accuracy_estimate(array).as_dict(), "spread": seed_spread(array)}
            groups.append(group)
    differences = []
    baseline = preset.baseline.name
    for control in preset.controls:
        for model in preset.lst_models:
            for eval_set in preset.eval_sets:
                for mode in preset.modes:
                    for score in SCORES:
                        first = outcomes.get((control, model.name, eval_set, mode, score))
                        second = outcomes.get((control, baseline, eval_set, mode, score))
                        if first is None or second is None:
                            continue
                        differences.append({
                            "control": control, "model": model.name, "baseline": baseline,
                            "set": eval_set, "mode": mode, "score": score,
                            "seeds": [len(first), len(second)],
                            **difference_estimate(first, second).as_dict()})
    runs = [{**record, "results": {
        eval_set: {mode: {k: v for k, v in scores.items() if k not in SCORES.values()}
                   for mode, scores in modes.items()}
        for eval_set, modes in record["results"].items()}} for record in records.values()]
    return {"preset": preset.name, "steps": steps, "runs": runs,
            "groups": groups, "differences": differences, "missing_runs": missing}


def _outcomes(records: list[dict], eval_set: str, mode: str, field: str,
              seen: dict[tuple[str, str], tuple[str, int]]) -> np.ndarray:
    """[seeds, items] outcomes of `records`; refuses runs scored on different numbers of items
    (another eval_items) than each other or than the runs `seen` before, which neither a mean
    over seeds nor a paired difference can pool."""
    counts = {r["run"]: len(r["results"][eval_set][mode][field]) for r in records}
    first = seen.setdefault((eval_set, mode), next(iter(counts.items())))
    counts = {first[0]: first[1], **counts}
    if len(set(counts.values())) > 1:
        raise StudyReportError(f"{eval_set} {mode}: the runs were scored on different numbers of "
                               f"items {counts}; delete the eval.json of the runs scored under "
                               f"another eval_items and run the study again to rescore them")
    return np.array([r["results"][eval_set][mode][field] for r in records])


def _cell(estimate: dict, spread: dict | None = None, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = (f"{100 * estimate['value']:{sign}.1f} [{100 * estimate['ci_low']:{sign}.1f}, "
            f"{100 * estimate['ci_high']:{sign}.1f}]")
    return text + (f" sd {100 * spread['sd']:.1f}" if spread is not None else "")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(study: dict, score: str = "summed",
                 difference_modes: tuple[str, ...] = ("S->S", "T->T"),
                 accuracy_modes: tuple[str, ...] | None = None) -> str:
    """Markdown: accuracy (%) per (control, model) with its 95% interval and seed sd (on
    `accuracy_modes`, default all), then the LST-minus-baseline differences (points) on
    `difference_modes`."""
    keys = list(dict.fromkeys(k.rsplit(" ", 1)[0] for g in study["groups"]
                              for k in g["accuracy"] if k.endswith(" " + score)))
    if accuracy_modes is not None:
        keys = [k for k in keys if k.split(" ", 1)[1] in accuracy_modes]
    header = ["control", "model", "steps", "train FLOPs", "seeds", *keys]
    rows = [[g["control"], g["model"], f"{g['steps']:,}", f"{g['flops']:.2e}",
             str(len(g["seeds"])),
             *(_cell(g["accuracy"][f"{k} {score}"], g["accuracy"][f"{k} {score}"]["spread"])
               for k in keys)] for g in study["groups"]]
    parts = [f"Accuracy (%, {score} log-likelihood): mean over seeds and items "
             f"[95% two-level bootstrap interval] and the seeds' sd", "", _markdown(header, rows)]
    chosen = [d for d in study["differences"] if d["score"] == score
              and d["mode"] in difference_modes]
    if chosen:
        columns = list(dict.fromkeys(f"{d['set']} {d['mode']}" for d in chosen))
        by_row: dict[tuple[str, str], dict[str, str]] = {}
        for d in chosen:
            by_row.setdefault((d["control"], d["model"]), {})[f"{d['set']} {d['mode']}"] = \
                _cell(d, signed=True)
        rows = [[control, f"{model} - {chosen[0]['baseline']}",
                 *(cells.get(c, "-") for c in columns)] for (control, model), cells in
                by_row.items()]
        parts += ["", f"LST minus baseline (points, {score}) [95% paired two-level bootstrap "
                  f"interval]", "", _markdown(["control", "difference", *columns], rows)]
    if study["missing_runs"]:
        parts += ["", f"unfinished runs (left out): {', '.join(study['missing_runs'])}"]
    diverged = [f"{r['run']} (iterations {_spans(r['non_finite_loss_iterations'])})"
                for r in study["runs"] if r.get("non_finite_loss_iterations")]
    if diverged:
        parts += ["", f"runs with a NaN or infinite loss (diverged? their accuracy is in the "
                      f"tables above): {', '.join(diverged)}"]
    return "\n".join(parts)


def _spans(numbers: list[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def plot(study: dict, path: Path, score: str = "summed") -> None:
    """Accuracy against each (control, model) group's mean training FLOPs, one panel per set
    and mode, with the 95% intervals; one line per model through its controls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(k.rsplit(" ", 1)[0] for g in study["groups"]
                                for k in g["accuracy"] if k.endswith(" " + score)))
    if not panels:
        return
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows),
                                squeeze=False)
    models = list(dict.fromkeys(g["model"] for g in study["groups"]))
    for axis, panel in zip(axes.flat, panels, strict=False):
        for model in models:
            groups = sorted((g for g in study["groups"] if g["model"] == model),
                            key=lambda g: g["flops"])
            estimates = [g["accuracy"][f"{panel} {score}"] for g in groups]
            values = np.array([100 * e["value"] for e in estimates])
            errors = np.array([[100 * (e["value"] - e["ci_low"]) for e in estimates],
                               [100 * (e["ci_high"] - e["value"]) for e in estimates]])
            axis.errorbar([g["flops"] for g in groups], values, yerr=errors, marker="o",
                          capsize=3, label=model, alpha=0.85)
            for g, value in zip(groups, values, strict=True):
                axis.annotate(g["control"][0], (g["flops"], value), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        axis.axhline(50, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel("training FLOPs")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"{study['preset']}: accuracy vs training FLOPs "
                    f"(c/f/d: compute/FLOP/data control; 95% intervals)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
