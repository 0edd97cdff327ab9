"""The flash-attn path of the local sliding-window attention, on CPU.

flash-attn is never installed here, so `fake_flash_attn` stands in for it: flash-attn 2's
`flash_attn_func` / `flash_attn_varlen_func` with their documented semantics (bottom-right causal
alignment, `window_size=(left, right)`, GQA head counts) and input checks (fp16/bf16 only, int32
contiguous `cu_seqlens` from 0 to the token count, `max_seqlen` covering the longest sequence,
`[total, H, d]` varlen inputs), computed densely. With the "flash" backend forced, the wiring
(`flash_sliding_window`: the window size, the documents of every row as varlen sequences) must
give the PyTorch path's outputs and gradients on packed rows, for windows shorter and longer than
the documents, in a grouped-query layer and in a whole LST model. "auto" passes over a flash-attn
that is installed but does not import (a build for another torch) and GPUs older than it takes
(Ampere), which an explicit "flash" names; likewise a Transformer Engine that does not import.
"""

import sys

import pytest
import torch
from fake_flash_attn import module as fake_flash_module
from lst_kernels import document_starts, sliding_window_key_starts

from megatron_lst.models import local_attention, optional_imports, specs
from megatron_lst.models.config import LocalModelConfig
from megatron_lst.models.local_attention import (
    SlidingWindowAttention,
    flash_sliding_window,
    resolve_local_attention_backend,
    sliding_window_sdpa,
)
from megatron_lst.models.local_layers import LocalSelfAttention
from megatron_lst.models.rope import RotaryTable

EOS = 2


@pytest.fixture
def fake_flash(monkeypatch):
    """The fake installed as `flash_attn`, and the flash backend taken on CPU tensors."""
    fake = fake_flash_module()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    real_resolve = resolve_local_attention_backend
    monkeypatch.setattr(local_attention, "resolve_local_attention_backend",
                        lambda requested, q, *label: "flash" if requested == "flash"
                        else real_resolve(requested, q, *label))
    return fake


def packed_row(lengths: list[int], generator) -> torch.Tensor:
    """One row of documents of the given lengths, each ending with EOS."""
    row = []
    for length in lengths:
        row += torch.randint(3, 10, (length - 1,), generator=generator).tolist() + [EOS]
    return torch.tensor(row)


def key_starts(tokens: torch.Tensor, window: int) -> torch.Tensor:
    return sliding_window_key_starts(document_starts(tokens, EOS)[:, :-1], window)


def qkv(shape, dtype, generator):
    return tuple(torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
                 for _ in range(3))


def assert_flash_matches_pytorch(q, k, v, window, key_start, atol):
    """Forward and backward of the forced flash path against the PyTorch path in float64."""
    out = SlidingWindowAttention(window, backend="flash")(q, k, v, key_start)
    assert out.dtype == q.dtype and out.shape == q.shape
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = sliding_window_sdpa(q64, k64, v64, window, key_start)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    # W = 1: the PyTorch path returns v (q and k get no gradient, i.e. zeros)
    want = torch.autograd.grad(expected, (q64, k64, v64), grad.double(), materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=atol * 4, rtol=0)


# (row lengths of documents, window): windows shorter and longer than the documents, one-token
# documents, documents at both ends, the window of one token.
DOCUMENT_CASES = [
    ([[5, 17, 1, 9], [3, 3, 20, 6]], 4),
    ([[12, 12, 2, 10], [30, 6]], 40),
    ([[1, 1, 34], [2, 2, 32]], 7),
    ([[36], [20, 16]], 16),
    ([[4, 32], [8, 28]], 1),
]


@pytest.mark.parametrize("rows,window", DOCUMENT_CASES)
def test_varlen_documents_match_the_pytorch_path(fake_flash, rows, window):
    generator = torch.Generator().manual_seed(window)
    tokens = torch.stack([packed_row(lengths, generator) for lengths in rows])  # [B, 36]
    key_start = key_starts(tokens, window)
    q, k, v = qkv((*tokens.shape, 2, 16), torch.float16, generator)
    assert_flash_matches_pytorch(q, k, v, window, key_start, atol=4e-3)

    [(name, call)] = fake_flash.calls
    assert name == "flash_attn_varlen_func"
    assert call["causal"] and call["window_size"] == (window - 1, 0)
    num_tokens = tokens.shape[1]
    document_bounds = [b * num_tokens + start for b, lengths in enumerate(rows)
                       for start in torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()]
    if window == 1:  # every token is its own sequence: the same attention, cut finer
        document_bounds = list(range(tokens.numel()))
    assert call["cu_seqlens_q"] == call["cu_seqlens_k"] == [*document_bounds, tokens.numel()]
    longest = max(max(lengths) for lengths in rows) if window > 1 else 1
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == longest


@pytest.mark.parametrize("num_tokens,window", [(9, 4), (8, 8), (6, 20), (40, 1)])
def test_single_document_rows_use_the_windowed_kernel(fake_flash, num_tokens, window):
    generator = torch.Generator().manual_seed(num_tokens)
    q, k, v = qkv((2, num_tokens, 3, 8), torch.float16, generator)
    assert_flash_matches_pytorch(q, k, v, window, None, atol=4e-3)
    [(name, call)] = fake_flash.calls
    assert name == "flash_attn_func"
    assert call["causal"] and call["window_size"] == (window - 1, 0)
    assert call["dropout_p"] == 0.0 and call["softmax_scale"] is None  # 1/sqrt(d), as sdpa


def test_bfloat16_documents(fake_flash):
    generator = torch.Generator().manual_seed(2)
    tokens = packed_row([7, 1, 24], generator)[None]
    q, k, v = qkv((1, 32, 2, 32), torch.bfloat16, generator)
    assert_flash_matches_pytorch(q, k, v, 8, key_starts(tokens, 8), atol=3e-2)


@pytest.mark.parametrize("documents", [False, True])
def test_grouped_query_layer_on_flash_matches_sdpa(fake_flash, documents):
    """A layer with 4 query heads over 2 key/value heads of 8 channels (not hidden / heads):
    the same outputs and weight gradients on the flash and the PyTorch backends."""
    config = LocalModelConfig(hidden_size=24, num_layers=1, num_heads=4, ffn_hidden_size=32,
                              window=6, num_query_groups=2, kv_channels=8)
    generator = torch.Generator().manual_seed(11)
    layers = {}
    for backend in ("flash", "sdpa"):
        torch.manual_seed(0)
        layers[backend] = LocalSelfAttention(config, attention_backend=backend).half()
    tokens = torch.stack([packed_row([3, 9, 8], generator), packed_row([20], generator)])
    key_start = key_starts(tokens, config.window) if documents else None
    x = torch.randn(2, 20, 24, generator=generator).half()
    rope = RotaryTable(8, 10000.0).cos_sin(20, "cpu")
    outputs = {}
    for backend, layer in layers.items():
        layer.zero_grad()
        outputs[backend] = layer(x, rope, key_start)
        outputs[backend].float().square().sum().backward()
    torch.testing.assert_close(outputs["flash"], outputs["sdpa"], atol=4e-3, rtol=0)
    for (name, flash), (_, sdpa) in zip(layers["flash"].named_parameters(),
                                        layers["sdpa"].named_parameters(), strict=True):
        torch.testing.assert_close(flash.grad, sdpa.grad, atol=3e-2, rtol=1e-2, msg=name)
    # flash-attn reads the 2 key/value heads as they are (its GQA), no copies per query head
    assert [call["heads"] for _, call in fake_flash.calls] == [(4, 2)]


def test_lst_model_on_flash_matches_sdpa_on_packed_documents(single_rank, fake_flash):
    """A whole LST model in fp16 on rows packing documents, the local encoder and decoder with
    different windows: logits and every weight gradient of the flash backend equal the PyTorch
    backend's, each local layer ran flash-attn's varlen kernel with its own window, and the
    varlen sequences are the documents of the rows."""
    import dataclasses

    from model_cases import tiny_config
    from packed_document_cases import EOS as DOCUMENT_EOS
    from packed_document_cases import packed_batch

    from megatron_lst.models.config import DocumentMaskingConfig
    from megatron_lst.models.lst_model import LSTModel

    config = tiny_config(token_window=6, patch_window=3)
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, window=9),
                                 documents=DocumentMaskingConfig(eos_id=DOCUMENT_EOS))
    tokens, _, patch_lengths = packed_batch("mixed", [3, 2], seed=3)  # [2, N]
    results = {}
    for backend in ("flash", "sdpa"):
        torch.manual_seed(0)
        model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                         local_attention_backend=backend, kernel_backend="torch").half()
        logits = model(tokens, patch_lengths)  # [B, N, V]
        logits.float().square().sum().backward()
        results[backend] = (logits.float(), {name: p.grad.float()
                                             for name, p in model.named_parameters()})
    (flash_logits, flash_grads), (logits, grads) = results["flash"], results["sdpa"]
    torch.testing.assert_close(flash_logits, logits, atol=2e-3, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(flash_grads[name], grad, rtol=0,
                                   atol=1e-2 * grad.abs().max().item(), msg=name)

    layers = config.encoder.num_layers + config.decoder.num_layers
    assert len(fake_flash.calls) == layers
    assert {call["window_size"] for _, call in fake_flash.calls} == {(5, 0), (8, 0)}
    num_tokens = tokens.shape[1]
    starts = [b * num_tokens + i for b in range(2) for i in range(num_tokens)
              if i == 0 or tokens[b, i - 1] == DOCUMENT_EOS]
    for _, call in fake_flash.calls:
        assert call["cu_seqlens_q"] == [*starts, tokens.numel()]


def test_the_fake_refuses_what_flash_attn_refuses(fake_flash):
    """The checks the comparisons above rely on: fp32 inputs and int64 offsets are refused."""
    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        flash_sliding_window(q, q, q, 2)
    half = torch.zeros(8, 1, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="int32"):
        fake_flash.flash_attn_varlen_func(half, half, half, torch.tensor([0, 8]),
                                          torch.tensor([0, 8]), 8, 8, causal=True)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        fake_flash.flash_attn_varlen_func(half, half, half, torch.tensor([0, 8]).int(),
                                          torch.tensor([0, 8]).int(), 4, 4, causal=True)


def test_the_fake_aligns_causal_masks_bottom_right(fake_flash):
    """flash-attn's documented example: 2 queries over 5 keys see keys 0-3 and 0-4."""
    q = torch.randn(1, 2, 1, 8).half()
    k, v = torch.randn(1, 5, 1, 8).half(), torch.eye(5, 8)[None, :, None].half()
    out = fake_flash.flash_attn_func(q, k, v, causal=True)  # [1, 2, 1, 8]
    assert out[0, 0, 0, 4] == 0 and out[0, 0, 0, :4].sum() > 0.99
    assert out[0, 1, 0, 4] > 0


# --- installed but not importable ------------------------------------------------------------

def broken_package(tmp_path, monkeypatch, name: str, error: str) -> None:
    """A package `name` that is found (find_spec) but raises `error` when imported."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    optional_imports.import_failure.cache_clear()


@pytest.fixture
def fresh_import_checks():
    optional_imports.import_failure.cache_clear()
    yield
    optional_imports.import_failure.cache_clear()


@pytest.fixture
def hopper(monkeypatch):
    """CUDA device 0 reports compute capability 9.0 (an H100)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))


def cuda_query(head_dim=64):
    """Stands in for a CUDA bf16 tensor: only device, dtype and shape are read."""
    from types import SimpleNamespace

    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                           shape=(1, 8, 2, head_dim))


def test_auto_passes_over_a_flash_attn_that_does_not_import(tmp_path, monkeypatch, hopper,
                                                            fresh_import_checks, caplog):
    # Was: find_spec found the package, "auto" chose flash and the first forward raised.
    broken_package(tmp_path, monkeypatch, "flash_attn",
                   "ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')")
    assert resolve_local_attention_backend("auto", cuda_query()) == "sdpa"
    assert "undefined symbol" in caplog.text
    with pytest.raises(RuntimeError, match="flash-attn is installed but does not import "
                                           r"\(ImportError: .*undefined symbol"):
        resolve_local_attention_backend("flash", cuda_query())


def test_flash_attn_that_imports_is_chosen_and_an_absent_one_is_not(monkeypatch, hopper,
                                                                     fresh_import_checks):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module())
    assert resolve_local_attention_backend("auto", cuda_query()) == "flash"
    optional_imports.import_failure.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ModuleNotFoundError
    assert resolve_local_attention_backend("auto", cuda_query()) == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        resolve_local_attention_backend("flash", cuda_query())


def test_auto_passes_over_gpus_older_than_flash_attn_takes(monkeypatch, fresh_import_checks):
    """flash-attn 2 raises "FlashAttention only supports Ampere GPUs or newer" at its first call:
    "auto" chose it on a V100 or T4 all the same."""
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert resolve_local_attention_backend("auto", cuda_query()) == "sdpa"
    with pytest.raises(RuntimeError, match=r"compute capability 8.0 or newer \(got device "
                                           r"cuda:0, compute capability 7.5"):
        resolve_local_attention_backend("flash", cuda_query())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert resolve_local_attention_backend("auto", cuda_query()) == "flash"


def test_auto_passes_over_a_transformer_engine_that_does_not_import(tmp_path, monkeypatch,
                                                                    fresh_import_checks):
    broken_package(tmp_path, monkeypatch, "transformer_engine",
                   "OSError('libtransformer_engine.so: cannot open shared object file')")
    monkeypatch.setattr(specs.torch.cuda, "is_available", lambda: True)
    assert specs.resolve_transformer_impl("auto") == "local"
    with pytest.raises(RuntimeError, match="transformer_engine is installed but does not import "
                                           r"\(OSError: libtransformer_engine"):
        specs.resolve_transformer_impl("transformer_engine")
    assert specs.resolve_transformer_impl("local") == "local"


@pytest.mark.parametrize("decoder_layers,num_documents", [(2, [2, 1]), (5, [6, 4])])
def test_flash_documents_are_read_to_the_host_once_per_batch(single_rank, fake_flash,
                                                             decoder_layers, num_documents):
    """flash-attn's varlen interface takes the document count and the longest document on the
    host. They are read once per forward, for all local layers, whatever the number of layers
    or documents: not once (or twice) in every layer, each read a GPU sync on CUDA."""
    import dataclasses

    from host_syncs import record_host_syncs, syncs_in
    from model_cases import tiny_config
    from packed_document_cases import EOS as DOCUMENT_EOS
    from packed_document_cases import packed_batch

    from megatron_lst.models.config import DocumentMaskingConfig
    from megatron_lst.models.lst_model import LSTModel

    config = tiny_config(token_window=6, patch_window=3)
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, num_layers=decoder_layers),
        documents=DocumentMaskingConfig(eos_id=DOCUMENT_EOS))
    tokens, _, patch_lengths = packed_batch("static", num_documents, seed=4)
    torch.manual_seed(0)
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend="flash", kernel_backend="torch").half()
    with record_host_syncs() as syncs:
        model(tokens, patch_lengths).float().sum().backward()
    assert len(fake_flash.calls) == config.encoder.num_layers + decoder_layers
    assert syncs_in(syncs, "megatron_lst/models/local_attention.py",
                    "megatron_lst/models/documents.py") == 1, syncs
