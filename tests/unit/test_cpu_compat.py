"""megatron_lst.compat.cpu: megatron.core's CUDA calls land on the CPU."""

import inspect

import pytest
import torch

from megatron_lst.compat import cpu
from megatron_lst.parallel import destroy_parallel, initialize_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU layer is a no-op where CUDA exists")

SEED = 1234


@pytest.fixture(scope="module", autouse=True)
def compat():
    assert cpu.enable_cpu_compat()


@pytest.fixture
def parallel():
    context = initialize_parallel(seed=SEED)
    yield context
    destroy_parallel()


def test_enable_is_idempotent():
    patched = (torch.empty, torch.Tensor.type, torch.cuda.current_device)
    assert cpu.enable_cpu_compat()
    assert cpu.is_cpu_compat_enabled()
    assert (torch.empty, torch.Tensor.type, torch.cuda.current_device) == patched
    assert not hasattr(torch.empty.__wrapped_cuda_factory__, "__wrapped_cuda_factory__")


def test_enable_is_a_no_op_with_cuda(monkeypatch):
    def untouched(*args, **kwargs):
        raise AssertionError("a stand-in for the CUDA original; never called")

    monkeypatch.setattr(cpu, "_enabled", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", untouched)
    monkeypatch.setattr(torch.Tensor, "cuda", untouched)
    monkeypatch.setattr(torch, "zeros", untouched)
    assert cpu.enable_cpu_compat() is False
    assert not cpu.is_cpu_compat_enabled()
    assert torch.cuda.current_device is untouched
    assert torch.Tensor.cuda is untouched
    assert torch.zeros is untouched


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda"),
                                    torch.device("cuda", 0)])
def test_factories_place_cuda_tensors_on_cpu(device):
    assert torch.zeros(2, device=device).device.type == "cpu"
    assert torch.tensor([1.0], dtype=torch.float, device=device).device.type == "cpu"
    assert torch.arange(3, device=device).tolist() == [0, 1, 2]
    assert torch.empty_like(torch.ones(2), device=device).device.type == "cpu"
    assert torch.full((2,), 7.0, device=device).tolist() == [7.0, 7.0]


def test_factories_leave_other_devices_alone():
    assert torch.zeros(2, device="meta").device.type == "meta"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, 3).shape == (2, 3)


def test_cuda_moves_are_identity():
    tensor = torch.ones(3)
    module = torch.nn.Linear(2, 2)
    assert tensor.cuda() is tensor
    assert tensor.cuda(torch.cuda.current_device(), non_blocking=True) is tensor
    assert module.cuda() is module
    assert tensor.to(torch.cuda.current_device()) is tensor


def test_type_names_report_cpu_as_cuda():
    # optimizer/distrib_optimizer.py accepts fp32 params only if this string matches.
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2, dtype=torch.half).type() == "torch.cuda.HalfTensor"
    converted = torch.zeros(2).type(torch.float64)
    assert converted.dtype == torch.float64
    assert torch.zeros(2).type("torch.DoubleTensor").dtype == torch.float64


def test_synchronisation_streams_and_events():
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=torch.cuda.current_device(), priority=-1)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        value = torch.ones(1) + 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record(torch.cuda.default_stream())
    end.synchronize()
    assert value.item() == 2.0
    assert start.query() and side.query()
    assert start.elapsed_time(end) >= 0.0
    with pytest.raises(RuntimeError, match="record"):
        torch.cuda.Event().elapsed_time(end)


def test_megatron_communication_streams_are_made_on_the_host(monkeypatch):
    """megatron.core 0.19 asks `torch.cuda.Stream.priority_range()` for a high-priority
    communication stream (pipeline_parallel/utils.py `set_streams`), an AttributeError here."""
    from megatron.core.pipeline_parallel import utils as pipeline_utils

    for name in ("_COMP_STREAM", "_COMM_STREAM"):  # restored after the test
        monkeypatch.setattr(pipeline_utils, name, None)
    parameters = inspect.signature(pipeline_utils.set_streams).parameters
    pipeline_utils.set_streams(**({"high_priority": True} if "high_priority" in parameters else {}))
    stream = pipeline_utils.get_comm_stream()
    assert stream.query() and torch.cuda.Stream.priority_range() == (0, 0)
    stream.wait_stream(torch.cuda.current_stream())


def test_cuda_rng_api_drives_the_cpu_generator():
    torch.cuda.manual_seed(7)
    first = torch.rand(4)
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(7)))
    state = torch.cuda.get_rng_state()
    second = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), second)
    torch.cuda.manual_seed_all(7)
    assert torch.equal(torch.rand(4), first)


def test_rng_tracker_fork_uses_its_own_stream_and_restores_the_default(parallel, caplog):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    # initialize_parallel seeded the default stream with SEED (pipeline rank 0) and the
    # tensor-parallel stream with SEED + 2718 + tp_rank (megatron's offset).
    expected_default = torch.Generator().manual_seed(SEED)
    expected_tensor_parallel = torch.Generator().manual_seed(SEED + 2718)

    before = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        inside_first = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        inside_second = torch.rand(3)
    after = torch.rand(3)

    assert torch.equal(before, torch.rand(3, generator=expected_default))
    assert torch.equal(after, torch.rand(3, generator=expected_default))
    assert torch.equal(inside_first, torch.rand(3, generator=expected_tensor_parallel))
    assert torch.equal(inside_second, torch.rand(3, generator=expected_tensor_parallel))
    assert "CPU RNG state changed" not in caplog.text


def test_activation_recompute_replays_the_same_dropout_mask(parallel):
    # tensor_parallel.checkpoint saves the RNG states in forward and restores them before
    # recomputing in backward; with a no-op state setter the masks would differ.
    from megatron.core.tensor_parallel import checkpoint, get_cuda_rng_tracker

    def dropout_block(x):
        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, p=0.5, training=True) * x

    def gradient(recompute: bool) -> torch.Tensor:
        x = torch.linspace(-1.0, 1.0, 64, requires_grad=True)
        tracker_states = get_cuda_rng_tracker().get_states()
        rng_state = torch.get_rng_state()
        output = checkpoint(dropout_block, False, x) if recompute else dropout_block(x)
        output.sum().backward()
        get_cuda_rng_tracker().set_states(tracker_states)
        torch.set_rng_state(rng_state)
        return x.grad

    plain = gradient(recompute=False)
    assert (plain == 0).any() and (plain != 0).any()
    assert torch.equal(gradient(recompute=True), plain)


def test_sharded_tensor_init_data_on_cuda_lands_on_cpu(monkeypatch):
    # dist_checkpointing/exchange_utils.py allocates receive buffers with
    # `init_data("cuda")`, whose `init_fn=torch.empty` default was bound when megatron was
    # imported: as if that happened before the CPU layer was enabled.
    from megatron.core.dist_checkpointing import ShardedTensor

    unwrapped_empty = torch.empty.__wrapped_cuda_factory__
    monkeypatch.setattr(ShardedTensor.init_data, "__defaults__", (unwrapped_empty,))
    monkeypatch.setattr(cpu, "_enabled", False)
    assert cpu.enable_cpu_compat()

    sharded = ShardedTensor.from_rank_offsets("weight", torch.ones(2, 3))
    sharded.data = None
    sharded.init_data("cuda")
    assert sharded.data.device.type == "cpu" and sharded.data.shape == (2, 3)
