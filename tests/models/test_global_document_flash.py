"""The global transformer's packed-document attention on flash-attn, and the kernel backend of
every range attention.

flash-attn is never installed here: `fake_flash_attn` stands in for flash-attn 2 (its documented
varlen semantics and input checks, computed densely), and half-precision CPU inputs are taken as
inputs flash-attn can run (on a GPU: CUDA fp16/bf16, what `resolve_local_attention_backend`
checks). On that branch `CausalSDPAttention` must give the range attention's outputs and
gradients with ragged documents and grouped-query heads (passed to flash-attn uncopied), in a
whole model of several global layers whose documents are read to the host once per forward.
The meta device stands in for CUDA where a test needs the range attention off CPU: only the
device type decides the path, and the calls it makes are recorded, not computed.
"""

import dataclasses
import sys

import pytest
import torch
from fake_flash_attn import module as fake_flash_module
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lst.models import build_model, global_attention, local_attention, local_layers
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.models.global_attention import CausalSDPAttention
from megatron_lst.models.local_attention import SlidingWindowAttention

HALF = (torch.float16, torch.bfloat16)


def install_fake_flash(monkeypatch):
    """The fake installed as `flash_attn`; "auto" takes it for half-precision inputs."""
    fake = fake_flash_module()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    real_resolve = local_attention.resolve_local_attention_backend

    def resolve(requested, q, *label):
        if requested != "sdpa" and q.dtype in HALF:
            return "flash"
        return real_resolve(requested, q, *label)

    monkeypatch.setattr(local_attention, "resolve_local_attention_backend", resolve)
    return fake


@pytest.fixture
def fake_flash(monkeypatch):
    return install_fake_flash(monkeypatch)


def core_attention(heads: int, groups: int, head_dim: int, kernel_backend: str = "auto",
                   softmax_scale: float | None = None) -> CausalSDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim,
                               num_attention_heads=heads, num_query_groups=groups,
                               kv_channels=head_dim, attention_dropout=0.0)
    return CausalSDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", softmax_scale=softmax_scale,
                              kernel_backend=kernel_backend)


def document_key_starts(rows: list[list[int]]) -> torch.Tensor:
    """`[B, S]` first key of every position of rows packing documents of the given lengths."""
    return torch.stack([torch.cat([torch.full((n,), start) for n, start in
                                   zip(lengths, torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist(),
                                       strict=True)])
                        for lengths in rows])


# Ragged documents: one-position documents, one per row, documents at both ends.
ROWS = [[[5, 17, 1, 9], [3, 3, 20, 6]], [[32], [1, 1, 30]]]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_flash_document_attention_matches_range_attention(single_rank, fake_flash, rows, dtype,
                                                          atol):
    """4 query heads over 2 key/value heads, a non-default softmax scale: the flash branch's
    output and q, k, v gradients equal the range attention's in float64."""
    heads, groups, head_dim = 4, 2, 16
    scale = 0.3
    attention = core_attention(heads, groups, head_dim, softmax_scale=scale)
    key_start = document_key_starts(rows)  # [B, S]
    batch, seq_len = key_start.shape
    generator = torch.Generator().manual_seed(seq_len + len(rows[0]))
    q = torch.randn(seq_len, batch, heads, head_dim, generator=generator)
    k, v = (torch.randn(seq_len, batch, groups, head_dim, generator=generator) for _ in range(2))
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, attention_mask=key_start)  # [S, B, H*d]
    assert out.dtype == dtype and out.shape == (seq_len, batch, heads * head_dim)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = attention(*exact, attention_mask=key_start)  # the CPU range attention
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(expected, exact, grad.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=4 * atol, rtol=0, msg=name)

    [(name, call)] = fake_flash.calls
    assert name == "flash_attn_varlen_func"
    assert call["causal"] and call["window_size"] == (-1, -1) and call["softmax_scale"] == scale
    assert call["heads"] == (heads, groups)  # flash-attn's GQA: no copy per query head
    bounds = [b * seq_len + start for b, lengths in enumerate(rows)
              for start in torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()]
    assert call["cu_seqlens_q"] == call["cu_seqlens_k"] == [*bounds, batch * seq_len]
    assert call["max_seqlen_q"] == max(max(lengths) for lengths in rows)


def test_flash_is_never_taken_on_cpu(single_rank, monkeypatch):
    """With flash-attn importable, CPU inputs still run the range attention: "auto" takes
    flash-attn on CUDA only."""
    fake = fake_flash_module()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    attention = core_attention(4, 2, 16)
    key_start = document_key_starts(ROWS[0])
    q = torch.randn(key_start.shape[1], 2, 4, 16).half()
    k = torch.randn(key_start.shape[1], 2, 2, 16).half()
    attention(q, k, k, attention_mask=key_start)
    assert fake.calls == []


def packed_model(kind: str, global_layers: int):
    """`kind` ("lst" or "baseline") in fp16 over packed documents, with grouped-query global
    layers (4 heads over 2 key/value heads), its local layers on PyTorch attention."""
    from model_cases import tiny_config
    from packed_document_cases import EOS

    config = tiny_config(token_window=6, patch_window=3)
    config = dataclasses.replace(
        config, documents=DocumentMaskingConfig(eos_id=EOS),
        global_model=dataclasses.replace(config.global_model, num_layers=global_layers,
                                         num_query_groups=2))
    torch.manual_seed(0)
    model = build_model(config, "static" if kind == "lst" else "none", config.transformer_config(),
                        transformer_impl="local", local_attention_backend="sdpa",
                        kernel_backend="torch")
    return model.half()


def logits_and_grads(model, tokens, patch_lengths):
    model.zero_grad()
    logits = model(tokens, patch_lengths).float()  # [B, N, V]
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad.float() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_a_model_on_flash_matches_range_attention_reading_documents_once(single_rank, monkeypatch,
                                                                         kind):
    """Four grouped-query global layers over rows of ragged documents: logits and every weight
    gradient on the flash branch equal the range attention's, every global layer ran flash-attn
    over the documents, and those were read to the host once for the forward, not per layer."""
    from host_syncs import record_host_syncs, syncs_in
    from packed_document_cases import packed_batch

    global_layers = 4
    tokens, _, patch_lengths = packed_batch("static", [3, 5], seed=7)
    # Range attention on CPU; then the same weights (same seed) taking flash-attn.
    logits, grads = logits_and_grads(packed_model(kind, global_layers), tokens, patch_lengths)
    fake = install_fake_flash(monkeypatch)
    model = packed_model(kind, global_layers)
    with record_host_syncs() as syncs:
        flash_logits, flash_grads = logits_and_grads(model, tokens, patch_lengths)
    torch.testing.assert_close(flash_logits, logits, atol=2e-3, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(flash_grads[name], grad, rtol=0,
                                   atol=1e-2 * grad.abs().max().item(), msg=name)
    assert len(fake.calls) == global_layers
    assert {call["heads"] for _, call in fake.calls} == {(4, 2)}
    assert len({str(call["cu_seqlens_q"]) for _, call in fake.calls}) == 1
    assert len(fake.calls[0][1]["cu_seqlens_q"]) > 1 + tokens.shape[0]  # documents cut the rows
    # `VarlenSequences.of` reads them (the one sync in local_attention.py); global_attention.py's
    # own read, whether a CPU row has documents at all, never runs on CUDA.
    assert syncs_in(syncs, "megatron_lst/models/local_attention.py") == 1, syncs



@pytest.mark.parametrize("kernel_backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_the_kernel_backend_reaches_every_range_attention(single_rank, monkeypatch, kind,
                                                          kernel_backend):
    """`build_model(kernel_backend=...)`, as lst-train's --kernel-backend: the global
    packed-document attention and the local windows (also their generation step) call
    `patch_cross_attention` with it; they ran it under "auto" whatever the flag said. "auto"
    stays "auto", where LST_KERNEL_BACKEND decides."""
    from model_cases import tiny_config

    calls = []

    def recording(q, k, v, key_start, key_end, scale=None, backend="auto"):
        calls.append(backend)
        return torch.zeros_like(q)

    for module in (global_attention, local_attention, local_layers):
        monkeypatch.setattr(module, "patch_cross_attention", recording)
    config = dataclasses.replace(tiny_config(), documents=DocumentMaskingConfig(eos_id=2))
    model = build_model(config, "static" if kind == "lst" else "none", config.transformer_config(),
                        transformer_impl="local", kernel_backend=kernel_backend)
    meta = torch.device("meta")
    key_start = torch.zeros(2, 8, dtype=torch.long, device=meta)  # [B, S]
    global_layers = [m for m in model.modules() if isinstance(m, CausalSDPAttention)]
    assert len(global_layers) == config.global_model.num_layers
    for attention in global_layers:
        q = torch.empty(8, 2, 4, 16, device=meta)  # [S, B, H, d]
        attention._document_attention(q, q, q, key_start, dropout=0.0)
    windows = [m for m in model.modules() if isinstance(m, SlidingWindowAttention)]
    assert len(windows) == (0 if kind == "baseline" else
                            config.encoder.num_layers + config.decoder.num_layers)
    for window in windows:
        q = torch.empty(2, 8, 2, 16, device=meta)  # [B, N, H, d]
        window(q, q, q, key_start)
    steps = [m for m in model.modules() if isinstance(m, local_layers.LocalSelfAttention)][:1]
    for layer in steps:
        x = torch.zeros(1, 1, config.encoder.hidden_size)
        rope = (torch.ones(1, 1, 1, config.encoder.head_dim),) * 2
        layer.forward_step(x, rope, local_layers.SlidingKVCache(config.encoder.window))
    assert calls == [kernel_backend] * (len(global_layers) + len(windows) + len(steps))


@pytest.mark.gpu
@pytest.mark.skipif(not local_attention.flash_attn_available(), reason="flash-attn is not installed")
def test_flash_document_attention_matches_range_attention_on_gpu(single_rank):
    """The real flash-attn in bf16 against the Triton range kernel in fp32 (which "auto" keeps
    for fp32 inputs), 8 query heads over 2 key/value heads, ragged documents."""
    rows = [[40, 100, 7, 153], [300]]
    key_start = document_key_starts(rows).cuda()  # [2, 300]
    attention = core_attention(8, 2, 64)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(300, 2, 8, 64, generator=generator).cuda()
    k, v = (torch.randn(300, 2, 2, 64, generator=generator).cuda() for _ in range(2))
    flash = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attention_mask=key_start)
    reference = attention(q, k, v, attention_mask=key_start)  # [S, B, H*d]
    torch.testing.assert_close(flash.float(), reference, atol=2e-2, rtol=2e-2)
