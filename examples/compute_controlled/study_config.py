"""What a compute-controlled study runs: its preset (YAML), the models, and the runs it plans.

A preset file (see presets/*.yaml) names the demo corpus settings, the models (an lst-train YAML
plus flags each), the baseline's step budget, the control modes, the seeds and the evaluation.
`plan_runs` turns it into runs: one per (model, planned steps, seed). Runs with the same steps are
shared between controls (under compute and data control the baseline, the budget's reference,
trains the same steps), so the study trains each distinct run once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "examples" / "configs"
PRESETS = Path(__file__).resolve().parent / "presets"
CONTROLS = ("compute", "flops", "data")
MODES = ("S->S", "T->T", "S->T", "T->S")
EVAL_SETS = ("storycloze", "topic")


class StudyConfigError(ValueError):
    """A preset that cannot describe a study."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: an lst-train YAML (relative to examples/configs) and extra flags."""

    name: str
    config: str
    flags: tuple[str, ...] = ()
    is_baseline: bool = False

    @property
    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else CONFIGS / path


@dataclass(frozen=True)
class StudyPreset:
    """A study: the corpus, the models, the budget, the controls, the seeds, the evaluation."""

    name: str
    models: tuple[ModelSpec, ...]
    budget_steps: int
    """Training steps of the baseline (the budget's reference model)."""
    seeds: tuple[int, ...] = (1, 2, 3)
    controls: tuple[str, ...] = CONTROLS
    corpus: dict = field(default_factory=dict)
    """`DemoCorpusConfig` fields; unset ones keep the demo's defaults."""
    text_weight: float = 0.67
    speech_weight: float = 0.33
    tokens_per_patch: float = 1.3
    """Mean real (unpadded) input tokens per LST patch on the study's rows: the data plan's
    exchange rate (the FLOP plan counts the padded row the model computes, --max-tokens per
    --seq-length patches). The report prints the value each LST run measured."""
    eval_items: int = 300
    eval_sets: tuple[str, ...] = EVAL_SETS
    modes: tuple[str, ...] = MODES
    train_flags: tuple[str, ...] = ()
    """lst-train flags given to every run (e.g. --eval-iters)."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise StudyConfigError(f"preset {self.name}: model names repeat: {names}")
        baselines = [m.name for m in self.models if m.is_baseline]
        if len(baselines) != 1 or len(self.models) < 2:
            raise StudyConfigError(f"preset {self.name}: needs exactly one baseline model and at "
                                   f"least one LST model, got baselines {baselines}")
        if self.budget_steps < 1:
            raise StudyConfigError(f"preset {self.name}: budget_steps must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyConfigError(f"preset {self.name}: seeds must be distinct and non-empty, "
                                   f"got {self.seeds}")
        for what, chosen, known in (("control", self.controls, CONTROLS),
                                    ("mode", self.modes, MODES),
                                    ("evaluation set", self.eval_sets, EVAL_SETS)):
            for value in chosen:
                if value not in known:
                    raise StudyConfigError(f"preset {self.name}: unknown {what} {value!r}; "
                                           f"choose from {known}")

    @property
    def baseline(self) -> ModelSpec:
        return next(m for m in self.models if m.is_baseline)

    @property
    def lst_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if not m.is_baseline)

    def replace(self, **changes) -> StudyPreset:
        return dataclasses.replace(self, **changes)


def load_preset(path_or_name: str | Path) -> StudyPreset:
    """A preset from a YAML file, or by name from presets/ ("cpu" -> presets/cpu.yaml)."""
    path = Path(path_or_name)
    if not path.suffix:
        path = PRESETS / f"{path_or_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise StudyConfigError(f"no study preset {path}; give a YAML file or one of {known}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path} holds no mapping of preset fields")
    raw = dict(raw)
    try:
        models = tuple(ModelSpec(name=name, config=spec["config"],
                                 flags=tuple(str(f) for f in spec.get("flags", ())),
                                 is_baseline=bool(spec.get("baseline", False)))
                       for name, spec in raw.pop("models").items())
        tuples = {k: tuple(raw.pop(k)) for k in ("seeds", "controls", "eval_sets", "modes",
                                                 "train_flags") if k in raw}
        return StudyPreset(name=raw.pop("name", path.stem), models=models, **tuples, **raw)
    except (KeyError, TypeError) as error:
        raise StudyConfigError(f"{path}: not a study preset ({error}); see "
                               f"{PRESETS / 'cpu.yaml'} for the fields") from None


@dataclass(frozen=True)
class Run:
    """One training run: a model trained for `steps` steps from seed `seed`."""

    model: str
    steps: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.steps}steps-seed{self.seed}"


def plan_runs(preset: StudyPreset, steps: dict[str, dict[str, int]]) -> list[Run]:
    """The distinct runs of the study in training order, `steps[control][model]` being the plan:
    control by control (in the preset's order), so a study stopped early has every seed of its
    first controls."""
    runs: list[Run] = []
    for control in preset.controls:
        for seed in preset.seeds:
            for model in preset.models:
                run = Run(model.name, steps[control][model.name], seed)
                if run not in runs:
                    runs.append(run)
    return runs
