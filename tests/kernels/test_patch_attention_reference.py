"""PyTorch patch cross-attention: dense-mask oracle, chunking, empty ranges, gradients, grouped
key/value heads."""

import lst_kernels.patch_attention_reference as reference
import pytest
import torch
from kernel_cases import (
    dense_attention,
    dense_grouped_attention,
    model_key_ranges,
    random_patch_lengths,
    range_mask,
)
from lst_kernels import patch_cross_attention, patch_cross_attention_reference


def _qkv(generator, batch, num_queries, num_keys, heads=2, head_dim=8, dtype=torch.float64,
         kv_heads=None):
    """q `[B, Sq, heads, d]`, k and v `[B, Sk, kv_heads, d]` (kv_heads: `heads` unless given)."""
    def draw(n, h):
        return torch.randn(batch, n, h, head_dim, generator=generator, dtype=dtype)

    kv_heads = heads if kv_heads is None else kv_heads
    return draw(num_queries, heads), draw(num_keys, kv_heads), draw(num_keys, kv_heads)


def _model_ranges(seed, direction, k, window, batch=2, num_patches=7):
    """(start, end, Sq, Sk) of the model's decoder or encoder attention on a ragged batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = random_patch_lengths(generator, batch=batch, num_patches=num_patches)
    num_tokens = max(int(lengths.sum(1).max()) - 1, 1)
    return model_key_ranges(lengths, num_tokens, direction, k, window)


@pytest.mark.parametrize("direction", ["decoder", "encoder"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("window", [1, 2, 100])
def test_matches_dense_mask_attention(direction, k, window):
    start, end, num_queries, num_keys = _model_ranges(window + k, direction, k, window)
    q, kk, v = _qkv(torch.Generator().manual_seed(0), 2, num_queries, num_keys)
    out = patch_cross_attention(q, kk, v, start, end, backend="torch")
    expected = dense_attention(q, kk, v, range_mask(start, end, num_keys))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", ["decoder", "encoder"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_kv_heads_match_the_head_by_head_rule(direction, kv_heads):
    """k/v with G of q's H = 4 heads: query head h reads key/value head h // (H / G), forward
    and the gradients of q, k and v (k's and v's with G heads, summed over the group)."""
    start, end, num_queries, num_keys = _model_ranges(kv_heads, direction, 2, 3)
    q, kk, v = (t.requires_grad_() for t in _qkv(torch.Generator().manual_seed(kv_heads), 2,
                                                  num_queries, num_keys, heads=4,
                                                  kv_heads=kv_heads))
    out = patch_cross_attention(q, kk, v, start, end, backend="torch")
    expected = dense_grouped_attention(q, kk, v, range_mask(start, end, num_keys))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, kk, v), grad)
    want = torch.autograd.grad(expected, (q, kk, v), grad)
    for g, w, t in zip(got, want, (q, kk, v), strict=True):
        assert g.shape == t.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_chunking_does_not_change_the_result(monkeypatch):
    start, end, num_queries, num_keys = _model_ranges(5, "encoder", 2, 3)
    q, kk, v = _qkv(torch.Generator().manual_seed(1), 2, num_queries, num_keys)
    whole = patch_cross_attention(q, kk, v, start, end, backend="torch")
    # One query per chunk.
    monkeypatch.setattr(reference, "SCORE_ELEMENTS_PER_CHUNK", 1)
    torch.testing.assert_close(
        patch_cross_attention(q, kk, v, start, end, backend="torch"), whole, rtol=1e-12, atol=1e-12
    )


def test_arbitrary_ranges_and_scale():
    generator = torch.Generator().manual_seed(2)
    q, kk, v = _qkv(generator, 2, 11, 9)
    start = torch.randint(-2, 10, (2, 11), generator=generator, dtype=torch.int32)
    end = start + torch.randint(-1, 6, (2, 11), generator=generator, dtype=torch.int32)
    out = patch_cross_attention(q, kk, v, start, end, scale=0.3, backend="torch")
    visible = range_mask(start.clamp(0, 9), end.clamp(0, 9), 9)
    torch.testing.assert_close(out, dense_attention(q, kk, v, visible, 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5])
@pytest.mark.parametrize("attention", ["torch", "triton", "reference"])
def test_a_scale_that_is_not_finite_and_positive_is_refused(attention, scale):
    # NaN or infinity made every output NaN without a word (0 or less: uniform or inverted
    # attention); refused before a backend is chosen, so on either one.
    q = torch.randn(1, 4, 2, 8)
    ranges = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"scale must be a finite number > 0 .*got {scale}"):
        if attention == "reference":
            patch_cross_attention_reference(q, q, q, ranges, ranges + 2, scale)
        else:
            patch_cross_attention(q, q, q, ranges, ranges + 2, scale, backend=attention)


def test_a_tensor_scale_is_refused_rather_than_read_from_the_device():
    q = torch.randn(1, 4, 2, 8)
    ranges = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="scale must be a Python float .*got Tensor"):
        patch_cross_attention(q, q, q, ranges, ranges + 2, torch.tensor(0.3))


def test_empty_range_outputs_zero_and_gets_zero_gradient():
    generator = torch.Generator().manual_seed(3)
    q, kk, v = (t.requires_grad_() for t in _qkv(generator, 1, 4, 6))
    start = torch.tensor([[0, 3, 3, 6]], dtype=torch.int32)
    end = torch.tensor([[2, 3, 6, 6]], dtype=torch.int32)  # queries 1 and 3 see nothing
    out = patch_cross_attention(q, kk, v, start, end)
    assert (out[:, [1, 3]] == 0).all()
    out.square().sum().backward()
    assert (q.grad[:, [1, 3]] == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kk.grad).all()
    assert (kk.grad[:, 2] == 0).all() and (v.grad[:, 2] == 0).all()  # key 2 is seen by no query


@pytest.mark.parametrize("num_queries, num_keys", [(3, 5), (0, 5), (3, 0)])
def test_no_query_seeing_a_key_still_gives_zero_gradients(num_queries, num_keys):
    # Every range empty (or no queries, or no keys): the output used to be a fresh zero tensor
    # outside the graph, so backward raised "does not require grad" (the Triton path gives
    # zero gradients) and q, k, v got None instead of zeros.
    q, kk, v = (t.requires_grad_() for t in _qkv(torch.Generator().manual_seed(5), 2, num_queries,
                                                  num_keys, dtype=torch.float32))
    start = torch.full((2, num_queries), 4, dtype=torch.int32)
    end = torch.full((2, num_queries), 2, dtype=torch.int32)  # end < start: empty everywhere
    out = patch_cross_attention(q, kk, v, start, end, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype and (out == 0).all()
    grads = torch.autograd.grad(out, (q, kk, v), torch.ones_like(out))
    for grad, t in zip(grads, (q, kk, v), strict=True):
        assert grad.shape == t.shape and (grad == 0).all()


def test_gradcheck_float64():
    start, end, num_queries, num_keys = _model_ranges(9, "encoder", 2, 1, batch=1, num_patches=4)
    q, kk, v = (
        t.requires_grad_()
        for t in _qkv(
            torch.Generator().manual_seed(4), 1, num_queries, num_keys, heads=1, head_dim=3
        )
    )
    assert (end <= start).any() and (end > start).any()  # empty and non-empty ranges
    assert torch.autograd.gradcheck(
        lambda *t: reference.patch_cross_attention_reference(*t, start, end), (q, kk, v)
    )


def test_gradcheck_grouped_kv_heads_float64():
    start, end, num_queries, num_keys = _model_ranges(9, "decoder", 2, 2, batch=1, num_patches=4)
    q, kk, v = (t.requires_grad_() for t in _qkv(torch.Generator().manual_seed(8), 1, num_queries,
                                                  num_keys, heads=4, head_dim=3, kv_heads=2))
    assert torch.autograd.gradcheck(
        lambda *t: reference.patch_cross_attention_reference(*t, start, end), (q, kk, v)
    )


def test_half_inputs_keep_dtype():
    start, end, num_queries, num_keys = _model_ranges(6, "encoder", 1, 2)
    q, kk, v = _qkv(
        torch.Generator().manual_seed(6), 2, num_queries, num_keys, dtype=torch.bfloat16
    )
    out = patch_cross_attention(q, kk, v, start, end)
    assert out.dtype == torch.bfloat16
    expected = dense_attention(q, kk, v, range_mask(start, end, num_keys))
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_keys_on_another_device_than_the_queries_are_named(backend, monkeypatch):
    # k or v on another device (meta stands for CUDA here) got PyTorch's SDPA device error, or
    # with backend="triton" and q on CUDA: "backend='triton' on CPU tensors needs
    # TRITON_INTERPRET=1", which blamed the wrong thing.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 5, 2, 8)
    ranges = torch.zeros(1, 4, dtype=torch.int32)
    for keys, values in ((k.to("meta"), k), (k, k.to("meta"))):
        with pytest.raises(ValueError, match=r"q, k, v must be on one device, got cpu, "):
            patch_cross_attention(q, keys, values, ranges, ranges, backend=backend)


def test_rejects_bad_inputs():
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 5, 2, 8)
    ranges = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key_start must be \[B, Sq\]"):
        patch_cross_attention(q, k, k, ranges[:, :3], ranges)
    for kv_heads in (3, 0):  # key/value heads that do not divide q's 2 heads
        kv = torch.randn(1, 5, kv_heads, 8)
        with pytest.raises(ValueError, match=f"k/v have {kv_heads} heads, which do not divide "
                                             "q's 2 heads"):
            patch_cross_attention(q, kv, kv, ranges, ranges)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        patch_cross_attention(q, k, torch.randn(1, 5, 1, 8), ranges, ranges)
    with pytest.raises(TypeError, match="integer"):
        patch_cross_attention(q, k, k, ranges.float(), ranges)
    # Heads without channels divided by sqrt(0) for the default scale: a ZeroDivisionError.
    with pytest.raises(ValueError, match=r"q, k, v have head dim 0 \(shape \(1, 4, 2, 0\)\)"):
        patch_cross_attention(q[..., :0], k[..., :0], k[..., :0], ranges, ranges)
    # A bool mask passed by mistake was read as ranges of 0 and 1 without a word.
    with pytest.raises(TypeError, match=r"key_end must be an integer tensor, got torch.bool"):
        patch_cross_attention(q, k, k, ranges, ranges.bool())
