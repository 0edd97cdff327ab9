"""The study report on finished runs whose files are damaged or do not fit together."""

import json

import numpy as np
import pytest
import study
from study_config import load_preset
from study_report import StudyReportError, aggregate, format_table

PRESET = load_preset("cpu").replace(seeds=(1, 2), controls=("compute",),
                                    eval_sets=("storycloze",), modes=("S->S",))
STEPS = {"compute": {"lst": 4, "baseline": 4}}


def _write_run(runs_dir, name, correct=(1, 0, 1, 0, 1), eval_sets=("storycloze",),
               losses=(4.0, 3.0, 2.0, 1.0)):
    """A finished run's eval.json and metrics.jsonl (4 iterations)."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    scores = {"accuracy": float(np.mean(correct)) if correct else 0.0, "correct": list(correct),
              "correct_normalised": list(correct)}
    (run_dir / "eval.json").write_text(json.dumps(
        {"iteration": 4, "checkpoint": "x", "results": {s: {"S->S": scores} for s in eval_sets}}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "loss": losses[i - 1], "flops": 10.0 * i, "tokens": 5 * i,
                    "global_positions": 4 * i, **({"valid_loss": losses[i - 1]} if i % 2 == 0
                                                  else {})}) + "\n" for i in range(1, 5)))
    return run_dir


def _write_study(runs_dir, **odd):
    """Every run of PRESET finished; `odd` maps run names to _write_run's keyword arguments."""
    for model in ("lst", "baseline"):
        for seed in (1, 2):
            name = f"{model}-4steps-seed{seed}"
            _write_run(runs_dir, name, **odd.get(name, {}))


def test_fitting_runs_are_reported(tmp_path):
    _write_study(tmp_path)
    result = aggregate(PRESET, STEPS, tmp_path)
    assert [g["accuracy"]["storycloze S->S summed"]["value"] for g in result["groups"]] == [
        pytest.approx(0.6), pytest.approx(0.6)]
    assert result["groups"][0]["flops"] == 40.0


def test_runs_scored_on_different_items_are_refused(tmp_path):
    # The LST runs were scored under eval_items 6, the baseline's under 5: neither a seed mean
    # nor a paired difference pools them.
    six = {"correct": (1, 0, 1, 0, 1, 1)}
    _write_study(tmp_path, **{"lst-4steps-seed1": six, "lst-4steps-seed2": six})
    with pytest.raises(StudyReportError, match=r"different numbers of items \{'lst-4steps-seed1'"
                                               r": 6, 'baseline-4steps-seed1': 5"):
        aggregate(PRESET, STEPS, tmp_path)


@pytest.mark.parametrize("odd, message", [
    ({"eval_sets": ("topic",)}, "has no storycloze S->S scores"),
    ({"correct": ()}, "scored no storycloze items"),
])
def test_an_eval_json_of_another_preset_is_named(tmp_path, odd, message):
    _write_study(tmp_path, **{"lst-4steps-seed2": odd})
    with pytest.raises(StudyReportError, match=f"run lst-4steps-seed2: its eval.json {message}"):
        aggregate(PRESET, STEPS, tmp_path)


@pytest.mark.parametrize("text", ['[1, 2]', '{"results": [1]}', '{"results": {"storycloze": 1}}'])
def test_an_eval_json_of_another_shape_is_named(tmp_path, text):
    _write_study(tmp_path)
    (tmp_path / "lst-4steps-seed1" / "eval.json").write_text(text)
    with pytest.raises(StudyReportError, match="run lst-4steps-seed1: its eval.json has no "
                                               "storycloze S->S scores"):
        aggregate(PRESET, STEPS, tmp_path)
    (tmp_path / "lst-4steps-seed1" / "eval.json").write_text(text[:-2])
    with pytest.raises(StudyReportError, match="lst-4steps-seed1/eval.json is damaged"):
        aggregate(PRESET, STEPS, tmp_path)


def test_a_damaged_or_missing_metrics_file_is_named(tmp_path):
    _write_study(tmp_path)
    metrics = tmp_path / "lst-4steps-seed2" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]) + '{"iteration": 3, "lo\n' + "".join(lines[2:]))
    with pytest.raises(StudyReportError, match=r"metrics.jsonl: line 3 is no metrics record"):
        aggregate(PRESET, STEPS, tmp_path)
    metrics.unlink()
    with pytest.raises(StudyReportError, match=r"metrics.jsonl is missing"):
        aggregate(PRESET, STEPS, tmp_path)


def test_study_report_refuses_by_name(tmp_path):
    out_dir = tmp_path / "study"
    with pytest.raises(SystemExit, match="no .*plan.json: .* holds no study of this preset"):
        study.report(PRESET, out_dir)
    _write_study(out_dir / "runs", **{"lst-4steps-seed1": {"eval_sets": ("topic",)}})
    (out_dir / "plan.json").write_text(json.dumps({"steps": STEPS}))
    with pytest.raises(SystemExit, match="study: no report: run lst-4steps-seed1"):
        study.report(PRESET, out_dir)
    h200 = load_preset("h200").replace(controls=("compute",))
    with pytest.raises(SystemExit, match="plans no compute/lst_static: it was planned for "
                                         "another preset"):
        study.report(h200, out_dir)
    assert not (out_dir / "study.json").exists()


def test_a_run_with_nan_losses_is_flagged_and_study_json_stays_json(tmp_path):
    nan = float("nan")
    _write_study(tmp_path, **{"lst-4steps-seed2": {"losses": (4.0, nan, nan, float("inf"))}})
    result = aggregate(PRESET, STEPS, tmp_path)
    runs = {r["run"]: r for r in result["runs"]}
    assert runs["lst-4steps-seed2"]["non_finite_loss_iterations"] == [2, 3, 4]
    assert runs["lst-4steps-seed2"]["valid_loss"] is None
    assert runs["lst-4steps-seed1"]["non_finite_loss_iterations"] == []
    assert runs["lst-4steps-seed1"]["valid_loss"] == 1.0
    json.dumps(result, allow_nan=False)  # no NaN in study.json
    assert ("runs with a NaN or infinite loss (diverged? their accuracy is in the tables above): "
            "lst-4steps-seed2 (iterations 2-4)") in format_table(result)
