"""Sliding-window causal attention: both PyTorch paths (the CPU one that merges a causal and an
earlier block per chunk, and the any-device range attention) against a dense masked reference,
forward and backward, without and with packed documents, and the backend choice (flash-attn on
CUDA half precision, PyTorch otherwise)."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_lst.models import local_attention, sliding_window_cpu
from megatron_lst.models.local_attention import (
    SlidingWindowAttention,
    flash_attn_available,
    range_sliding_window,
    resolve_local_attention_backend,
    sliding_window_sdpa,
)
from megatron_lst.models.sliding_window_cpu import sliding_window_attention_cpu

PATHS = {
    "sdpa": sliding_window_sdpa,  # dispatches: CPU path for N > W on CPU
    "cpu": sliding_window_attention_cpu,
    "range": range_sliding_window,
}


def dense_sliding_window(q, k, v, window):
    """O(N^2) reference: token i attends j with 0 <= i - j < window. [B, N, H, d]."""
    n = q.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    visible = (i - j >= 0) & (i - j < window)  # [N, N]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_tokens,window", [(5, 8), (8, 8), (9, 8), (16, 4), (23, 4), (40, 1), (33, 7)])
def test_matches_dense(path, num_tokens, window):
    generator = torch.Generator().manual_seed(num_tokens * 100 + window)
    q, k, v = (torch.randn(2, num_tokens, 3, 8, generator=generator, requires_grad=True) for _ in range(3))
    out = PATHS[path](q, k, v, window)
    expected = dense_sliding_window(q, k, v, window)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, (q, k, v), grad, materialize_grads=True)  # W=1: q, k unused
    want = torch.autograd.grad(expected, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,window,chunk", [(23, 8, 3), (17, 5, 2), (9, 4, 1), (30, 7, 4)])
def test_query_chunks_shorter_than_the_window(monkeypatch, num_tokens, window, chunk):
    """C < W: the CPU path's earlier blocks are partly masked, partly clipped at 0."""
    monkeypatch.setattr(sliding_window_cpu, "QUERY_CHUNK", chunk)
    test_matches_dense("cpu", num_tokens, window)


def test_cpu_path_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(sliding_window_cpu, "QUERY_CHUNK", 3)
    generator = torch.Generator().manual_seed(7)
    inputs = tuple(torch.randn(1, 11, 2, 4, generator=generator, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: sliding_window_attention_cpu(q, k, v, 5), inputs)


def test_cpu_path_bfloat16_close_to_fp32():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 4, 32, generator=generator) for _ in range(3))
    want = sliding_window_attention_cpu(q, k, v, 64)
    got = sliding_window_attention_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), 64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_cpu_falls_back_to_sdpa():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_local_attention_backend("auto", q) == "sdpa"
    assert resolve_local_attention_backend("sdpa", q) == "sdpa"
    with pytest.raises(RuntimeError, match="flash"):
        resolve_local_attention_backend("flash", q)
    with pytest.raises(ValueError, match="not one of"):
        resolve_local_attention_backend("xformers", q)


def test_auto_leaves_flash_attn_for_heads_wider_than_it_takes(monkeypatch):
    # flash-attn 2 raises for heads over 256 channels (possible with --local-*-kv-channels): "auto"
    # chose it anyway on CUDA. A stand-in for a CUDA tensor: only its device, dtype and shape count.
    monkeypatch.setattr(local_attention, "flash_attn_failure", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))

    def cuda_query(head_dim):
        return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                               shape=(1, 8, 2, head_dim))

    assert resolve_local_attention_backend("auto", cuda_query(256)) == "flash"
    assert resolve_local_attention_backend("auto", cuda_query(320)) == "sdpa"
    with pytest.raises(RuntimeError, match="heads of at most 256 .*head dim 320"):
        resolve_local_attention_backend("flash", cuda_query(320))


def test_a_module_resolves_its_backend_once_per_device_dtype_and_head_size(monkeypatch):
    # Was: resolved on every forward (on CUDA, a query of the GPU's compute capability each time).
    calls = []
    resolve = local_attention.resolve_local_attention_backend
    monkeypatch.setattr(local_attention, "resolve_local_attention_backend",
                        lambda requested, q, *label: calls.append((q.dtype, q.shape[-1]))
                        or resolve(requested, q, *label))
    attention = SlidingWindowAttention(window=4, backend="auto")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=generator) for _ in range(3))
    first = attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), first, atol=0, rtol=0)
    assert calls == [(torch.float32, 8)]
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    wide = torch.randn(1, 12, 2, 16, generator=generator)
    attention(wide, wide, wide)
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert calls == [(torch.float32, 8), (torch.bfloat16, 8), (torch.float32, 16)]
    # An explicit choice that cannot run raises at every forward, not once.
    flash = SlidingWindowAttention(window=4, backend="flash")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="flash"):
            flash(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed")
def test_flash_matches_sdpa_on_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    flash = SlidingWindowAttention(window=64, backend="flash")(q, k, v)
    reference = sliding_window_sdpa(q.float(), k.float(), v.float(), 64)
    torch.testing.assert_close(flash.float(), reference, atol=2e-2, rtol=2e-2)


# --- packed documents -------------------------------------------------------------------------

EOS = 2


def packed_tokens(document_lengths: list[list[int]], generator) -> torch.Tensor:
    """`[B, N]` rows of documents of the given lengths, each ending with EOS (ids 3..9 inside)."""
    rows = []
    for lengths in document_lengths:
        row = []
        for length in lengths:
            row += torch.randint(3, 10, (length - 1,), generator=generator).tolist() + [EOS]
        rows.append(row)
    return torch.tensor(rows)


def dense_document_window(q, k, v, tokens, window):
    """O(N^2) reference from the rule (`patching.document_rule`): token i attends j with
    0 <= i - j < W in the same document. [B, N, H, d] in float64."""
    from patching.document_rule import self_attention_mask

    visible = self_attention_mask(tokens, EOS, window)  # [B, N, N]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


DOCUMENT_ROWS = [[[5, 17, 1, 9], [3, 3, 20, 6]], [[12, 12, 2, 10], [30, 6]], [[1, 1, 34], [2, 2, 32]]]


@pytest.mark.parametrize("path,chunk", [("sdpa", 128), ("cpu", 3), ("range", 128)])
@pytest.mark.parametrize("window", [1, 4, 40])
@pytest.mark.parametrize("rows", DOCUMENT_ROWS)
def test_documents_match_dense(monkeypatch, path, chunk, window, rows):
    """Windows shorter and longer than the documents, document starts inside and at the edges
    of the CPU path's query chunks; the key starts come from the package's helpers."""
    from lst_kernels import document_starts, sliding_window_key_starts

    monkeypatch.setattr(sliding_window_cpu, "QUERY_CHUNK", chunk)
    generator = torch.Generator().manual_seed(window * 7 + chunk)
    tokens = packed_tokens(rows, generator)
    key_start = sliding_window_key_starts(document_starts(tokens, EOS)[:, :-1], window)
    q, k, v = (torch.randn(*tokens.shape, 2, 8, generator=generator, requires_grad=True)
               for _ in range(3))
    out = PATHS[path](q, k, v, window, key_start)
    expected = dense_document_window(q, k, v, tokens, window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, (q, k, v), grad, materialize_grads=True)
    want = torch.autograd.grad(expected, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-5)


def test_documents_cpu_path_gradcheck_float64(monkeypatch):
    from lst_kernels import document_starts, sliding_window_key_starts

    monkeypatch.setattr(sliding_window_cpu, "QUERY_CHUNK", 3)
    tokens = packed_tokens([[4, 1, 6], [2, 9]], torch.Generator().manual_seed(1))
    key_start = sliding_window_key_starts(document_starts(tokens, EOS)[:, :-1], 5)
    generator = torch.Generator().manual_seed(7)
    inputs = tuple(torch.randn(2, 11, 2, 4, generator=generator, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: sliding_window_attention_cpu(q, k, v, 5, key_start), inputs)


def test_cpu_path_builds_its_chunks_and_masks_once_per_forward_and_backward(monkeypatch):
    """The backward reads the query chunks and per-row masks the forward built (host work that
    ran twice per layer and training step) and still matches the dense reference."""
    monkeypatch.setattr(sliding_window_cpu, "QUERY_CHUNK", 3)
    built = []
    make_chunks = sliding_window_cpu._chunks
    monkeypatch.setattr(sliding_window_cpu, "_chunks",
                        lambda *args: built.append(args[0]) or make_chunks(*args))
    test_documents_match_dense(monkeypatch, "cpu", 3, 4, DOCUMENT_ROWS[0])
    assert built == [sum(DOCUMENT_ROWS[0][0])]  # one row length; not built again by backward


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed")
def test_flash_varlen_documents_match_range_attention_on_gpu():
    from lst_kernels import document_starts, sliding_window_key_starts

    generator = torch.Generator().manual_seed(1)
    tokens = packed_tokens([[40, 100, 7, 153], [300]], generator).cuda()
    key_start = sliding_window_key_starts(document_starts(tokens, EOS)[:, :-1], 64)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=generator).cuda().bfloat16() for _ in range(3))
    flash = SlidingWindowAttention(window=64, backend="flash")(q, k, v, key_start)
    reference = range_sliding_window(q.float(), k.float(), v.float(), 64, key_start)
    torch.testing.assert_close(flash.float(), reference, atol=2e-2, rtol=2e-2)
