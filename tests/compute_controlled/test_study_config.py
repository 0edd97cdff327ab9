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
