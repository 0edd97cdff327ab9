"""Worker for test_eval_parallel.py: scores of the same items by the same LST weights under one
parallel layout (`--tp`, `--pp`, `--sequence-parallel off|on|both`); with `--newest-features`
the model has grouped key/value heads and head sizes other than hidden / heads (global and
local) and resets attention and RoPE positions at document starts, and, without pipeline or
sequence parallelism, also reports the greedy continuation of a prompt (`generated`: tokens and
the first steps' logits, with and without the KV caches).

Every layout starts from the same unsharded weights (the model tests' `load_shared_weights`: each
tensor drawn from a generator seeded by its canonical name, then sharded for this rank).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from distributed.harness import report_results  # noqa: E402
from eval_cases import random_records, tiny_lst_config, tokenizer, vocab  # noqa: E402
from lst_parallel_worker import load_shared_weights  # noqa: E402

from megatron_lst.evaluation.generation import SamplingConfig, generate  # noqa: E402
from megatron_lst.evaluation.items import item_from_record  # noqa: E402
from megatron_lst.evaluation.scoring import score_items  # noqa: E402
from megatron_lst.models.config import DocumentMaskingConfig  # noqa: E402
from megatron_lst.models.lst_model import LSTModel  # noqa: E402
from megatron_lst.parallel import destroy_parallel, initialize_parallel  # noqa: E402
from megatron_lst.patching import Patcher, PatchingConfig  # noqa: E402

MODES = ("S->S", "T->S", "S->T", "T->T")
GENERATED_LOGIT_STEPS = 4


def newest_features(config, eos_id: int):
    """Global: 2 key/value groups of 4 heads of 24; local: 1 key/value head for 2 of 12; packed
    documents with attention and RoPE positions reset."""
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=12)
                        for local in (config.encoder, config.decoder))
    return dataclasses.replace(
        config, encoder=encoder, decoder=decoder,
        global_model=dataclasses.replace(config.global_model, num_query_groups=2, kv_channels=24),
        documents=DocumentMaskingConfig(eos_id=eos_id, reset_position_ids=True))


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
    if newest:
        config = newest_features(config, v.eos_id)
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, use_cpu_initialization=True)
    model = LSTModel(config, megatron_config,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     transformer_impl="local", local_attention_backend="sdpa",
                     kernel_backend="torch")
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", choices=("off", "on", "both"), default="off")
    parser.add_argument("--newest-features", action="store_true")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.sequence_parallel]
    report_results(args.results, {("sp" if sp else "no_sp"): layout_scores(args.tp, sp, args.newest_features)
                                  for sp in modes})
    destroy_parallel()


if __name__ == "__main__":
    main()
