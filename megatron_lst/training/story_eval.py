"""Story-completion accuracy during training (`--eval-data`, every `--eval-interval`).

The items (docs/evaluation.md#the-item-format) are read and tokenized once; at each evaluation every rank
scores them with `megatron_lst.evaluation.evaluate_items`, patched as at inference (curriculum
and mixed models static), in S->S and T->T when the items carry speech, T->T when none does (a
file mixing the two is refused, naming its first text-only item).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron_lst.evaluation.items import EvalItem, ItemError, load_items
from megatron_lst.evaluation.scoring import (
    check_items_for_mode,
    evaluate_items,
    inference_patcher,
)
from megatron_lst.patching import Patcher
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer
from megatron_lst.tokenizer.vocab import JointVocab

from .data_provider import patching_config_from_args

BOOTSTRAP_RESAMPLES = 200  # enough for a logged interval; lst-eval defaults to 1000


@dataclass
class StoryCompletionEval:
    items: list[EvalItem]
    patcher: Patcher
    modes: tuple[str, ...]
    batch_size: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab: JointVocab) -> StoryCompletionEval | None:
        """None without `--eval-data` (validated: it comes with `--tokenizer-model`)."""
        if args.eval_data is None:
            return None
        items = load_items(args.eval_data, load_text_tokenizer(args.tokenizer_model), vocab)
        spoken = [item.context.has_speech for item in items]  # an item's parts agree (load_items)
        if any(spoken) and not all(spoken):  # S->S went unscored for the whole run, silently
            text_only = items[spoken.index(False)]
            raise ItemError(f"{text_only.describe()} has no units but other items have them; "
                            f"training scores speech items S->S and T->T, text-only ones "
                            f"T->T: give every item units, or none")
        modes = ("S->S", "T->T") if all(spoken) else ("T->T",)
        patching = patching_config_from_args(args)
        for mode in modes:  # at the start, not at the first evaluation
            check_items_for_mode(items, mode, patching)
        return cls(items, inference_patcher(patching), modes, args.micro_batch_size)

    def run(self, model_chunks: list[torch.nn.Module], vocab: JointVocab) -> dict[str, dict]:
        """Per mode: accuracy with its 95% bootstrap interval (collective: every rank calls)."""
        return evaluate_items(model_chunks, self.items, vocab, self.patcher, self.modes,
                              self.batch_size, bootstrap_resamples=BOOTSTRAP_RESAMPLES)


def format_accuracy(iteration: int, results: dict[str, dict]) -> str:
    """`story completion at iteration 100 | S->S accuracy: 0.5400 [0.4400, 0.6400] | ...`."""
    parts = [f"{mode} accuracy: {r['accuracy']:.4f} [{r['accuracy_ci_low']:.4f}, "
             f"{r['accuracy_ci_high']:.4f}]" for mode, r in results.items()]
    return f"story completion at iteration {iteration} | " + " | ".join(parts)
