"""Grouped key/value heads reach the PyTorch attention paths as they are: the local sliding-window
attention (plain causal SDPA, the CPU two-block path, range attention), a local layer's
incremental decoding and the global block's packed-document attention give the outputs and
gradients of the same attention on key/value heads repeated to one per query head, and none of
them repeats the heads on the way (`repeat_interleave` and `repeat` raise while they run)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lst.models.config import LocalModelConfig
from megatron_lst.models.global_attention import CausalSDPAttention
from megatron_lst.models.local_attention import SlidingWindowAttention, range_sliding_window
from megatron_lst.models.local_layers import LocalSelfAttention, SlidingKVCache
from megatron_lst.models.rope import RotaryTable

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 6, 2, 8, 8
GROUP = HEADS // KV_HEADS
# Document starts of two packed rows of 30 tokens.
DOCUMENT_STARTS = ([0, 11, 19], [0, 25])


@contextlib.contextmanager
def no_head_copies():
    """Fail any call that would repeat key/value heads (`repeat_interleave`, `repeat`)."""
    def refuse(*args, **kwargs):
        raise AssertionError("key/value heads copied")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "repeat_interleave", refuse)
        patch.setattr(torch, "repeat_interleave", refuse)
        patch.setattr(torch.Tensor, "repeat", refuse)
        yield


def document_key_start(num_tokens: int, window: int) -> torch.Tensor:
    """`[2, N]` int64: `max(i - W + 1, start of i's document)` for `DOCUMENT_STARTS`."""
    positions = torch.arange(num_tokens)
    rows = []
    for starts in DOCUMENT_STARTS:
        document_start = torch.tensor(starts)[torch.searchsorted(torch.tensor(starts), positions,
                                                                 right=True) - 1]
        rows.append(torch.maximum(positions - window + 1, document_start))
    return torch.stack(rows)


def grouped_and_copied(attend, q, k, v, copies_allowed: bool = False):
    """`attend` on the G key/value heads (no copy allowed unless `copies_allowed`) and on them
    repeated to H: outputs and gradients of both, the copied k's and v's summed back over each
    group."""
    grad = torch.randn(attend(q, k, v).shape, generator=torch.Generator().manual_seed(1),
                       dtype=q.dtype)
    grouped = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    copied = [q.detach().clone(), *(t.detach().repeat_interleave(GROUP, dim=2) for t in (k, v))]
    copied = [t.requires_grad_() for t in copied]
    with contextlib.nullcontext() if copies_allowed else no_head_copies():
        out = attend(*grouped)
        got = torch.autograd.grad(out, grouped, grad)
    expected = attend(*copied)
    want = torch.autograd.grad(expected, copied, grad)
    want = (want[0], *(g.unflatten(2, (KV_HEADS, GROUP)).sum(3) for g in want[1:]))
    return (out, *got), (expected, *want)


def qkv(num_tokens: int, seed: int):
    """q `[2, N, H, d]`, k and v `[2, N, G, d]` in float64."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, num_tokens, heads, HEAD_DIM, generator=generator, dtype=torch.float64)
            for heads in (HEADS, KV_HEADS, KV_HEADS))


@pytest.mark.parametrize("path, num_tokens, documents", [
    ("sdpa", 6, False),  # a row within the window: the plain causal kernel (enable_gqa)
    ("sdpa", 30, False),  # past the window on CPU: the two-block CPU path
    ("sdpa", 30, True),
    ("range", 30, False),  # range attention, the Triton kernel's path on CUDA
    ("range", 30, True),
])
def test_local_attention_equals_copied_heads(path, num_tokens, documents):
    key_start = document_key_start(num_tokens, WINDOW) if documents else None
    if path == "sdpa":
        attention = SlidingWindowAttention(WINDOW, backend="sdpa")

        def attend(q, k, v):
            return attention(q, k, v, key_start)
    else:
        def attend(q, k, v):
            return range_sliding_window(q, k, v, WINDOW, key_start)

    got, want = grouped_and_copied(attend, *qkv(num_tokens, seed=num_tokens + documents))
    assert [t.shape[2] for t in got] == [HEADS, HEADS, KV_HEADS, KV_HEADS]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _global_attention(kv_heads: int) -> CausalSDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=kv_heads,
                               kv_channels=HEAD_DIM, attention_dropout=0.0)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return CausalSDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", pg_collection=one_rank)


def test_global_document_attention_equals_copied_heads():
    """The global block's packed-document path (on CPU the two-block flash path over window S)."""
    num_tokens = 30
    key_start = document_key_start(num_tokens, num_tokens)  # causal within the document
    modules = {KV_HEADS: _global_attention(KV_HEADS), HEADS: _global_attention(HEADS)}

    def attend(q, k, v):  # [B, S, heads, d] in, megatron's [S, B, ...] layout inside
        module = modules[k.shape[2]]
        out = module(*(t.transpose(0, 1) for t in (q, k, v)), key_start)  # [S, B, H*d]
        return out.transpose(0, 1)

    got, want = grouped_and_copied(attend, *qkv(num_tokens, seed=3))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_local_layer_decodes_without_copying_heads():
    """`forward_step` reads the cache's G heads as they are, and matches the full forward."""
    config = LocalModelConfig(hidden_size=24, num_layers=1, num_heads=HEADS, ffn_hidden_size=32,
                              window=WINDOW, num_query_groups=KV_HEADS, kv_channels=HEAD_DIM)
    torch.manual_seed(0)
    layer = LocalSelfAttention(config, attention_backend="sdpa").double()
    x = torch.randn(1, 13, 24, dtype=torch.float64)
    cos, sin = (t.double() for t in RotaryTable(HEAD_DIM, 100.0).cos_sin(13, "cpu"))
    with torch.no_grad(), no_head_copies():
        full = layer(x, (cos, sin))
        cache = SlidingKVCache(WINDOW)
        steps = [layer.forward_step(x[:, i:i + 1], (cos[:, i:i + 1], sin[:, i:i + 1]), cache)
                 for i in range(13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def _forward_without_gqa(real_forward):
    """PyTorch's CPU flash forward before it took grouped heads (pytorch#157893): query head j
    reads key/value head j through k's and v's strides whatever their head count, unchecked
    (emulated within their storage; past it, where that kernel read other memory, an error)."""
    def forward(q, k, v, *args, **kwargs):
        k, v = (t.as_strided((t.shape[0], q.shape[1], *t.shape[2:]), t.stride(),
                             t.storage_offset()) for t in (k, v))
        return real_forward(q, k, v, *args, **kwargs)

    return forward


def _backward_without_gqa(real_backward):
    """That kernel's backward, which would write dK/dV of H heads into G-head tensors."""
    def backward(grad_out, q, k, v, *args, **kwargs):
        if k.shape[1] != q.shape[1]:
            raise AssertionError(f"{k.shape[1]} key/value heads for {q.shape[1]} query heads: "
                                 "a kernel without GQA writes past dK and dV")
        return real_backward(grad_out, q, k, v, *args, **kwargs)

    return backward


@pytest.fixture
def cpu_kernel_without_gqa(monkeypatch):
    """The CPU path on the flash kernel of a PyTorch without GQA, its support probed afresh."""
    from megatron_lst.models import sliding_window_cpu

    monkeypatch.setattr(sliding_window_cpu, "_flash_forward",
                        _forward_without_gqa(sliding_window_cpu._flash_forward))
    monkeypatch.setattr(sliding_window_cpu, "_flash_backward",
                        _backward_without_gqa(sliding_window_cpu._flash_backward))
    sliding_window_cpu.flash_kernel_reads_grouped_heads.cache_clear()
    yield sliding_window_cpu
    sliding_window_cpu.flash_kernel_reads_grouped_heads.cache_clear()


def test_this_torch_cpu_flash_kernel_reads_grouped_heads():
    """torch 2.13's CPU flash kernel takes G heads (the probe of `sliding_window_cpu`)."""
    from megatron_lst.models.sliding_window_cpu import flash_kernel_reads_grouped_heads

    assert flash_kernel_reads_grouped_heads()


@pytest.mark.parametrize("documents", [False, True])
def test_a_cpu_flash_kernel_without_gqa_gets_one_head_per_query_head(cpu_kernel_without_gqa,
                                                                     documents):
    """On a PyTorch whose CPU flash kernel reads k and v by the query head (before its GQA), the
    CPU path (local windows and the global packed-document attention) gives that kernel k and v
    repeated to H heads: the outputs and gradients of grouped heads, not what lies past them."""
    assert not cpu_kernel_without_gqa.flash_kernel_reads_grouped_heads()
    num_tokens = 30
    key_start = document_key_start(num_tokens, WINDOW) if documents else None

    def attend(q, k, v):
        return cpu_kernel_without_gqa.sliding_window_attention_cpu(q, k, v, WINDOW, key_start)

    got, want = grouped_and_copied(attend, *qkv(num_tokens, seed=5), copies_allowed=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_a_cpu_flash_kernel_that_refuses_grouped_heads_lacks_gqa(monkeypatch):
    """A kernel that checks the head counts and raises is probed as one without GQA (the CPU path
    then repeats k and v), not an error out of the first attention call."""
    from megatron_lst.models import sliding_window_cpu

    def refusing(q, k, v, *args, **kwargs):
        raise RuntimeError(f"expected {q.shape[1]} key/value heads, got {k.shape[1]}")

    monkeypatch.setattr(sliding_window_cpu, "_flash_forward", refusing)
    sliding_window_cpu.flash_kernel_reads_grouped_heads.cache_clear()
    try:
        assert not sliding_window_cpu.flash_kernel_reads_grouped_heads()
    finally:
        sliding_window_cpu.flash_kernel_reads_grouped_heads.cache_clear()
