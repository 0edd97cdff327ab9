"""Worker for test_eval_parallel.py: scores of the same items by the same LST weights under one
parallel layout (`--tp`, `--pp`, `--sequence-parallel off|on|both`); with `--newest-features`
the model has grouped key/value heads and head sizes other than hidden / heads (global and
local) and resets attention and RoPE positions at document starts, and, without pipeline or
sequence parallelism, also reports the greedy continuation of a prompt (`generated`: tokens and
the first steps' logits, with and without the KV caches).

Every layout starts from the same unsharded weights (`lst_stage.load_shared_weights`: each
tensor drawn from a generator seeded by its canonical name, then sharded for this rank).
"""

import numpy as np
from distributed.harness import report_results
from distributed.lst_stage import (
    cpu_stage,
    layout_parser,
    load_shared_weights,
    per_sequence_parallel,
    with_document_resets,
    with_head_shapes,
)
from eval_cases import random_records, tiny_lst_config, tokenizer, vocab

from megatron_lst.evaluation.generation import SamplingConfig, generate
from megatron_lst.evaluation.items import item_from_record
from megatron_lst.evaluation.scoring import score_items
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.patching import Patcher, PatchingConfig

MODES = ("S->S", "T->S", "S->T", "T->T")
GENERATED_LOGIT_STEPS = 4


def generated(model, patcher) -> dict:
    """Greedy continuation of a speech prompt, with and without the caches."""
    v = vocab()
    prompt = [v.bos_id, v.speech_marker, *v.units_to_ids(np.array([3, 3, 7, 1, 0, 9]))]
    record = {}
    for name, use_cache in (("cached", True), ("full", False)):
        result = generate(model, np.array(prompt), v, patcher.config,
                          SamplingConfig(max_new_tokens=12), use_cache=use_cache, keep_logits=True)
        record[name] = {"tokens": result.tokens.tolist(), "logits": [
            logits.tolist() for logits in result.step_logits[:GENERATED_LOGIT_STEPS]]}
    return record


def layout_scores(tp: int, sequence_parallel: bool, newest: bool = False) -> dict:
    from megatron.core import parallel_state

    v = vocab()
    config = tiny_lst_config(v.size)
    if newest:  # global: 2 key/value groups of 4 heads of 24; local: 1 for 2 heads of 12
        config = with_document_resets(with_head_shapes(config), v.eos_id)
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, use_cpu_initialization=True)
    model = cpu_stage(config, megatron_config)
    load_shared_weights(model)
    model.eval()
    items = [item_from_record(r, tokenizer(), v, f"worker:{i}")
             for i, r in enumerate(random_records(11, 6))]
    patcher = Patcher(PatchingConfig("static", patch_size=3))
    record = {mode: score_items([model], items, v, patcher, mode, batch_size=4).logprob.tolist()
              for mode in MODES}
    if newest and not sequence_parallel and parallel_state.get_pipeline_model_parallel_world_size() == 1:
        record["generated"] = generated(model, patcher)
    return record


def main() -> None:
    parser = layout_parser(__doc__)
    parser.add_argument("--newest-features", action="store_true")
    args = parser.parse_args()

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    report_results(args.results, per_sequence_parallel(
        args.sequence_parallel, lambda sp: layout_scores(args.tp, sp, args.newest_features)))
    destroy_parallel()


if __name__ == "__main__":
    main()
