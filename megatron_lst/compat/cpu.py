"""Run megatron.core on CPU with gloo when CUDA is absent (docs/architecture.md#megatroncore-on-cpu).

megatron.core assumes one CUDA device per process: it places tensors with
`device="cuda"` or `device=torch.cuda.current_device()`, calls `.cuda()`, synchronises
and records events on CUDA streams, keeps its tensor-parallel RNG streams as CUDA
generator states, and checks `param.type() == "torch.cuda.FloatTensor"` in its
optimizers. On a machine without CUDA, `enable_cpu_compat()` lets the CPU play that
device: each patch below maps one of those calls onto the CPU and names the
megatron.core call sites it serves (paths relative to `megatron/core/`).

Patches are chosen by feature detection (an attribute is patched only if it exists),
never by version string. With CUDA available `enable_cpu_compat()` changes nothing.
`torch.cuda.is_available()` stays False on purpose: code that asks gets the truth.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

_CPU = torch.device("cpu")

# Factories megatron.core calls with a hard-coded CUDA device, e.g.
#   torch.tensor(..., device='cuda')  optimizer/optimizer.py, optimizer/clip_grads.py,
#                                     rerun_state_machine.py, dist_checkpointing/
#                                     strategies/state_dict_saver.py, tensor_parallel/data.py
#   torch.zeros(..., device="cuda")   pipeline_parallel/schedules.py (token counts),
#                                     distributed/param_and_grad_buffer.py
#   torch.ones(..., device="cuda")    transformer/utils.py (attention masks)
#   torch.empty / torch.empty_like(..., device="cuda")
#                                     dist_checkpointing/mapping.py, exchange_utils.py
# The rest of the family is wrapped too, so a new call site with the same habit works.
# `device` is keyword-only in all of them, so the wrappers look at keywords only.
_FACTORY_NAMES = (
    "empty", "zeros", "ones", "full", "tensor", "arange",
    "empty_like", "zeros_like", "ones_like", "full_like",
)

_enabled = False


def is_cpu_compat_enabled() -> bool:
    """True once `enable_cpu_compat()` has patched this process."""
    return _enabled


def enable_cpu_compat() -> bool:
    """Map megatron.core's CUDA calls onto the CPU; returns whether the layer is active.

    A no-op returning False when CUDA is available. Idempotent: later calls return True
    without patching twice. Call it before building any megatron.core module (the
    `megatron_lst.parallel.initialize_parallel` entry point does).
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    _patch_device_queries()
    _patch_streams_and_events()
    _patch_rng()
    _patch_to_cuda()
    _patch_factories()
    _patch_type_names()
    _patch_megatron_rng_tracker()
    _patch_megatron_bound_defaults()
    _enabled = True
    return True


def _is_cuda_device(device: Any) -> bool:
    """Whether a `device=` argument names a CUDA device ("cuda", "cuda:1", torch.device)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":", 1)[0] == "cuda"


def _set(owner: Any, name: str, value: Any) -> None:
    if hasattr(owner, name):
        setattr(owner, name, value)


# --- device queries and synchronisation ---------------------------------------------

def _current_device() -> torch.device:
    return _CPU


# Each replacement is its own function object: torch._dynamo keys its rules by object and
# rejects one object registered under two names with different rules.
def _set_device(device: Any) -> None:
    pass


def _synchronize(device: Any = None) -> None:
    pass


def _patch_device_queries() -> None:
    # `device=torch.cuda.current_device()`: ~100 call sites, e.g. tensor_parallel/layers.py
    # (weights, when use_cpu_initialization is off), distributed/param_and_grad_buffer.py
    # (grad buffers), pipeline_parallel/p2p_communication.py (receive buffers). Returning
    # the CPU device itself (not an index) makes `device=`, `.to()` and `.cuda()` all land
    # on the CPU.
    _set(torch.cuda, "current_device", _current_device)
    # `torch.cuda.set_device(local_rank)`: entry points; there is one device, nothing to pick.
    _set(torch.cuda, "set_device", _set_device)
    # `torch.cuda.synchronize()`: parallel_state.py, timers.py, dist_checkpointing/
    # strategies/ (async and fully parallel save). CPU kernels complete before they return.
    _set(torch.cuda, "synchronize", _synchronize)


# --- streams and events -------------------------------------------------------------

class _HostEvent:
    """A CUDA event on the CPU: work is done when it is recorded, so it only keeps time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self._recorded_at: float | None = None

    def record(self, stream: Any = None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: _HostEvent) -> float:
        """Milliseconds between this event's and `end_event`'s `record()` calls."""
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("elapsed_time needs both events recorded; call record() on each")
        return (end_event._recorded_at - self._recorded_at) * 1e3


class _HostStream:
    """A CUDA stream on the CPU: operations run in program order, so ordering is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        pass

    @staticmethod
    def priority_range() -> tuple[int, int]:
        """(lowest, highest) priority: one, as the CPU runs everything in order."""
        return (0, 0)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _HostEvent | None = None) -> _HostEvent:
        event = event if event is not None else _HostEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _current_stream(device: Any = None) -> _HostStream:
    return _HOST_STREAM


def _default_stream(device: Any = None) -> _HostStream:
    return _HOST_STREAM


def _set_stream(stream: Any) -> None:
    pass


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


def _patch_streams_and_events() -> None:
    # Streams: distributed/param_and_grad_buffer.py and distributed/distributed_data_parallel.py
    # (grad-reduce overlap), pipeline_parallel/utils.py and combined_1f1b.py (communication
    # streams; from megatron.core 0.19 `torch.cuda.Stream.priority_range()` picks a high-priority
    # one there). Events: pipeline_parallel/utils.py, utils.py, the fine-grained offloading.
    _set(torch.cuda, "Stream", _HostStream)
    _set(torch.cuda, "Event", _HostEvent)
    _set(torch.cuda, "current_stream", _current_stream)
    _set(torch.cuda, "default_stream", _default_stream)
    _set(torch.cuda, "set_stream", _set_stream)
    _set(torch.cuda, "stream", _stream_context)


# --- random number generator state --------------------------------------------------

def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _manual_seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_rng() -> None:
    # The "CUDA" generator is the CPU default generator: CPU kernels (dropout, init) draw
    # from it, so forking megatron's tracker state swaps the state those kernels use.
    # Call sites: tensor_parallel/random.py (`CudaRNGStatesTracker.add`,
    # `model_parallel_cuda_manual_seed`, `_get_cuda_rng_state` via torch.cuda.random,
    # `_get_all_rng_states`); checkpointing code saving `torch.cuda.get_rng_state()`.
    # Without CUDA, torch's own versions raise or queue the call until a CUDA init that
    # never comes, so seeding would silently do nothing.
    for module in (torch.cuda, torch.cuda.random):
        _set(module, "get_rng_state", _get_rng_state)
        _set(module, "set_rng_state", _set_rng_state)
        _set(module, "manual_seed", _manual_seed)
        _set(module, "manual_seed_all", _manual_seed_all)


class _CpuRngChangedIsExpected(logging.Filter):
    """Drops the tracker's "CPU RNG state changed within GPU RNG context" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def _patch_megatron_rng_tracker() -> None:
    try:
        from megatron.core.tensor_parallel import random as megatron_random
    except ImportError:
        return

    # tensor_parallel/random.py `_set_cuda_rng_state` (used by the tracker's `fork`, `add`
    # and `_set_all_rng_states`) reaches the generator through `torch.cuda.default_generators`
    # inside a `_lazy_call` it imported by name, so on CPU its callback is queued forever.
    # Module globals are looked up at call time, so replacing the function fixes every caller.
    def set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1,
                           graph_safe: bool = False) -> None:
        torch.default_generator.set_state(new_state)

    _set(megatron_random, "_set_cuda_rng_state", set_cuda_rng_state)
    # `CudaRNGStatesTracker.fork` warns when the CPU generator moved inside a fork. With the
    # CPU generator standing in for the CUDA one, every random op in a fork moves it, so the
    # warning would fire for each dropout.
    logging.getLogger(megatron_random.__name__).addFilter(_CpuRngChangedIsExpected())


# --- .cuda() ------------------------------------------------------------------------

def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
                 memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    return self


def _module_cuda(self: torch.nn.Module, device: Any = None) -> torch.nn.Module:
    return self


def _patch_to_cuda() -> None:
    # Tensor.cuda: optimizer/optimizer.py (state dict reload), optimizer/grad_scaler.py,
    # optimizer/distrib_optimizer.py (checkpoint gather), tensor_parallel/data.py
    # (broadcast_data), models/common/language_module/language_module.py (tied weights),
    # utils.py. Module.cuda: entry scripts moving a model "to the GPU".
    # A tensor already on the device is returned as is, as CUDA's own `.cuda()` does.
    torch.Tensor.cuda = _tensor_cuda
    torch.nn.Module.cuda = _module_cuda


# --- tensor factories with device="cuda" --------------------------------------------

def _on_cpu_if_cuda(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def factory_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    factory_on_cpu.__wrapped_cuda_factory__ = factory
    return factory_on_cpu


def _patch_factories() -> None:
    for name in _FACTORY_NAMES:
        factory = getattr(torch, name, None)
        if factory is not None and not hasattr(factory, "__wrapped_cuda_factory__"):
            setattr(torch, name, _on_cpu_if_cuda(factory))


def _patch_megatron_bound_defaults() -> None:
    # dist_checkpointing/mapping.py `ShardedTensor.init_data(device, init_fn=torch.empty)`
    # bound the unwrapped `torch.empty` when megatron was imported; exchange_utils.py calls
    # it with device "cuda". Point the default at the wrapper.
    try:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
    except ImportError:
        return
    init_data = getattr(ShardedTensor, "init_data", None)
    defaults = getattr(init_data, "__defaults__", None) or ()
    unwrapped_empty = torch.empty.__wrapped_cuda_factory__
    if any(default is unwrapped_empty for default in defaults):
        init_data.__defaults__ = tuple(
            torch.empty if default is unwrapped_empty else default for default in defaults)


# --- the "torch.cuda.FloatTensor" type check ----------------------------------------

_tensor_type = torch.Tensor.type


def _type_naming_cpu_as_cuda(self: torch.Tensor, dtype: Any = None,
                             non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is None and not kwargs:
        name = _tensor_type(self)
        if self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _tensor_type(self, dtype, non_blocking, **kwargs)


def _patch_type_names() -> None:
    # optimizer/optimizer.py (`Float16OptimizerWithFloat16Params`), optimizer/
    # distrib_optimizer.py (`_build_model_and_main_param_groups`) and optimizer/
    # clip_grads.py accept a parameter only if `param.type()` is "torch.cuda.FloatTensor"
    # (or the Half/BFloat16 names) and raise TypeError otherwise. With the CPU playing the
    # CUDA device, a CPU tensor's type name is reported with the "torch.cuda." prefix.
    # Only the no-argument query changes; `tensor.type(dtype)` conversions are untouched.
    torch.Tensor.type = _type_naming_cpu_as_cuda
