"""The study's plan refuses models it cannot plan, naming the model (no corpus is built)."""

from types import SimpleNamespace

import pytest
import study
from study_config import ModelSpec, StudyPreset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """What plan_steps reads of a built corpus: a text tokenizer and the unit count."""
    from megatron_lst.tokenizer.text_tokenizer import train_sentencepiece

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5)) + f" {i}."
                 for i in range(400)]
    path = train_sentencepiece(sentences, tmp_path_factory.mktemp("spm") / "spm.model", 300)
    return SimpleNamespace(paths={"tokenizer": path}, summary={"config": {"num_units": 64}})


def _preset(lst_flags=(), train_flags=(), budget_steps=6, controls=("compute",)):
    return StudyPreset(
        name="plan", budget_steps=budget_steps, seeds=(1,), controls=controls,
        models=(ModelSpec("lst", "tiny_cpu_lst.yaml", tuple(lst_flags)),
                ModelSpec("baseline", "tiny_cpu_baseline.yaml", is_baseline=True)),
        train_flags=tuple(train_flags))


def test_a_plannable_preset_plans(corpus):
    steps, _ = study.plan_steps(_preset(), corpus)
    assert steps == {"compute": {"lst": 6, "baseline": 6}}


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
