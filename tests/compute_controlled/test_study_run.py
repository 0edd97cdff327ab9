"""A tiny study end to end: plan, train, resume, skip, score, report."""

import json

import pytest

pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed "
                    "(pip install 'megatron-lst[data]')")

import study  # noqa: E402
from study_config import ModelSpec, StudyPreset, plan_runs  # noqa: E402

SMOKE = StudyPreset(
    name="smoke",
    models=(ModelSpec("lst", "tiny_cpu_lst.yaml"),
            ModelSpec("baseline", "tiny_cpu_baseline.yaml", is_baseline=True)),
    budget_steps=6, seeds=(1, 2), controls=("compute",),
    corpus={"speech_documents": 8, "text_documents": 12, "units": "phones", "num_units": 64,
            "tokenizer_vocab_size": 300, "workers": 1, "deduplicate_units": True},
    eval_items=4, train_flags=("--eval-iters", "1", "--speech-only-fraction", "0.5"))


@pytest.mark.slow
def test_smoke_study_resumes_skips_and_reports(tmp_path, capsys):
    corpus = study.build_corpus(SMOKE, tmp_path / "corpus")
    steps, _ = study.plan_steps(SMOKE, corpus)
    assert steps == {"compute": {"lst": 6, "baseline": 6}}  # compute control: equal steps
    runs = plan_runs(SMOKE, steps)
    assert [r.name for r in runs] == ["lst-6steps-seed1", "baseline-6steps-seed1",
                                      "lst-6steps-seed2", "baseline-6steps-seed2"]
    runs_dir = tmp_path / "study" / "runs"
    # An interrupted run: its training stopped (and saved) after 3 of 6 steps.
    interrupted = runs[0]
    study.train([*study.training_flags(SMOKE, interrupted, corpus, runs_dir),
                 "--exit-interval", "3"], runs_dir / interrupted.name / "train.log")
    assert study.latest_iteration(runs_dir / interrupted.name) == 3
    # A finished run: trained and scored before the study starts.
    finished = runs[1]
    study.run_one(SMOKE, finished, corpus, runs_dir)
    finished_eval = (runs_dir / finished.name / "eval.json").read_text()
    capsys.readouterr()

    result = study.run_study(SMOKE, tmp_path / "study", tmp_path / "corpus")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] lst-6steps-seed1: trained 3 steps (resumed from 3)")
    assert lines[1].startswith("[2/4] baseline-6steps-seed1: finished earlier, skipped")
    assert lines[2].startswith("[3/4] lst-6steps-seed2: trained 6 steps in")
    assert (runs_dir / finished.name / "eval.json").read_text() == finished_eval

    from megatron_lst.training.metrics import read_metrics

    resumed = read_metrics(runs_dir / interrupted.name)
    assert [m["iteration"] for m in resumed] == list(range(1, 7))
    for run in runs:
        evaluation = json.loads((runs_dir / run.name / "eval.json").read_text())
        assert evaluation["iteration"] == 6
        for eval_set in ("storycloze", "topic"):
            for mode in ("S->S", "T->T", "S->T", "T->S"):
                scored = evaluation["results"][eval_set][mode]
                assert len(scored["correct"]) == 4
                assert scored["accuracy"] == sum(scored["correct"]) / 4

    # study.json: one group per (control, model), one difference per LST model, set, mode, score.
    written = json.loads((tmp_path / "study" / "study.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert [(g["control"], g["model"], g["seeds"]) for g in written["groups"]] == [
        ("compute", "lst", [1, 2]), ("compute", "baseline", [1, 2])]
    assert written["missing_runs"] == []
    assert len(written["differences"]) == 2 * 4 * 2
    for group in written["groups"]:
        assert len(group["accuracy"]) == 2 * 4 * 2
        for estimate in group["accuracy"].values():
            assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]
            assert len(estimate["spread"]["per_seed"]) == 2
    lst = next(g for g in written["groups"] if g["model"] == "lst")
    runs_by_name = {r["run"]: r for r in written["runs"]}
    assert lst["flops"] == pytest.approx(sum(
        runs_by_name[f"lst-6steps-seed{s}"]["flops"] for s in (1, 2)) / 2)
    for difference in written["differences"]:
        key = f"{difference['set']} {difference['mode']} {difference['score']}"
        baseline = next(g for g in written["groups"] if g["model"] == "baseline")
        assert difference["value"] == pytest.approx(
            lst["accuracy"][key]["value"] - baseline["accuracy"][key]["value"])
    table = (tmp_path / "study" / "study.md").read_text()
    assert "| compute | lst | 6 |" in table and "| compute | lst - baseline |" in table
    assert (tmp_path / "study" / "accuracy_vs_flops.png").stat().st_size > 0

    # A second run trains nothing.
    study.run_study(SMOKE, tmp_path / "study", tmp_path / "corpus")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert all("finished earlier, skipped" in line for line in lines)
