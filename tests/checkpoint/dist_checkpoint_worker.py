"""Worker for test_dist_checkpoint.py: an `LSTModel` under one TP/PP layout that either loads a
portable checkpoint and saves it as an `lst-train` dist checkpoint (`--save DIR`), or loads an
`lst-train` dist checkpoint through the training loader (`--load DIR`). Either way it reports the
logits of `verify.fixed_batch`, computed through megatron's pipeline schedule.

Launched by `distributed.harness.run_distributed` with `--tp`, `--pp`, `--portable DIR` (the
model config, and the weights when saving) and one of `--save` / `--load`.
"""

import argparse

import torch
from distributed.harness import report_results
from distributed.lst_stage import cpu_stage

from checkpoint.layout_worker import start_layout_worker
from megatron_lst.checkpoint.dist import training_args_for
from megatron_lst.checkpoint.model_state import load_full_state_dict
from megatron_lst.checkpoint.verify import fixed_batch
from megatron_lst.models.lst_model import LSTModel
from megatron_lst.parallel import destroy_parallel
from megatron_lst.training.checkpoint_load import load_checkpoint
from megatron_lst.training.checkpoint_save import save_checkpoint


def build_stage(config, tp: int, pp: int) -> LSTModel:
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, params_dtype=torch.float32)
    return cpu_stage(config, megatron_config).eval()


def pipeline_logits(model: LSTModel, batch: dict) -> torch.Tensor | None:
    """Logits `[B, N, V]` on the last stage (None elsewhere), forward only."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        output = model(data["tokens"], data["patch_lengths"])
        return output, lambda logits: (logits.sum() * 0, {"logits": logits})

    with torch.no_grad():
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
            num_microbatches=1, seq_length=batch["patch_lengths"].shape[1],
            micro_batch_size=batch["tokens"].shape[0], forward_only=True)
    return reduced[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def main() -> None:
    args, portable = start_layout_worker(__doc__)
    model = build_stage(portable.config, args.tp, args.pp)
    if args.save:
        load_full_state_dict(model, portable.state, args.portable)
        save_checkpoint(7, [model], None, None,
                        argparse.Namespace(**training_args_for(portable.config)),
                        {"consumed_samples": 0}, args.save, portable.vocab)
    else:
        loaded = load_checkpoint(args.load, [model], None, None,
                                 argparse.Namespace(no_load_rng=True), portable.vocab)
        assert loaded is not None, f"no checkpoint under {args.load}"
    logits = pipeline_logits(model, fixed_batch(portable.config))
    report_results(args.results, {"logits": None if logits is None else logits.tolist()})
    destroy_parallel()


if __name__ == "__main__":
    main()
