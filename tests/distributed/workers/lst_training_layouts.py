"""Worker for test_lst_training_layouts.py: a few Adam steps of LST under one parallel layout.

Launched by `distributed.harness.run_distributed` on tp x pp x dp processes with `--tp`, `--pp`
and optionally `--distributed-optimizer`. Every layout starts from the same unsharded weights
(`lst_stage.load_shared_weights`) and trains on the same global batches: each step's batch
is split over data-parallel ranks, then into micro-batches of one row (`--rows-per-micro-batch`
rows). The loss is the token mean over the global batch (`calculate_per_token_loss`, as
`pretrain_lst.py` trains), so the update does not depend on the split. The step is the real one: megatron DDP (fp32 gradient buffers,
optionally the distributed optimizer's sharded buckets), megatron's forward-backward schedule,
`finalize_lst_model_grads`, a megatron Adam optimizer with gradient clipping.

`--perturb-tp-rank R` adds noise to the local-module gradients of tensor-parallel rank R before
they are finalised, as a non-deterministic kernel would; `--unequal-tp-data` gives every
tensor-parallel rank other token ids (same shapes, as a data bug would); the test checks that
the copies still agree afterwards.

`--newest-features` trains the tiny model `with_head_shapes` (grouped key/value heads and head
sizes other than hidden / heads, global and local) and `with_document_resets` (attention and RoPE
positions reset at document starts) on rows packing several documents, `--sequence-parallel` turns sequence parallelism on.

Reports per rank: its coordinates, its micro-batches per step, the (CE sum, token count) of its
micro-batches per step (last stage), and the unsharded canonical weights after the last step.
"""

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))

from distributed.harness import report_results  # noqa: E402
from distributed.lst_stage import (  # noqa: E402
    cpu_stage,
    load_shared_weights,
    with_document_resets,
    with_head_shapes,
)
from model_cases import ragged_batch, tiny_config  # noqa: E402
from packed_document_cases import EOS, packed_batch  # noqa: E402

from megatron_lst.models import LSTModel, finalize_lst_model_grads  # noqa: E402
from megatron_lst.models.canonical_sharding import gather_canonical  # noqa: E402
from megatron_lst.models.loss import masked_token_sum  # noqa: E402
from megatron_lst.parallel import destroy_parallel, initialize_parallel  # noqa: E402

GLOBAL_BATCH = 4
VOCAB_SIZE = 4096
"""Large enough that the embedding fills much of a stage's gradient buffer, as in real models."""
LEARNING_RATE = 1e-2
ADAM_EPS = 1e-6
"""Above the default 1e-8 so that a gradient entry at fp32 rounding level (a sum that cancels,
whose rounding depends on the summation order of the layout) does not get a full-size step."""


def loss_func(loss_mask, per_token_loss):
    loss_sum, num_tokens = masked_token_sum(per_token_loss, loss_mask)
    return loss_sum, num_tokens.int(), {"loss": torch.stack([loss_sum.detach(), num_tokens])}


def forward_step(data_iterator, model):
    batch = next(data_iterator, None)
    if batch is None:  # a middle pipeline stage: its input comes from the previous one
        return model(None, None, None), partial(loss_func, None)
    output = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def packed_rows(step: int, patch_multiple: int) -> dict[str, torch.Tensor]:
    """The step's global batch of rows packing 1-3 documents each, patched static or aligned per
    document, with zero-length patches appended up to a multiple of `patch_multiple`."""
    tokens, labels, patch_lengths = packed_batch("mixed", [2, 3, 1, 2], seed=200 + step)
    patch_lengths = torch.nn.functional.pad(patch_lengths,
                                            (0, -patch_lengths.shape[1] % patch_multiple))
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(tokens.shape),
            "patch_lengths": patch_lengths}


def micro_batches(step: int, dp_rank: int, dp: int, packed: bool = False,
                  patch_multiple: int = 1, rows_per_micro_batch: int = 1
                  ) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's rows of the step's global batch, `rows_per_micro_batch` rows
    per micro-batch."""
    batch = (packed_rows(step, patch_multiple) if packed
             else ragged_batch("static", batch_size=GLOBAL_BATCH, seed=100 + step))
    first, end = dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp
    return [{key: value[row:row + rows_per_micro_batch] for key, value in batch.items()}
            for row in range(first, end, rows_per_micro_batch)]


def unequal_tokens(batch: dict[str, torch.Tensor], tp_rank: int) -> dict[str, torch.Tensor]:
    """The batch with token ids shifted by `tp_rank` (EOS kept, so are the shapes)."""
    tokens = batch["tokens"]
    shifted = torch.where(tokens == EOS, tokens, (tokens + tp_rank) % VOCAB_SIZE)
    return {**batch, "tokens": shifted}


def perturb_local_gradients(model: LSTModel, scale: float) -> None:
    """Noise on the main gradients of the local-module parameters every tensor-parallel rank
    holds whole."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if not name.startswith("global_transformer.") and not getattr(
                param, "tensor_model_parallel", False):
            param.main_grad.add_(scale * torch.randn(param.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--perturb-tp-rank", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None,
                        help="global layers (default: the tiny preset's 2)")
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--last-stage-layers", type=int, default=None)
    parser.add_argument("--newest-features", action="store_true",
                        help="grouped-query heads and kv_channels (global and local) on packed "
                             "documents with attention and positions reset (lst_stage)")
    parser.add_argument("--global-query-groups", type=int, default=2,
                        help="with --newest-features: the global model's key/value heads")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--unequal-tp-data", action="store_true")
    parser.add_argument("--rows-per-micro-batch", type=int, default=1)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = tiny_config(vocab_size=VOCAB_SIZE)
    if args.newest_features:
        config = with_document_resets(with_head_shapes(config, args.global_query_groups), EOS)
    if args.num_layers is not None:
        config = dataclasses.replace(config, global_model=dataclasses.replace(
            config.global_model, num_layers=args.num_layers))
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        num_layers_in_first_pipeline_stage=args.first_stage_layers,
        num_layers_in_last_pipeline_stage=args.last_stage_layers,
        sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=True, params_dtype=torch.float32, calculate_per_token_loss=True,
    )
    model = cpu_stage(config, megatron_config)
    load_shared_weights(model)
    ddp_model = DistributedDataParallel(
        config=megatron_config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.distributed_optimizer),
        module=model,
    )
    finalize = finalize_lst_model_grads
    if args.perturb_tp_rank is not None:
        def finalize(chunks, num_tokens=None, **kwargs):
            if tp_rank == args.perturb_tp_rank:
                perturb_local_gradients(model, 1e-3)
            finalize_lst_model_grads(chunks, num_tokens=num_tokens, **kwargs)
    megatron_config.finalize_model_grads_func = finalize
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LEARNING_RATE, adam_eps=ADAM_EPS, weight_decay=0.01,
                        clip_grad=1.0, params_dtype=torch.float32,
                        use_distributed_optimizer=args.distributed_optimizer),
        [ddp_model],
    )

    losses = []
    for step in range(args.steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = micro_batches(step, dp_rank, dp, args.newest_features,
                                patch_multiple=args.tp if args.sequence_parallel else 1,
                                rows_per_micro_batch=args.rows_per_micro_batch)
        if args.unequal_tp_data:
            batches = [unequal_tokens(batch, tp_rank) for batch in batches]
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[ddp_model],
            num_microbatches=len(batches),
            seq_length=batches[0]["patch_lengths"].shape[1],
            micro_batch_size=args.rows_per_micro_batch,
            forward_only=False,
        )
        succeeded, _, _ = optimizer.step()
        assert succeeded
        if parallel_state.is_pipeline_last_stage():
            losses.append(torch.stack([r["loss"] for r in reduced]).sum(0).tolist())

    weights = gather_canonical(model, {k: p.detach() for k, p in model.named_parameters()})
    record = {
        "tp_rank": tp_rank, "dp_rank": dp_rank,
        "global_layers": len(model.global_transformer.block.layers),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "micro_batches": len(batches),
        "losses": losses,
        "weights": {name: value.tolist() for name, value in weights.items()},
    }
    report_results(args.results, record)
    destroy_parallel()


if __name__ == "__main__":
    main()
