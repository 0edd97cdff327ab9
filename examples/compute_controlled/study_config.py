"""What a compute-controlled study runs: its preset (YAML), the models, and the runs it plans.

A preset file (see presets/*.yaml) names the demo corpus settings, the models (an lst-train YAML
plus flags each), the baseline's step budget, the control modes, the seeds and the evaluation.
`plan_runs` turns it into runs: one per (model, planned steps, seed). Runs with the same steps are
shared between controls (under compute and data control the baseline, the budget's reference,
trains the same steps), so the study trains each distinct run once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "examples" / "configs"
PRESETS = Path(__file__).resolve().parent / "presets"
CONTROLS = ("compute", "flops", "data")
MODES = ("S->S", "T->T", "S->T", "T->S")
EVAL_SETS = ("storycloze", "topic")
MAX_SEED = 2**31 - 1  # lst-train's --seed range
# A model name names its runs' directories (<model>-<N>steps-seed<S>): no path separators.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=]*")


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
        for name in names:
            if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
                raise StudyConfigError(f"preset {self.name}: model name {name!r} cannot name a "
                                       f"run directory; use letters, digits, '_', '.', '+', '='")
        for what, value, low in (("budget_steps", self.budget_steps, 1),
                                 ("eval_items", self.eval_items, 1)):
            if not _is_int(value) or value < low:
                raise StudyConfigError(f"preset {self.name}: {what} must be an integer >= {low}, "
                                       f"got {value!r}")
        for what, value in (("text_weight", self.text_weight),
                            ("speech_weight", self.speech_weight),
                            ("tokens_per_patch", self.tokens_per_patch)):
            if not _is_number(value) or not value > 0:
                raise StudyConfigError(f"preset {self.name}: {what} must be a number > 0, got "
                                       f"{value!r}")
        for seed in self.seeds:
            if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
                raise StudyConfigError(f"preset {self.name}: seed {seed!r} is not an integer in "
                                       f"[0, {MAX_SEED}] (lst-train's --seed)")
        baselines = [m.name for m in self.models if m.is_baseline]
        if len(baselines) != 1 or len(self.models) < 2:
            raise StudyConfigError(f"preset {self.name}: needs exactly one baseline model and at "
                                   f"least one LST model, got baselines {baselines}")
        self.corpus_config()  # refuses fields DemoCorpusConfig does not take
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyConfigError(f"preset {self.name}: seeds must be distinct and non-empty, "
                                   f"got {self.seeds}")
        for what, chosen, known in (("control", self.controls, CONTROLS),
                                    ("mode", self.modes, MODES),
                                    ("evaluation set", self.eval_sets, EVAL_SETS)):
            if not chosen or len(set(chosen)) != len(chosen):
                raise StudyConfigError(f"preset {self.name}: the {what}s must be distinct and "
                                       f"non-empty, got {chosen}")
            for value in chosen:
                if value not in known:
                    raise StudyConfigError(f"preset {self.name}: unknown {what} {value!r}; "
                                           f"choose from {known}")

    def corpus_config(self):
        """The study's `DemoCorpusConfig` (YAML lists as tuples)."""
        from megatron_lst.demo_corpus.build import DemoCorpusConfig

        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.corpus.items()}
        try:
            return DemoCorpusConfig(**fields)
        except (TypeError, ValueError) as error:
            raise StudyConfigError(f"preset {self.name}: corpus: {error}; the fields are "
                                   f"DemoCorpusConfig's (megatron_lst/demo_corpus/build.py)") from None

    @property
    def baseline(self) -> ModelSpec:
        return next(m for m in self.models if m.is_baseline)

    @property
    def lst_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if not m.is_baseline)

    def replace(self, **changes) -> StudyPreset:
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last, so a
    second model of one name would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be overridden here
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise StudyConfigError(f"key {key!r} appears twice (lines {seen[key]} and "
                                       f"{line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _list_field(raw: dict, key: str, path: Path) -> tuple:
    value = raw.pop(key)
    if not isinstance(value, list):
        raise StudyConfigError(f"{path}: {key} must be a YAML list, got {value!r}")
    return tuple(value)


def _model_spec(name, spec, path: Path) -> ModelSpec:
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), str):
        raise StudyConfigError(f"{path}: model {name!r} must be a mapping with a `config` (an "
                               f"lst-train YAML), got {spec!r}")
    unknown = set(spec) - {"config", "flags", "baseline"}
    if unknown:
        raise StudyConfigError(f"{path}: model {name!r} has unknown field(s) {sorted(unknown)}; "
                               f"a model has config, flags and baseline")
    flags = spec.get("flags", [])
    if not isinstance(flags, list):
        raise StudyConfigError(f"{path}: model {name!r}: flags must be a YAML list of "
                               f"lst-train arguments, got {flags!r}")
    baseline = spec.get("baseline", False)
    if not isinstance(baseline, bool):
        raise StudyConfigError(f"{path}: model {name!r}: baseline must be true or false, got "
                               f"{baseline!r}")
    return ModelSpec(name=name, config=spec["config"], flags=tuple(str(f) for f in flags),
                     is_baseline=baseline)


def load_preset(path_or_name: str | Path) -> StudyPreset:
    """A preset from a YAML file, or by name from presets/ ("cpu" -> presets/cpu.yaml)."""
    path = Path(path_or_name)
    if not path.suffix:
        path = PRESETS / f"{path_or_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise StudyConfigError(f"no study preset {path}; give a YAML file or one of {known}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, StudyConfigError, UnicodeDecodeError) as error:
        raise StudyConfigError(f"{path} is no valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path} holds no mapping of preset fields")
    raw = dict(raw)
    if not isinstance(raw.get("models"), dict):
        raise StudyConfigError(f"{path}: `models` must be a mapping of model names to their "
                               f"config and flags; see {PRESETS / 'cpu.yaml'}")
    if not isinstance(raw.get("corpus", {}), dict):
        raise StudyConfigError(f"{path}: `corpus` must be a mapping of DemoCorpusConfig fields")
    models = tuple(_model_spec(name, spec, path) for name, spec in raw.pop("models").items())
    tuples = {k: _list_field(raw, k, path) for k in ("seeds", "controls", "eval_sets", "modes",
                                                      "train_flags") if k in raw}
    if "train_flags" in tuples:
        tuples["train_flags"] = tuple(str(f) for f in tuples["train_flags"])
    try:
        return StudyPreset(name=str(raw.pop("name", path.stem)), models=models, **tuples, **raw)
    except TypeError as error:
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
