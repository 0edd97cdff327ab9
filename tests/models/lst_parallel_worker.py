"""Worker for test_parallel_equivalence.py: loss and gradients of one LST training step under one
parallel layout, reported as unsharded canonical tensors so layouts can be compared.

Launched by `distributed.harness.run_distributed` with `--tp`, `--pp` and `--sequence-parallel
off|on|both`. Every layout starts from the same unsharded weights (drawn per canonical name from
its own generator, then sharded with the reference importer's rules) and sees the same batch. The
step runs through megatron's forward-backward schedule (pipeline p2p included) on a megatron DDP
wrapper, then `finalize_lst_model_grads` (sequence-parallel norm grads, encoder replica).
"""

import argparse
import dataclasses
import zlib
from functools import partial

import torch
from distributed.harness import report_results
from model_cases import ragged_batch, tiny_config
from packed_document_cases import EOS, packed_batch

from megatron_lst.models import LSTModel, finalize_lst_model_grads
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.models.loss import masked_token_mean
from megatron_lst.models.reference_import import canonical_name, gather_canonical, shard_tensor
from megatron_lst.parallel import destroy_parallel, initialize_parallel


def full_shape(local_shape: torch.Size, partition: str, tp: int) -> tuple[int, ...]:
    if partition in ("rows", "gated_rows"):
        return (local_shape[0] * tp, *local_shape[1:])
    if partition == "columns":
        return (local_shape[0], local_shape[1] * tp)
    return tuple(local_shape)


def load_shared_weights(model) -> None:
    """Same unsharded weights in every layout: each drawn from a generator seeded by its name."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    state = {}
    for key, local in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        name, partition = canonical_name(model, key)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        full = torch.randn(full_shape(local.shape, partition, tp), generator=generator)
        full = 1.0 + 0.1 * full if full.dim() == 1 else 0.2 * full / full.shape[-1] ** 0.5
        state[key] = shard_tensor(full, partition, tp_rank, tp)
    model.load_state_dict(state, strict=False)


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


def loss_func(loss_mask, per_token_loss):
    loss = masked_token_mean(per_token_loss, loss_mask)
    return loss, {"loss": loss.detach()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def head_shapes_config():
    """The tiny model with grouped key/value heads and head sizes other than hidden / heads in
    the global model (2 groups of 4 heads of 24) and both local models (1 group of 2 heads of 12)."""
    config = tiny_config()
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=12)
                        for local in (config.encoder, config.decoder))
    return dataclasses.replace(config, encoder=encoder, decoder=decoder,
                               global_model=dataclasses.replace(
                                   config.global_model, num_query_groups=2, kv_channels=24))


def training_step(sequence_parallel: bool, tp: int, head_shapes: bool = False,
                  documents: bool = False) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = head_shapes_config() if head_shapes else tiny_config()
    if documents:  # packed rows, attention and positions reset at every document
        config = dataclasses.replace(config, documents=DocumentMaskingConfig(
            eos_id=EOS, reset_position_ids=True))
    megatron_config = config.transformer_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    model = LSTModel(config, megatron_config,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     transformer_impl="local", local_attention_backend="sdpa", kernel_backend="torch")
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
        forward_step_func=forward_step,
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", choices=("off", "on", "both"), default="off")
    parser.add_argument("--results", required=True)
    parser.add_argument("--head-shapes", action="store_true",
                        help="the model of head_shapes_config instead of the tiny preset")
    parser.add_argument("--documents", action="store_true",
                        help="rows packing several documents, with attention and RoPE positions "
                             "reset at each (LSTConfig.documents)")
    args = parser.parse_args()

    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.sequence_parallel]
    record = {("sp" if sp else "no_sp"): training_step(sp, args.tp, args.head_shapes, args.documents)
              for sp in modes}
    report_results(args.results, record)
    destroy_parallel()


if __name__ == "__main__":
    main()
