"""Worker for test_eval_parallel.py: scores of the same items by the same LST weights under one
parallel layout (`--tp`, `--pp`, `--sequence-parallel off|on|both`).

Every layout starts from the same unsharded weights (the model tests' `load_shared_weights`: each
tensor drawn from a generator seeded by its canonical name, then sharded for this rank).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from distributed.harness import report_results  # noqa: E402
from eval_cases import random_records, tiny_lst_config, tokenizer, vocab  # noqa: E402
from lst_parallel_worker import load_shared_weights  # noqa: E402

from megatron_lst.evaluation.items import item_from_record  # noqa: E402
from megatron_lst.evaluation.scoring import score_items  # noqa: E402
from megatron_lst.models.lst_model import LSTModel  # noqa: E402
from megatron_lst.parallel import destroy_parallel, initialize_parallel  # noqa: E402
from megatron_lst.patching import Patcher, PatchingConfig  # noqa: E402

MODES = ("S->S", "T->S", "S->T", "T->T")


def layout_scores(tp: int, sequence_parallel: bool) -> dict:
    from megatron.core import parallel_state

    v = vocab()
    config = tiny_lst_config(v.size)
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
    return {mode: score_items([model], items, v, patcher, mode, batch_size=4).logprob.tolist()
            for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", choices=("off", "on", "both"), default="off")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.sequence_parallel]
    report_results(args.results, {("sp" if sp else "no_sp"): layout_scores(args.tp, sp)
                                  for sp in modes})
    destroy_parallel()


if __name__ == "__main__":
    main()
