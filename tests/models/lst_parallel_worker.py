"""Worker for test_parallel_equivalence.py: loss and gradients of one LST training step under one
parallel layout, reported as unsharded canonical tensors so layouts can be compared.

Launched by `distributed.harness.run_distributed` with `--tp`, `--pp` and `--sequence-parallel
off|on|both`. Every layout starts from the same unsharded weights (drawn per canonical name from
its own generator, then sharded with the reference importer's rules) and sees the same batch. The
step runs through megatron's forward-backward schedule (pipeline p2p included) on a megatron DDP
wrapper, then `finalize_lst_model_grads` (sequence-parallel norm grads, encoder replica).
"""

import torch
from distributed.harness import report_results
from distributed.lst_stage import (
    cpu_stage,
    layout_parser,
    load_shared_weights,
    mean_loss_forward_step,
    per_sequence_parallel,
    with_document_resets,
    with_head_shapes,
)
from model_cases import ragged_batch, tiny_config
from packed_document_cases import EOS, packed_batch

from megatron_lst.models import finalize_lst_model_grads
from megatron_lst.models.canonical_sharding import gather_canonical
from megatron_lst.parallel import destroy_parallel, initialize_parallel


def shared_batch(tp: int, documents: bool = False) -> dict[str, torch.Tensor]:
    if documents:  # rows packing 3 and 4 documents (mixed static and aligned patching)
        tokens, labels, patch_lengths = packed_batch("mixed", [3, 4], seed=5)
        batch = {"tokens": tokens, "labels": labels, "loss_mask": (tokens != 0).float(),
                 "patch_lengths": patch_lengths}  # no real token is the pad id 0
    else:
        batch = ragged_batch("static", batch_size=2, seed=5)
    # Sequence parallelism splits the patches over TP ranks: pad with zero-length patches.
    extra = -batch["patch_lengths"].shape[1] % tp
    batch["patch_lengths"] = torch.nn.functional.pad(batch["patch_lengths"], (0, extra))
    return batch


def training_step(sequence_parallel: bool, tp: int, head_shapes: bool = False,
                  documents: bool = False) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = with_head_shapes(tiny_config()) if head_shapes else tiny_config()
    if documents:  # packed rows, attention and positions reset at every document
        config = with_document_resets(config, EOS)
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    model = cpu_stage(config, megatron_config)
    load_shared_weights(model)
    ddp_model = DistributedDataParallel(
        config=megatron_config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    megatron_config.finalize_model_grads_func = finalize_lst_model_grads
    ddp_model.zero_grad_buffer()
    batch = shared_batch(tp, documents)
    reduced = get_forward_backward_func()(
        forward_step_func=mean_loss_forward_step,
        data_iterator=iter([batch]),
        model=[ddp_model],
        num_microbatches=1,
        seq_length=batch["patch_lengths"].shape[1],
        micro_batch_size=batch["tokens"].shape[0],
        forward_only=False,
    )
    grads = {key: param.main_grad for key, param in model.named_parameters()}
    record = {"grads": {k: v.tolist() for k, v in gather_canonical(model, grads).items()}}
    if parallel_state.is_pipeline_last_stage():
        record["loss"] = reduced[0]["loss"].item()
    return record


def main() -> None:
    parser = layout_parser(__doc__)
    parser.add_argument("--head-shapes", action="store_true",
                        help="the tiny model with other head shapes (lst_stage.with_head_shapes)")
    parser.add_argument("--documents", action="store_true",
                        help="rows packing several documents, with attention and RoPE positions "
                             "reset at each (LSTConfig.documents)")
    args = parser.parse_args()

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    report_results(args.results, per_sequence_parallel(
        args.sequence_parallel,
        lambda sp: training_step(sp, args.tp, args.head_shapes, args.documents)))
    destroy_parallel()


if __name__ == "__main__":
    main()
