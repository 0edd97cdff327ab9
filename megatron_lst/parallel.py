"""Process-group and model-parallel set-up for training, tests and tools.

`initialize_parallel()` starts torch.distributed (from the torchrun environment, or as a
single process on a free local port), switches on the CPU layer when CUDA is absent,
builds megatron.core's tensor/pipeline/context/data-parallel groups and seeds the RNG
streams. Call it before building any megatron.core module; `destroy_parallel()` undoes it.
"""

from __future__ import annotations

import math
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from megatron_lst.compat.cpu import enable_cpu_compat
from megatron_lst.launch_environment import launch_world_size

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_owns_process_group = False


class ParallelLayoutError(ValueError):
    """The requested parallel sizes cannot be laid out on this world size."""


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the parallel layout."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    """"nccl" with CUDA, "gloo" on CPU."""
    device: torch.device
    """Where megatron.core places this process's tensors."""
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    data_parallel_size: int


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    backend: str | None = None,
) -> ParallelContext:
    """Initialise torch.distributed and megatron.core's parallel state, then seed.

    Under torchrun the process group comes from its environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK); without it this is a world of one on a free
    local port, so unit tests can build megatron modules in-process. An already
    initialised default process group is reused (and left alone by `destroy_parallel`).

    Seeding follows Megatron-LM's `_set_random_seed`: python, numpy and torch get
    `seed + 100 * pipeline_rank` (stages do not share dropout masks), and megatron's
    `model_parallel_cuda_manual_seed` derives the tensor-parallel streams from it.
    It must run before the first forward, so it runs here. `backend` (--distributed-backend):
    "nccl" or "gloo"; default nccl with CUDA, gloo without.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron.core model-parallel state is already initialised; "
            "call destroy_parallel() before initialize_parallel() again"
        )
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        enable_cpu_compat()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ParallelLayoutError("the nccl backend needs CUDA; use gloo on CPU")
    world_size = _world_size()
    _check_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size,
                  virtual_pipeline_model_parallel_size, context_parallel_size)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    _init_process_group(backend, timedelta(minutes=timeout_minutes))

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)

    return ParallelContext(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron.core's parallel state and the process group `initialize_parallel`
    created. Safe to call when nothing is initialised.

    `keep_process_group=True` keeps torch.distributed up so the next `initialize_parallel`
    can lay the same processes out differently: a process group cannot be re-created from
    the torchrun rendezvous once destroyed.
    """
    global _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _drop_groups_left_in(parallel_state)
    if keep_process_group:
        return
    if _owns_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _owns_process_group = False


def _drop_groups_left_in(module) -> None:
    """Set to None every process group (or list of them) that `module`'s globals still hold.

    megatron.core's `destroy_model_parallel` (0.16 to 0.19) leaves
    `_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo twin set: the groups and their
    gloo threads outlived `destroy_process_group` and were destroyed while the interpreter shut
    down, which now and then aborted the process at exit ("terminate called without an active
    exception", exit -6 instead of the run's own status)."""
    for name, value in list(vars(module).items()):
        held = value if isinstance(value, (list, tuple)) else [value]
        if held and all(isinstance(each, torch.distributed.ProcessGroup) for each in held):
            setattr(module, name, None)


def has_other_ranks() -> bool:
    """Whether this process is one rank of several in an initialized torch.distributed process
    group: a collective then has other ranks to meet; otherwise the work is this process's own."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return launch_world_size() if _launched_by_torchrun() else 1


def _launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARIABLES)


def _check_layout(world_size: int, tp: int, pp: int, vpp: int | None, cp: int) -> None:
    for name, size in (("tensor_model_parallel_size", tp),
                       ("pipeline_model_parallel_size", pp),
                       ("context_parallel_size", cp)):
        if size < 1:
            raise ParallelLayoutError(f"{name}={size}; it must be at least 1")
    model_size = tp * pp * cp
    if world_size % model_size:
        factors = f"tensor ({tp}) x pipeline ({pp})" + (f" x context ({cp})" if cp > 1 else "")
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by {factors} parallel = {model_size} "
            f"processes per model replica; launch a "
            f"multiple of {model_size} processes (e.g. torchrun --nproc-per-node {model_size}) "
            f"or choose sizes whose product divides {world_size}"
        )
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ParallelLayoutError(
            f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size "
            f">= 2 (got {pp}) and a value >= 1; pass None to run without interleaving"
        )


def pipeline_stage_layers(num_layers: int, pipeline_model_parallel_size: int,
                          first_stage_layers: int | None = None,
                          last_stage_layers: int | None = None) -> list[int]:
    """Global layers per pipeline stage, as megatron.core splits them with
    `num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage`
    (`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`): the given
    counts on the first / last stage, the rest evenly over the stages without one."""
    pp = pipeline_model_parallel_size
    given = {0: first_stage_layers, pp - 1: last_stage_layers}
    if pp == 1:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ParallelLayoutError(
                "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        return [num_layers]
    for stage, count in given.items():
        if count is not None and count < 1:
            raise ParallelLayoutError(
                f"pipeline stage {stage} is given {count} layers; give it at least 1")
    _check_stages_fill(num_layers, pp)
    fixed = {stage: count for stage, count in given.items() if count is not None}
    free_stages = pp - len(fixed)
    rest = num_layers - sum(fixed.values())
    if rest < 0 or (free_stages == 0 and rest) or (free_stages and rest % free_stages) or (
            free_stages and rest == 0):
        first = "--decoder-first-pipeline-num-layers"
        raise ParallelLayoutError(
            f"{num_layers} global layers do not split over {pp} pipeline stages with "
            f"{fixed or 'no'} fixed layer counts: the {rest} remaining layers must divide evenly "
            f"(at least 1 each) over the {free_stages} other stages; set {first} and/or "
            f"--decoder-last-pipeline-num-layers so they do, e.g. "
            f"{_working_split(num_layers, pp)} (tools/plan_compute.py suggests a balanced split)")
    share = rest // free_stages if free_stages else 0
    return [fixed.get(stage, share) for stage in range(pp)]


def virtual_pipeline_size(stage_layers: list[int], num_micro_batches: int,
                          layers_per_virtual_stage: int | None = None,
                          virtual_stages_per_rank: int | None = None) -> int | None:
    """The virtual pipeline stages per pipeline rank (megatron's
    `virtual_pipeline_model_parallel_size`) that `--num-layers-per-virtual-pipeline-stage` or
    `--num-virtual-stages-per-pipeline-rank` ask for over pipeline stages of `stage_layers` global
    layers (`pipeline_stage_layers`); None for neither, or for one virtual stage per rank (the
    plain 1F1B schedule, as Megatron-LM takes it).

    Every stage is cut into the same number of chunks of whole layers, and megatron's interleaved
    schedule runs micro-batches in groups of one per pipeline stage, so `num_micro_batches` must be
    a multiple of the pipeline size.
    """
    pp = len(stage_layers)
    if layers_per_virtual_stage is not None and virtual_stages_per_rank is not None:
        raise ParallelLayoutError(
            "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank "
            "both set the virtual stages; give one")
    given = (layers_per_virtual_stage if layers_per_virtual_stage is not None
             else virtual_stages_per_rank)
    if given is None:
        return None
    flag = ("--num-layers-per-virtual-pipeline-stage" if layers_per_virtual_stage is not None
            else "--num-virtual-stages-per-pipeline-rank")
    if given < 1:
        raise ParallelLayoutError(f"{flag} must be at least 1, got {given}")
    if pp == 1:
        raise ParallelLayoutError(
            f"{flag} interleaves pipeline stages: it needs --pipeline-model-parallel-size 2 or "
            f"more; drop it or split the model over pipeline stages")
    if layers_per_virtual_stage is not None:
        counts = {layers // layers_per_virtual_stage for layers in stage_layers}
        if any(layers % layers_per_virtual_stage for layers in stage_layers) or len(counts) > 1:
            raise ParallelLayoutError(
                f"{flag} {layers_per_virtual_stage} must cut every pipeline stage's global layers "
                f"{stage_layers} into the same number of chunks; give a divisor of "
                f"{math.gcd(*stage_layers)} with even stages, or --num-virtual-stages-per-"
                f"pipeline-rank")
        virtual_stages_per_rank = counts.pop()
    elif any(layers % virtual_stages_per_rank for layers in stage_layers):
        raise ParallelLayoutError(
            f"{flag} {virtual_stages_per_rank} must divide every pipeline stage's global layers "
            f"{stage_layers}; use a divisor of {math.gcd(*stage_layers)} or change the split "
            f"(--num-layers, --decoder-first/last-pipeline-num-layers)")
    if virtual_stages_per_rank == 1:
        return None
    if num_micro_batches % pp:
        raise ParallelLayoutError(
            f"virtual pipeline stages run micro-batches in groups of --pipeline-model-parallel-"
            f"size {pp}: {num_micro_batches} micro-batches per step (--global-batch-size / "
            f"(--micro-batch-size x data-parallel size)) must be a multiple of {pp}; change "
            f"--global-batch-size or --micro-batch-size, or drop {flag}")
    return virtual_stages_per_rank


def first_stage_layers_for_any_split(num_layers: int, pipeline_model_parallel_size: int
                                     ) -> int | None:
    """The `--decoder-first-pipeline-num-layers` that puts `num_layers` global layers on
    `pipeline_model_parallel_size` stages: None where they split evenly, else an even share on
    every stage and the remainder on the first."""
    pp = pipeline_model_parallel_size
    _check_stages_fill(num_layers, pp)
    if num_layers % pp == 0:
        return None
    return num_layers - (num_layers // pp) * (pp - 1)


def _check_stages_fill(num_layers: int, pp: int) -> None:
    if num_layers < pp:
        raise ParallelLayoutError(
            f"{num_layers} global layers cannot fill {pp} pipeline stages (each needs at least "
            f"1): use --pipeline-model-parallel-size {num_layers} or less")


def _working_split(num_layers: int, pp: int) -> str:
    """How to put `num_layers` global layers on `pp` stages, in flags."""
    first = first_stage_layers_for_any_split(num_layers, pp)
    if first is None:
        return f"drop both (even stages {pipeline_stage_layers(num_layers, pp)})"
    return (f"--decoder-first-pipeline-num-layers {first} alone (stages "
            f"{pipeline_stage_layers(num_layers, pp, first)})")


def _init_process_group(backend: str, timeout: timedelta) -> None:
    global _owns_process_group
    if torch.distributed.is_initialized():
        return
    if _launched_by_torchrun():
        check_elastic_restarts_can_rendezvous(os.environ)
        torch.distributed.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_local_port()}",
            rank=0, world_size=1, timeout=timeout,
        )
    _owns_process_group = True


def check_elastic_restarts_can_rendezvous(environ: Mapping[str, str]) -> None:
    """Refuse an elastic launch whose restarted rounds could not build their process groups.

    With `--rdzv-backend c10d`, torchrun's agents share one TCPStore server with the workers
    (TORCHELASTIC_USE_AGENT_STORE=True) and keep it across restart rounds, while the workers'
    store keys (the gloo/NCCL addresses of every process group) carry no round number. A worker
    of a restarted round can then read the address a dead worker of the previous round published,
    and `init_process_group` fails ("Gloo connectFullMesh failed ... Connection refused") or waits
    out its timeout (pytorch/pytorch#135712). `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in the
    agents' environment gives every round a fresh store, hosted by the round's rank 0.
    """
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise RuntimeError(
            f"torchrun was started with --max-restarts {restarts} and a TCPStore shared between "
            f"its agent and the workers, which keeps the previous round's process-group "
            f"addresses: a restarted round would fail with 'Gloo connectFullMesh failed' (or "
            f"hang, with NCCL). Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on "
            f"every node (examples/pretrain_lst_torchrun.sh does), or run with --max-restarts 0"
        )


def collective_device() -> torch.device:
    """Where this rank's tensors for collectives and the model's inputs live: the current GPU
    with CUDA, else the CPU (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
