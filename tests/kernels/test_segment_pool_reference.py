"""PyTorch segment pool: brute-force oracle, LST reference semantics, gradients, backend switch."""

import sys
from types import SimpleNamespace

import pytest
import torch
from kernel_cases import brute_patch_ids, brute_segment_pool, random_patch_lengths
from lst_kernels import backend, segment_pool, segment_pool_reference
from lst_kernels.backend import BACKEND_ENV_VAR, resolve_backend

REDUCTIONS = ["max", "mean", "sum"]


def _ragged_case(seed: int, dim: int = 5):
    generator = torch.Generator().manual_seed(seed)
    lengths = random_patch_lengths(generator, batch=3, num_patches=8)
    num_tokens = int(lengths.sum(1).max()) - 1  # the trainer's sum == N + 1 for the longest row
    x = torch.randn(3, max(num_tokens, 1), dim, generator=generator, dtype=torch.float64)
    return x, lengths


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(reduce, seed):
    x, lengths = _ragged_case(seed)
    out = segment_pool(x, lengths, reduce, backend="torch")
    torch.testing.assert_close(out, brute_segment_pool(x, lengths, reduce), rtol=1e-12, atol=1e-12)


def test_max_equals_lst_reference_scatter_reduce():
    # The LST reference pools with scatter_reduce(amax, include_self=False) into zeros: an
    # all-negative patch keeps its negative max, an empty patch stays 0.
    x, lengths = _ragged_case(7)
    x = x - 10.0
    ids = brute_patch_ids(lengths, x.shape[1])  # tokens past the sum -> P: drop them
    keep = ids < lengths.shape[1]
    expected = torch.zeros(x.shape[0], lengths.shape[1], x.shape[2], dtype=x.dtype)
    for b in range(x.shape[0]):
        index = ids[b, keep[b]][:, None].expand(-1, x.shape[2])
        expected[b] = expected[b].scatter_reduce(
            0, index, x[b, keep[b]], "amax", include_self=False
        )
    out = segment_pool(x, lengths, "max", backend="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    nonempty = (lengths > 0)[..., None].expand_as(out)
    assert (out[nonempty] < 0).all()
    assert (out[~nonempty] == 0).all()


def test_tokens_past_the_sum_are_ignored_and_long_patches_clipped():
    x = torch.arange(1.0, 7.0).view(1, 6, 1)
    lengths = torch.tensor([[2, 0, 1]])  # tokens 3..5 belong to no patch
    torch.testing.assert_close(
        segment_pool(x, lengths, "sum").flatten(), torch.tensor([3.0, 0.0, 3.0])
    )
    lengths = torch.tensor([[4, 9]])  # the second patch reaches past N = 6
    torch.testing.assert_close(segment_pool(x, lengths, "mean").flatten(), torch.tensor([2.5, 5.5]))


def test_max_of_a_patch_with_nan_is_nan_and_stays_in_its_patch():
    x = torch.tensor([[[1.0], [float("nan")], [3.0], [5.0], [7.0]]], requires_grad=True)
    out = segment_pool(x, torch.tensor([[1, 2, 2]]), "max", backend="torch")
    assert out[0, 0, 0] == 1.0 and out[0, 1, 0].isnan() and out[0, 2, 0] == 7.0
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_rows_without_tokens_give_empty_patches(reduce):
    x = torch.randn(2, 0, 3, requires_grad=True)  # N = 0: every patch is empty
    out = segment_pool(x, torch.tensor([[1, 2], [0, 0]]), reduce)
    torch.testing.assert_close(out, torch.zeros(2, 2, 3), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_max_gradient_goes_to_first_argmax_on_ties():
    x = torch.tensor([[[1.0, 5.0], [3.0, 5.0], [3.0, 2.0], [7.0, 7.0]]], requires_grad=True)
    lengths = torch.tensor([[3, 1]])
    out = segment_pool(x, lengths, "max")
    torch.testing.assert_close(out.detach(), torch.tensor([[[3.0, 5.0], [7.0, 7.0]]]))
    out.backward(torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]))
    expected = torch.tensor([[[0.0, 20.0], [10.0, 0.0], [0.0, 0.0], [30.0, 40.0]]])
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_float64(reduce):
    x, lengths = _ragged_case(3, dim=3)
    x = x[:, :12].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: segment_pool_reference(t, lengths, reduce), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 400, 4, generator=generator).to(dtype)
    lengths = torch.tensor([[400], [250]])
    out = segment_pool(x, lengths, "sum")
    assert out.dtype == dtype
    exact = torch.stack([x[0].double().sum(0), x[1, :250].double().sum(0)])[:, None]
    # fp32 accumulation leaves only the final rounding to `dtype`: half an ulp of the result.
    torch.testing.assert_close(out.double(), exact, rtol=torch.finfo(dtype).eps / 2, atol=1e-4)


def test_rejects_bad_inputs():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="reduce"):
        segment_pool(x, torch.ones(2, 5, dtype=torch.int32), "min")
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        segment_pool(x, torch.ones(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        segment_pool(x[0], torch.ones(2, 5, dtype=torch.int32))
    # Without the check a later patch would start before the row: [-2, 3] pools x[-2:1].
    with pytest.raises(ValueError, match=r"patch_lengths must be >= 0"):
        segment_pool(x, torch.tensor([[-2, 3], [1, 2]], dtype=torch.int32))
    # A bool mask passed by mistake was read as lengths 0 and 1 without a word.
    with pytest.raises(TypeError, match=r"patch_lengths must be an integer tensor, got torch.bool"):
        segment_pool(x, torch.ones(2, 5, dtype=torch.bool))


def test_backend_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' on CPU tensors needs TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    # Chosen by the environment, the refusal names the variable, not a backend= never passed.
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=f"^{BACKEND_ENV_VAR}=triton on CPU tensors needs"):
        resolve_backend("auto", cpu)


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", "y"])
def test_the_interpreter_switch_is_read_as_triton_reads_it(monkeypatch, value):
    # Triton runs the interpreter for TRITON_INTERPRET=true (or on, yes, y), but backend="triton"
    # refused CPU tensors unless the value was exactly "1".
    monkeypatch.delitem(sys.modules, "lst_kernels._triton_utils", raising=False)  # not defined yet
    monkeypatch.setattr(backend, "interpreter_incompatibility", lambda: None)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert resolve_backend("triton", torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.zeros(1))


def test_the_interpreter_switch_set_after_the_kernels_were_defined_is_refused(monkeypatch):
    # Triton chose compiled kernels when they were defined; TRITON_INTERPRET=1 set afterwards
    # passed the check and the launch failed with "0 active drivers ([]). There should only be
    # one." Now the kernels' own choice decides, and the error says when to set the variable.
    monkeypatch.setitem(sys.modules, "lst_kernels._triton_utils", SimpleNamespace(INTERPRETED=False))
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before triton is imported"):
        resolve_backend("triton", torch.zeros(1))


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "refused"),
    [("3.6.0", "2.4.0", True), ("3.6.0", "2.10.1", True), ("3.6.0", "2.3.5", False),
     ("3.7.0", "2.4.0", False), ("3.10.0+git1", "2.5.2", False), ("2.3.1", "1.26.4", False)],
)
def test_interpreter_refuses_triton_before_3_7_with_numpy_2_4(
    monkeypatch, triton_version, numpy_version, refused
):
    triton = pytest.importorskip("triton")
    import numpy

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(backend, "triton_interpreted", lambda: True)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    backend.interpreter_incompatibility.cache_clear()
    try:
        if refused:
            with pytest.raises(RuntimeError, match=r"numpy<2.4.*triton>=3.7"):
                resolve_backend("triton", torch.zeros(1))
        else:
            assert resolve_backend("triton", torch.zeros(1)) == "triton"
    finally:
        backend.interpreter_incompatibility.cache_clear()
