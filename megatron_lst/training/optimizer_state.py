"""The optimizer's state in a checkpoint: megatron.core's sharded optimizer state dict, with two
fixes for megatron-core 0.16's distributed optimizer.

Saved in model space (`SHARDED_STATE_METADATA`), so it loads under any tensor/pipeline/data-
parallel layout. The fixes: the offsets of each parameter's state in the distributed optimizer's
buffers leave out the padding between gradient buckets (`_unpadded_param_index_maps`), and on
megatron.core's torch.optim fallback (neither Apex nor Transformer Engine installed) Adam's state
is created before loading and its step loaded per parameter (`_torch_adam_distributed_optimizers`).

Every parameter's state exists before a save or a load (`_initialise_state`): an optimizer that
has not stepped yet (fp16 skips its first steps while the loss scale comes down from 2^32) has
none, and megatron.core either failed to save it (the distributed optimizer on torch's Adam: an
assertion) or saved a checkpoint without the moments that loading asks for (a KeyError on
resume); SGD, for which megatron.core has no state initialiser, could not be loaded at all.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from megatron_lst.checkpoint.errors import CheckpointError

# How megatron.core lays out optimizer state: `fully_reshardable` stores each state tensor in model
# space (the distributed optimizer gathers its shards), so it loads under any TP/PP/DP layout
# (with `_unpadded_param_index_maps` around it, see there);
# `chained_optim_avoid_prefix` keeps the keys of a one-optimizer chain free of a chain index.
SHARDED_STATE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                          "chained_optim_avoid_prefix": True}


def sharded_state_to_save(optimizer: Any, model_state: dict[str, Any]) -> dict[str, Any]:
    """The sharded state dict of `optimizer` to save next to `model_state` (the model's)."""
    _initialise_state(optimizer)
    with _unpadded_param_index_maps(optimizer):
        return optimizer.sharded_state_dict(model_state, metadata=SHARDED_STATE_METADATA)


def sharded_state_to_load(optimizer: Any, model_state: dict[str, Any],
                          metadata: dict[str, Any]) -> dict[str, Any]:
    """The sharded state dict that `dist_checkpointing.load` fills with the state of `optimizer`
    saved under `metadata` (the checkpoint's `sharded_state_metadata`). Raises CheckpointError
    for distributed-optimizer state that the torch.optim fallback cannot load."""
    _torch_adam_distributed_optimizers(optimizer)  # raises for what the fallback cannot load
    _initialise_state(optimizer)
    with _unpadded_param_index_maps(optimizer), _state_initialisers_present(optimizer):
        return optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)


# The learning-rate bounds megatron.core keeps in each parameter group (`max_lr`, `min_lr`: from
# --lr and --min-lr when the optimizer is built), which its scheduler reads instead of its own.
_SCHEDULE_KEYS = ("max_lr", "min_lr")


def load_state(optimizer: Any, state: dict[str, Any], keep_run_schedule: bool = False) -> None:
    """Load into `optimizer` the `state` that `dist_checkpointing.load` filled in (see
    `sharded_state_to_load`). The parameter groups come back with the checkpoint's `max_lr` and
    `min_lr`; `keep_run_schedule` (--override-opt_param-scheduler) keeps this run's instead, so
    that the scheduler follows this run's --lr and --min-lr (it used to follow the new decay
    and warm-up but the checkpoint's learning rates)."""
    run_schedule = [{key: group[key] for key in _SCHEDULE_KEYS if key in group}
                    for group in optimizer.param_groups]
    _load_state(optimizer, state)
    if keep_run_schedule:
        for group, values in zip(optimizer.param_groups, run_schedule, strict=True):
            group.update(values)


def _load_state(optimizer: Any, state: dict[str, Any]) -> None:
    _adopt_saved_schedule(optimizer, state)
    torch_adam_optimizers = _torch_adam_distributed_optimizers(optimizer)
    with _unpadded_param_index_maps(optimizer):
        if torch_adam_optimizers:
            _load_torch_adam_distributed_state(torch_adam_optimizers[0], state)
        else:
            _add_step_zero(optimizer, state)
            optimizer.load_state_dict(state)


@contextlib.contextmanager
def _unpadded_param_index_maps(optimizer: Any):
    """Within the block, the distributed optimizer's buffers map each parameter to its offsets
    in the buffer without the padding between gradient buckets.

    megatron-core's `fully_reshardable` optimizer state (0.16.1, still in 0.19.2) gathers each
    buffer's shards into one tensor per buffer that leaves that padding out, then
    slices it, on save and on load, at the padded offsets of `buffer.param_index_map`: with more
    than one bucket (the encoder replica's own buckets under pipeline parallelism, the buckets of
    `--overlap-grad-reduce`) every parameter after the first padded bucket end gets another
    parameter's state. The state dict's keys are model-space names, so the corrected offsets
    also load checkpoints saved under other layouts. A no-op for other optimizers.
    """
    buffers = [buffer for inner in _inner_optimizers(optimizer)
               for buffer in getattr(inner, "buffers", [])]
    saved = [buffer.param_index_map for buffer in buffers]
    try:
        for buffer in buffers:
            buffer.param_index_map = _unpadded_index_map(buffer)
        yield
    finally:
        for buffer, index_map in zip(buffers, saved, strict=True):
            buffer.param_index_map = index_map


def _unpadded_index_map(buffer: Any) -> dict:
    """`buffer.param_index_map` with the padding after each bucket's end taken out."""
    removed_before = []  # per bucket: padding elements of the buckets before it
    removed = 0
    for (start, end), bucket in zip(buffer.bucket_indices, buffer.buckets, strict=True):
        removed_before.append(removed)
        removed += (end - start) - bucket.numel_unpadded
    return {param: (start - removed_before[bucket_id], end - removed_before[bucket_id], bucket_id)
            for param, (start, end, bucket_id) in buffer.param_index_map.items()}


def _torch_adam_distributed_optimizers(optimizer: Any) -> list[Any]:
    """The DistributedOptimizer in `optimizer` if it runs megatron.core's torch.optim fallback
    (neither Apex nor Transformer Engine installed: `torch.optim.AdamW` on the shards), else [].

    megatron-core 0.16's DistributedOptimizer cannot load its state on that fallback by itself
    (Apex's and TE's fused Adam keep the step in the param groups; torch's Adam keeps one per
    parameter): `sharded_state_dict(is_loading=True)` reads the step from per-parameter state
    that a fresh optimizer has not created yet (it asserts), and `load_state_dict` hands every
    parameter one shared `step` tensor, then fails copying the loaded shards over a state that
    has a step the checkpoint does not carry. `_initialise_torch_adam_state` and
    `_load_torch_adam_distributed_state` do those two parts correctly.
    """
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return []
    inners = _inner_optimizers(optimizer)
    found = [inner for inner in inners
             if isinstance(inner, distrib_optimizer.DistributedOptimizer)]
    if not found:
        return []
    if len(inners) > 1 or not isinstance(found[0].optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise CheckpointError(
            "loading distributed-optimizer state without Apex or Transformer Engine is supported "
            f"for one Adam optimizer, not {[type(i.optimizer).__name__ for i in inners]}; install "
            "Apex or Transformer Engine, run without --use-distributed-optimizer, or pass "
            "--no-load-optim to load the weights only")
    return found


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The megatron.core optimizers (each wrapping one torch optimizer) of `optimizer`."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _initialise_state(optimizer: Any) -> None:
    """Give every parameter without state the state its optimizer's first step would create,
    without stepping (a step would apply weight decay): the next step then computes what it
    would have. torch's Adam: zero moments and step 0; torch's SGD with momentum: a zero momentum
    buffer (its first step sets the buffer to the gradient: 0 * momentum + gradient is the same);
    other optimizers (Apex's, Transformer Engine's): megatron.core's initialiser. Parameters
    that have state keep it."""
    for inner in _inner_optimizers(optimizer):
        torch_optimizer = inner.optimizer
        if isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW):
            _initialise_torch_adam_state(torch_optimizer)
        elif isinstance(torch_optimizer, torch.optim.SGD):
            _initialise_torch_sgd_state(torch_optimizer)
        elif torch_optimizer is not None and inner.init_state_fn is not None:
            inner.init_state_fn(torch_optimizer, inner.config)


def _initialise_torch_adam_state(inner: torch.optim.Optimizer) -> None:
    """The per-parameter state torch's Adam creates lazily at its first step (zeros, step 0)."""
    for group in inner.param_groups:
        for param in group["params"]:
            if param.numel() == 0 or inner.state.get(param):
                continue
            # Where torch's Adam keeps the step: on the parameter's device when fused or
            # capturable, else a CPU scalar.
            on_device = group.get("fused") or group.get("capturable")
            state = {"step": torch.zeros((), dtype=torch.get_default_dtype(),
                                         device=param.device if on_device else None),
                     "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)
            inner.state[param] = state


def _initialise_torch_sgd_state(inner: torch.optim.Optimizer) -> None:
    """A zero momentum buffer per parameter, where SGD keeps one (momentum > 0)."""
    for group in inner.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            if param.numel() and inner.state.get(param, {}).get("momentum_buffer") is None:
                inner.state[param]["momentum_buffer"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format)


@contextlib.contextmanager
def _state_initialisers_present(optimizer: Any):
    """Within the block, megatron.core optimizers built without a state initialiser (SGD's is
    None, which `sharded_state_dict(is_loading=True)` calls) have one that does nothing: the
    state was initialised before (`_initialise_state`)."""
    missing = [inner for inner in _inner_optimizers(optimizer) if inner.init_state_fn is None]
    try:
        for inner in missing:
            inner.init_state_fn = _state_already_initialised
        yield
    finally:
        for inner in missing:
            inner.init_state_fn = None


def _state_already_initialised(optimizer: torch.optim.Optimizer, config: Any = None) -> None:
    del optimizer, config


# What megatron-core 0.16 pairs a saved parameter group with the optimizer's by. 0.19 pairs them
# by every per-group override as well (`max_lr`, `min_lr`: --lr and --min-lr), so resuming with
# another --lr or --min-lr failed there ("Could not find parameter group with key ...", or a
# KeyError in the distributed optimizer), --override-opt_param-scheduler included.
_GROUP_STRUCTURE_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _group_structure(group: dict[str, Any]) -> tuple:
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in _GROUP_STRUCTURE_KEYS)


def _inner_states(optimizer: Any, state: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Each inner optimizer of `optimizer` with its part of `state` (the state dict
    `dist_checkpointing.load` filled in): all of it for one optimizer, else one state dict per
    chained optimizer, by index."""
    inners = _inner_optimizers(optimizer)
    if len(inners) == 1:
        return [(inners[0], state)]
    states = [state[key] for key in sorted(state)] if isinstance(state, dict) else list(state)
    return list(zip(inners, states, strict=True))


def _adopt_saved_schedule(optimizer: Any, state: dict[str, Any]) -> None:
    """Give each parameter group of `optimizer` the `_SCHEDULE_KEYS` of the saved group of the
    same structure in `state` (the state dict `dist_checkpointing.load` filled in), which loading
    sets anyway: megatron.core 0.19 then finds the saved groups whatever this run's --lr and
    --min-lr are, as 0.16 did. `load_state` restores the run's values where asked to."""
    for inner, inner_state in _inner_states(optimizer, state):
        saved_groups = inner_state.get("optimizer", inner_state).get("param_groups", [])
        by_structure = {_group_structure(group): group for group in saved_groups}
        for group in inner.optimizer.param_groups:
            saved = by_structure.get(_group_structure(group))
            if saved is not None:  # else megatron.core names the group it cannot find
                group.update({key: saved[key] for key in _SCHEDULE_KEYS if key in saved})


def _add_step_zero(optimizer: Any, state: dict[str, Any]) -> None:
    """megatron.core saves torch Adam's step (as "common_step") only when it is not 0, so the
    state of an optimizer that had not stepped yet comes back with moments and no step, which
    torch's Adam refuses to load (KeyError: 'step'): give those parameters step 0 in `state`
    (the state dict `dist_checkpointing.load` filled in)."""
    for inner, inner_state in _inner_states(optimizer, state):
        if not isinstance(inner.optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        # torch's state dict: nested under "optimizer" by the mixed-precision optimizer.
        torch_state = inner_state.get("optimizer", inner_state)["state"]
        if "common_step" in torch_state:
            continue
        # A CPU step, as torch's Adam keeps it unless fused or capturable; its load_state_dict
        # moves the step to the parameter's device in those cases.
        for per_param in torch_state.values():
            if isinstance(per_param, dict) and per_param and "step" not in per_param:
                per_param["step"] = torch.zeros((), dtype=torch.get_default_dtype())


def _load_torch_adam_distributed_state(optimizer: Any, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)` for a DistributedOptimizer on torch's Adam: the param
    groups and Adam's step first, then the shards of weights and moments with the step set
    aside, then every parameter gets its own copy of the step (a shared tensor would be
    incremented once per parameter at each step, breaking Adam's bias correction)."""
    state = dict(state)
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    if sharding_type != "fully_reshardable":
        raise CheckpointError(
            f"distributed-optimizer state of sharding type {sharding_type!r} loads without Apex "
            "or Transformer Engine only as 'fully_reshardable' (what this trainer saves)")
    optimizer.load_state_dict(state)
    adam_state = optimizer.optimizer.state
    steps = {param: values.pop("step") for param, values in adam_state.items()}
    optimizer.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        adam_state[param]["step"] = step.detach().clone()
