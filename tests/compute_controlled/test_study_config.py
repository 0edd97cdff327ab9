"""Study presets and the runs they plan."""

import pytest
from study_config import ModelSpec, StudyConfigError, StudyPreset, load_preset, plan_runs


@pytest.mark.parametrize("name, models", [("cpu", ["lst", "baseline"]),
                                          ("h200", ["lst", "lst_static", "baseline"])])
def test_shipped_presets_load(name, models):
    from megatron_lst.demo_corpus.build import DemoCorpusConfig
    from megatron_lst.training.arguments import parse_args, validate_args

    preset = load_preset(name)
    assert [m.name for m in preset.models] == models
    assert preset.baseline.name == "baseline"
    assert preset.seeds == (1, 2, 3) and preset.controls == ("compute", "flops", "data")
    assert DemoCorpusConfig(**preset.corpus).units == "phones"
    for model in preset.models:
        assert model.config_path.is_file()
        # Every run's flags are valid lst-train flags.
        args = validate_args(parse_args(["--config", str(model.config_path), *model.flags,
                                         *preset.train_flags]), world_size=1)
        assert args.speech_only_fraction == 0.5 and args.seq_length == 128


def test_runs_with_equal_steps_are_shared_between_controls():
    preset = load_preset("h200").replace(seeds=(1, 2), controls=("compute", "data"))
    steps = {"compute": {"lst": 10, "lst_static": 10, "baseline": 10},
             "data": {"lst": 7, "lst_static": 7, "baseline": 10}}
    names = [run.name for run in plan_runs(preset, steps)]
    assert names == [
        "lst-10steps-seed1", "lst_static-10steps-seed1", "baseline-10steps-seed1",
        "lst-10steps-seed2", "lst_static-10steps-seed2", "baseline-10steps-seed2",
        # data control: the baseline's 10 steps are the compute control's runs
        "lst-7steps-seed1", "lst_static-7steps-seed1", "lst-7steps-seed2", "lst_static-7steps-seed2",
    ]


def test_bad_presets_are_named():
    lst, baseline = ModelSpec("lst", "tiny_cpu_lst.yaml"), ModelSpec(
        "baseline", "tiny_cpu_baseline.yaml", is_baseline=True)
    with pytest.raises(StudyConfigError, match="exactly one baseline"):
        StudyPreset("x", (lst, ModelSpec("b2", "tiny_cpu_baseline.yaml", is_baseline=True),
                          baseline), budget_steps=5)
    with pytest.raises(StudyConfigError, match="unknown control 'tokens'"):
        StudyPreset("x", (lst, baseline), budget_steps=5, controls=("tokens",))
    with pytest.raises(StudyConfigError, match="no study preset"):
        load_preset("no_such_preset")


_MODELS = ("models:\n  lst: {config: tiny_cpu_lst.yaml}\n"
           "  baseline: {config: tiny_cpu_baseline.yaml, baseline: true}\n")


@pytest.mark.parametrize("text, message", [
    (_MODELS + "budget_steps: 5.5\n", r"budget_steps must be an integer >= 1, got 5\.5"),
    (_MODELS + "budget_steps: '5'\n", "budget_steps must be an integer >= 1, got '5'"),
    (_MODELS + "budget_steps: 0\n", "budget_steps must be an integer >= 1, got 0"),
    (_MODELS + "budget_steps: 5\neval_items: 0\n", "eval_items must be an integer >= 1"),
    # 1 and '1' are distinct values that would name one run directory
    (_MODELS + "budget_steps: 5\nseeds: [1, '1']\n", "seed '1' is not an integer"),
    (_MODELS + "budget_steps: 5\nseeds: [-1]\n", r"seed -1 is not an integer in \[0, "),
    (_MODELS + "budget_steps: 5\nseeds: '12'\n", "seeds must be a YAML list, got '12'"),
    (_MODELS + "budget_steps: 5\ncontrols: [compute, compute]\n", "controls must be distinct"),
    (_MODELS + "budget_steps: 5\ntext_weight: -1\n", "text_weight must be a number > 0"),
    (_MODELS + "budget_steps: 5\ntokens_per_patch: .nan\n", "tokens_per_patch must be a number"),
    (_MODELS + "budget_steps: 5\ncorpus: [1]\n", "`corpus` must be a mapping"),
    (_MODELS + "budget_steps: 5\ncorpus: {unit: phones}\n",
     "corpus: .*unexpected keyword argument 'unit'.*DemoCorpusConfig"),
    (_MODELS + "budget_steps: 5\ncorpus: {units: phonez}\n", "corpus: units must be one of"),
    ("models: [lst, baseline]\nbudget_steps: 5\n", "`models` must be a mapping"),
    ("models:\n  lst:\n  baseline: {config: b.yaml, baseline: true}\nbudget_steps: 5\n",
     "model 'lst' must be a mapping with a `config`"),
    ("models:\n  lst: {config: a.yaml, flags: --foo}\n  baseline: {config: b.yaml, "
     "baseline: true}\nbudget_steps: 5\n", "model 'lst': flags must be a YAML list"),
    ("models:\n  lst: {config: a.yaml, baseline: 'no'}\n  baseline: {config: b.yaml, "
     "baseline: true}\nbudget_steps: 5\n", "baseline must be true or false, got 'no'"),
    ("models:\n  lst: {config: a.yaml, flag: [--x]}\n  baseline: {config: b.yaml, "
     "baseline: true}\nbudget_steps: 5\n", r"unknown field\(s\) \['flag'\]"),
    # PyYAML keeps the last of two equal keys: the first model would silently vanish
    ("models:\n  lst: {config: a.yaml}\n  lst: {config: c.yaml}\n  baseline: {config: b.yaml, "
     "baseline: true}\nbudget_steps: 5\n", r"key 'lst' appears twice \(lines 2 and 3\)"),
    ("models:\n  ../lst: {config: a.yaml}\n  baseline: {config: b.yaml, baseline: true}\n"
     "budget_steps: 5\n", "model name '../lst' cannot name a run directory"),
    ("models: {lst\n", "is no valid YAML"),
])
def test_mistyped_preset_fields_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudyConfigError, match=message):
        load_preset(path)


def test_study_cli_refuses_a_bad_seed_override_without_a_traceback():
    import study

    with pytest.raises(SystemExit, match=r"study: preset cpu: seeds must be distinct"):
        study.main(["plan", "--preset", "cpu", "--seeds", "1", "1"])
    with pytest.raises(SystemExit, match=r"study: preset cpu: seed -2 is not an integer"):
        study.main(["plan", "--preset", "cpu", "--seeds", "-2"])


def test_anchors_and_merge_keys_load(tmp_path):
    # A model written as another's copy with one field overridden: no repeated key.
    path = tmp_path / "anchored.yaml"
    path.write_text("models:\n"
                    "  lst: &lst {config: tiny_cpu_lst.yaml, flags: [--seq-length, '128']}\n"
                    "  lst_static:\n    <<: *lst\n    flags: [--patching-mode, static]\n"
                    "  baseline: {config: tiny_cpu_baseline.yaml, baseline: true}\n"
                    "budget_steps: 5\n")
    models = {m.name: m for m in load_preset(path).models}
    assert models["lst_static"].config == "tiny_cpu_lst.yaml"
    assert models["lst_static"].flags == ("--patching-mode", "static")
    assert models["lst"].flags == ("--seq-length", "128")
