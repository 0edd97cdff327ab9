"""Parameters `LSTModel` holds in more than one place, and what keeps their copies in step.

Two kinds of copies, both outside what megatron.core's `GPTModel` has:

- The encoder replica. Under pipeline parallelism the last stage keeps a replica of the
  `TokenEncoder` (the `lst_model` docstring says why). It follows megatron's tied-embedding pattern
  (`LanguageModule.setup_embeddings_and_output_layer`): it starts equal to the first stage's copy
  (all-reduced over megatron's embedding group at construction), both copies are marked
  `shared_embedding` so megatron's DDP gives each parameter a gradient bucket of its own (with the
  distributed optimizer, its data-parallel shards then cover the same elements on both stages),
  the replica is marked `shared` (counted once in the gradient norm), and
  `finalize_lst_model_grads` sums the two copies' gradients over the embedding group before the
  optimizer step, as `_allreduce_word_embedding_grads` does. Checkpoints store it once
  (`fix_sharded_state_dict`).
- Tensor-parallel copies. Every tensor-parallel rank holds the local modules whole (all but the
  vocab-parallel embedding and head). They see identical inputs and output gradients on every
  rank, but GPU kernels do not promise bit-identical gradients (Triton autotuning can pick
  different tiles per rank; atomics and flash-attn's backward are not deterministic), so the
  parameters are marked `average_gradients_across_tp_domain` and megatron's
  `finalize_model_grads` averages their gradients over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

GLOBAL_PREFIX = "global_transformer."
"""Parameters of the megatron.core global block: megatron's own rules apply to them."""


def mark_tensor_parallel_copies(model: torch.nn.Module) -> None:
    """Mark the local-module parameters every tensor-parallel rank holds whole so megatron
    averages their gradients over the tensor-parallel group."""
    for name, param in model.named_parameters():
        if not name.startswith(GLOBAL_PREFIX) and not getattr(param, "tensor_model_parallel",
                                                              False):
            param.average_gradients_across_tp_domain = True


def encoder_replica_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The token-encoder parameters held by both the first and the last pipeline stage, on
    either of those stages (empty with PP=1, on middle stages, and for models without one)."""
    holds_replica = (
        hasattr(model, "token_encoder")
        and parallel_state.get_pipeline_model_parallel_world_size() > 1
        and (model.pre_process or model.post_process)
        and parallel_state.is_rank_in_embedding_group()
    )
    return list(model.token_encoder.parameters()) if holds_replica else []


def synchronise_encoder_replica(model: torch.nn.Module) -> None:
    """Collective over the embedding group, at construction: mark both copies of the token
    encoder and start the last stage's replica equal to the first stage's copy (stages are
    seeded differently)."""
    params = encoder_replica_parameters(model)
    if not params:
        return
    with torch.no_grad():
        for param in params:
            # Own DDP bucket: the embedding-group sum then adds reduced data-parallel shards to
            # the same reduced shards (else it mixes in other parameters' partial gradients).
            param.shared_embedding = True
            if not model.pre_process:
                param.zero_()
                # Counted once in the gradient norm (by the first stage), as GPTModel marks
                # its tied output weight; else clipping would depend on the PP layout.
                param.shared = True
        all_reduce_coalesced([param.data for param in params], parallel_state.get_embedding_group())


def finalize_replicated_encoder_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of the encoder copies held by the first and last pipeline stages.

    Call after backward (and after the data-parallel gradient reduction) and before the
    optimizer step, on every rank. Uses `main_grad` when megatron's DDP wrapper provides it.
    """
    params = encoder_replica_parameters(model)
    if not params:
        return
    grads = []
    for param in params:
        if hasattr(param, "main_grad"):
            grads.append(param.main_grad)
        else:
            if param.grad is None:  # every copy must join the collective
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
    all_reduce_coalesced(grads, parallel_state.get_embedding_group())


def all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """Sum `tensors` over `group` in place with one all-reduce per dtype instead of one per
    tensor (a token encoder has tens of parameters; each collective has a fixed latency), as
    megatron's `_allreduce_layernorm_grads` does: flatten, reduce, copy back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same_dtype in by_dtype.values():
        flat = _flatten_dense_tensors(same_dtype)  # [sum of numels]
        torch.distributed.all_reduce(flat, group=group)
        for tensor, reduced in zip(same_dtype, _unflatten_dense_tensors(flat, same_dtype),
                                   strict=True):
            tensor.copy_(reduced)


def finalize_lst_model_grads(model: list, num_tokens: torch.Tensor | None = None,
                             **kwargs) -> None:
    """megatron's `finalize_model_grads` (data-parallel reduction, sequence-parallel norms,
    tensor-parallel averaging of the local modules, division by `num_tokens`) plus the
    encoder-replica sum: a drop-in for `config.finalize_model_grads_func`. `model` is the list
    of DDP-wrapped model chunks; chunks without an encoder replica (e.g. the token baseline) get
    megatron's reduction only."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_attr_wrapped_model

    finalize_model_grads(model, num_tokens=num_tokens, **kwargs)
    for chunk in model:
        finalize_replicated_encoder_grads(
            get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True))


def fix_sharded_state_dict(model: torch.nn.Module, state: dict, prefix: str,
                           sharded_offsets: tuple, metadata: dict) -> dict:
    """Correct two tensors of `MegatronModule.sharded_state_dict(...)`'s `state` in place.

    It treats the tensors of plain `torch.nn.Module` children as replicated across
    tensor-parallel ranks; two of ours are not:
    - `token_encoder.embedding` is vocab-parallel (each TP rank holds a block of rows): taken
      as replicated, only TP rank 0's rows would be saved, under a wrong global shape;
    - under PP>1 the last stage's `token_encoder.*` replica would be a second main copy of
      the same keys, which dist_checkpointing refuses. As `GPTModel` does for a tied output
      layer, the replica gets replica id 1: the first stage's copy is stored once and loading
      fills both.
    """
    if hasattr(model, "token_encoder"):
        state.update(model.token_encoder.embedding.sharded_state_dict(
            prefix=f"{prefix}token_encoder.embedding.", sharded_offsets=sharded_offsets,
            metadata=metadata))
    if encoder_replica_parameters(model) and not model.pre_process:
        for value in nested_values(state):
            if isinstance(value, ShardedTensor) and value.key.startswith(
                    f"{prefix}token_encoder."):
                value.replica_id = (1, *value.replica_id[1:])
    return state
