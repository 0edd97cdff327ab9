"""Evaluation: likelihood scoring of story-completion items, benchmark importers, generation."""

from megatron_lst.evaluation.bootstrap import bootstrap_ci
from megatron_lst.evaluation.generation import (
    GenerationError,
    GenerationResult,
    SamplingConfig,
    build_prompt,
    generate,
)
from megatron_lst.evaluation.items import (
    EvalItem,
    ItemError,
    Utterance,
    item_from_record,
    load_items,
)
from megatron_lst.evaluation.scoring import (
    MODES,
    ModeScores,
    evaluate_items,
    flatten_results,
    inference_patcher,
    parse_modes,
    score_items,
)

__all__ = [
    "MODES",
    "EvalItem",
    "GenerationError",
    "GenerationResult",
    "ItemError",
    "ModeScores",
    "SamplingConfig",
    "Utterance",
    "bootstrap_ci",
    "build_prompt",
    "evaluate_items",
    "generate",
    "flatten_results",
    "inference_patcher",
    "item_from_record",
    "load_items",
    "parse_modes",
    "score_items",
]
