"""The study's plan refuses models it cannot plan, naming the model (no corpus is built)."""

from types import SimpleNamespace

import pytest
import study
from study_config import ModelSpec, StudyPreset


@pytest.fixture(scope="module")
def corpus(small_tokenizer):
    """What plan_steps reads of a built corpus: a text tokenizer and the unit count."""
    return SimpleNamespace(paths={"tokenizer": small_tokenizer},
                           summary={"config": {"num_units": 64}})


def _preset(lst_flags=(), train_flags=(), budget_steps=6, controls=("compute",)):
    return StudyPreset(
        name="plan", budget_steps=budget_steps, seeds=(1,), controls=controls,
        models=(ModelSpec("lst", "tiny_cpu_lst.yaml", tuple(lst_flags)),
                ModelSpec("baseline", "tiny_cpu_baseline.yaml", is_baseline=True)),
        train_flags=tuple(train_flags))


def test_a_plannable_preset_plans(corpus, caplog):
    steps, _ = study.plan_steps(_preset(), corpus)
    assert steps == {"compute": {"lst": 6, "baseline": 6}}
    # The configs' save-interval is for the runs, which pass --save; the plan saves nothing and
    # warned "--save-interval 30 without --save" for every model.
    assert "--save-interval" not in caplog.text


def test_a_budget_below_one_step_names_the_model(corpus):
    # One baseline step buys less than one LST step under FLOP control.
    with pytest.raises(SystemExit, match=r"study: budget_steps 1 \(of the baseline\) for model "
                                         r"lst: plan: the budget buys no training step of lst"):
        study.plan_steps(_preset(budget_steps=1, controls=("flops",)), corpus)


def test_invalid_flags_name_the_model(corpus, capsys):
    with pytest.raises(SystemExit, match="study: model lst: its config, the preset's train_flags "
                                         "or its flags are no valid lst-train arguments"):
        study.plan_steps(_preset(lst_flags=("--patching-mode", "bogus")), corpus)
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    missing = _preset()
    missing = missing.replace(models=(ModelSpec("lst", "no_such.yaml"), missing.baseline))
    with pytest.raises(SystemExit, match="study: model lst: --config .*no_such.yaml: no such file"):
        study.plan_steps(missing, corpus)


def test_train_flags_are_planned_with(corpus):
    # Every run trains with the preset's train_flags: a bad one is refused before any training,
    # and one that changes the step shape changes the plan.
    with pytest.raises(SystemExit, match="study: model lst: "):
        study.plan_steps(_preset(train_flags=("--no-such-flag",)), corpus)
    _, plans = study.plan_steps(_preset(train_flags=("--global-batch-size", "2",
                                                     "--micro-batch-size", "2")), corpus)
    assert plans["compute"]["lst"]["step"]["global_batch_size"] == 2


def test_a_baseline_with_another_global_model_is_refused(corpus):
    """The plan costs the baseline as the LST model's global stack over tokens; a baseline with
    other key/value heads was planned as one model and trained as another."""
    odd = _preset()
    odd = odd.replace(models=(odd.models[0], ModelSpec("baseline", "tiny_cpu_baseline.yaml",
                                                       ("--num-query-groups", "2"),
                                                       is_baseline=True)))
    with pytest.raises(SystemExit, match=r"study: the baseline's global model .*heads=4, "
                                         r"kv_heads=2.* differs from model lst's"):
        study.plan_steps(odd, corpus)


def _fake_corpus(root):
    names = ("indexed_text_train", "indexed_speech_train", "tokenizer")
    return SimpleNamespace(paths={name: root / name for name in names})


def test_a_run_started_with_other_flags_is_refused_not_reused(tmp_path):
    import json

    from study_config import Run

    preset, run = _preset(), Run("lst", 6, 1)
    runs_dir, corpus = tmp_path / "runs", _fake_corpus(tmp_path / "corpus")
    flags = study.training_flags(preset, run, corpus, runs_dir)
    study.check_run_flags(runs_dir / run.name, flags)  # a fresh run: records its flags
    recorded = json.loads((runs_dir / run.name / "study_run.json").read_text())["flags"]
    assert recorded == [study.RUN_DIR_MARK if f == str(runs_dir / run.name) else f for f in flags]
    study.check_run_flags(runs_dir / run.name, flags)  # the same flags: fine
    # The run finished; then the preset's LST model was edited (another patching mode).
    (runs_dir / run.name / "eval.json").write_text("{}")
    edited = _preset(lst_flags=("--patching-mode", "static"))
    with pytest.raises(SystemExit, match=r"started with other training flags .*'\(none\)' -> "
                                         r"'--patching-mode static'.*the run is kept as it is"):
        study.run_one(edited, run, corpus, runs_dir)
    assert (runs_dir / run.name / "eval.json").read_text() == "{}"
    # Another --out-dir alone is no change: the run's own directory is not compared.
    moved = tmp_path / "moved" / "runs"
    (moved / run.name).mkdir(parents=True)
    (moved / run.name / "study_run.json").write_text(
        (runs_dir / run.name / "study_run.json").read_text())
    study.check_run_flags(moved / run.name, study.training_flags(preset, run, corpus, moved))
    (moved / run.name / "study_run.json").write_text("{")
    with pytest.raises(SystemExit, match="study_run.json is damaged"):
        study.check_run_flags(moved / run.name, flags)


def test_an_interrupted_study_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    with pytest.raises(SystemExit, match="study: interrupted; finished runs are kept, and the "
                                         "same command resumes the rest"):
        study.main(["run", "--preset", "cpu", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("refused", ["holds_units", "is_a_file"])
def test_a_refused_corpus_folder_is_one_line(tmp_path, command, refused):
    """A corpus folder holding a `units/` no build wrote, or a file in its place: one `study:`
    line naming it, as the study's other refusals (it was a traceback), nothing built or run."""
    corpus_dir = tmp_path / "corpus"
    if refused == "holds_units":
        (corpus_dir / "units").mkdir(parents=True)
    else:
        corpus_dir.write_text("not a folder")
    with pytest.raises(SystemExit) as refusal:
        study.main([command, "--preset", "cpu", "--out-dir", str(tmp_path / "out"),
                    "--corpus-dir", str(corpus_dir)])
    message = str(refusal.value.code)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("study: ") and str(corpus_dir) in message and "--corpus-dir" in message
    assert not (tmp_path / "out").exists()
    assert refused == "is_a_file" or sorted(p.name for p in corpus_dir.iterdir()) == ["units"]
