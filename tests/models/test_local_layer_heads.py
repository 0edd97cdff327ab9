"""Local self-attention with grouped key/value heads and a head size other than hidden / heads:
the layer computes dense grouped-query attention (query head h reads key/value head
`h // (H / G)`), and its incremental decoding (`forward_step` with a `SlidingKVCache`) gives the
full forward's outputs while the cache keeps only the G key/value heads."""

import math

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_lst.models.config import LocalModelConfig, ModelConfigError
from megatron_lst.models.local_layers import LocalSelfAttention, SlidingKVCache
from megatron_lst.models.rope import RotaryTable, apply_interleaved_rope
from megatron_lst.models.specs import local_layer_spec

HIDDEN, HEADS, GROUPS, HEAD_DIM, WINDOW = 16, 4, 2, 6, 5


def config(**fields) -> LocalModelConfig:
    return LocalModelConfig(**{"hidden_size": HIDDEN, "num_layers": 1, "num_heads": HEADS,
                               "ffn_hidden_size": 24, "window": WINDOW,
                               "num_query_groups": GROUPS, "kv_channels": HEAD_DIM, **fields})


def dense_grouped_attention(layer: LocalSelfAttention, x, cos, sin):
    """Independent reference: separate q, k, v from the fused rows `[H*d; G*d; G*d]`, each query
    head h against key/value head h // (H / G), a dense sliding-window mask."""
    weight = layer.linear_qkv.weight
    wq, wk, wv = weight.split([HEADS * HEAD_DIM, GROUPS * HEAD_DIM, GROUPS * HEAD_DIM])
    n = x.shape[1]
    q = apply_interleaved_rope((x @ wq.T).view(1, n, HEADS, HEAD_DIM), cos, sin)
    k = apply_interleaved_rope((x @ wk.T).view(1, n, GROUPS, HEAD_DIM), cos, sin)
    v = (x @ wv.T).view(1, n, GROUPS, HEAD_DIM)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (j <= i) & (i - j < WINDOW)
    heads = []
    for h in range(HEADS):
        g = h // (HEADS // GROUPS)
        scores = q[0, :, h] @ k[0, :, g].T / math.sqrt(HEAD_DIM)
        heads.append(scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[0, :, g])
    return torch.cat(heads, dim=-1)[None] @ layer.linear_proj.weight.T


def test_parameters_have_the_grouped_shapes():
    layer = LocalSelfAttention(config(), attention_backend="sdpa")
    assert layer.linear_qkv.weight.shape == ((HEADS + 2 * GROUPS) * HEAD_DIM, HIDDEN)
    assert layer.linear_proj.weight.shape == (HIDDEN, HEADS * HEAD_DIM)


@pytest.mark.parametrize("num_tokens", [4, 13])  # within one window, and past it (CPU path)
def test_forward_is_dense_grouped_query_attention(num_tokens):
    torch.manual_seed(0)
    layer = LocalSelfAttention(config(), attention_backend="sdpa").double()
    x = torch.randn(1, num_tokens, HIDDEN, dtype=torch.float64)
    cos, sin = (t.double() for t in RotaryTable(HEAD_DIM, 100.0).cos_sin(num_tokens, "cpu"))
    expected = dense_grouped_attention(layer, x, cos, sin)
    torch.testing.assert_close(layer(x, (cos, sin)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [(1,) * 13, (3, 1, 4, 5), (13,)])
def test_incremental_decoding_equals_the_full_forward(steps):
    """Token by token, and in chunks, through a whole layer (norms, attention, MLP)."""
    torch.manual_seed(1)
    layer = build_module(local_layer_spec("sdpa"), config(), norm_eps=1e-5)
    num_tokens = sum(steps)
    x = torch.randn(1, num_tokens, HIDDEN)
    cos, sin = RotaryTable(HEAD_DIM, 100.0).cos_sin(num_tokens, "cpu")
    with torch.no_grad():
        full = layer(x, (cos, sin))
        cache, outputs, start = SlidingKVCache(WINDOW), [], 0
        for count in steps:
            end = start + count
            outputs.append(layer.forward_step(x[:, start:end], (cos[:, start:end], sin[:, start:end]),
                                              cache))
            assert cache.keys.shape == (1, min(end, WINDOW - 1), GROUPS, HEAD_DIM)
            start = end
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_query_groups": 3}, r"num_heads 4 is not divisible by num_query_groups 3"),
    ({"kv_channels": 5}, r"head dim 5 must be even for RoPE"),
    ({"kv_channels": 0}, r"kv_channels \(0\) must be >= 1"),
    ({"num_query_groups": 0}, r"num_query_groups \(0\), .* must be >= 1"),
    ({"kv_channels": None, "num_heads": 3, "num_query_groups": None},
     r"hidden_size 16 is not divisible by num_heads 3; .*kv_channels"),
])
def test_impossible_head_shapes_are_named(fields, message):
    with pytest.raises(ModelConfigError, match=message):
        config(**fields)


def test_spelt_out_defaults_are_stored_as_none():
    """Key/value heads equal to the heads and a head size of hidden / heads are the defaults:
    two configs of the same model compare equal."""
    assert config(num_query_groups=HEADS, kv_channels=HIDDEN // HEADS) == config(
        num_query_groups=None, kv_channels=None)
    # hidden not divisible by heads is fine once the head size is given
    assert config(num_heads=3, num_query_groups=None, kv_channels=4).head_dim == 4
