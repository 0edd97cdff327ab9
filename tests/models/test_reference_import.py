"""The reference -> megatron weight mapping of a global layer, checked against an independent
re-implementation of the reference block, with grouped-query attention (the fixture has none)."""

import math

import torch

from megatron_lst.models.config import GlobalModelConfig, LSTConfig, preset
from megatron_lst.models.global_transformer import GlobalTransformer
from megatron_lst.models.reference_tensors import GLOBAL_LAYER_TENSORS, global_layer_to_megatron
from megatron_lst.models.specs import global_block_spec

HIDDEN, HEADS, GROUPS, FFN, THETA, EPS = 32, 4, 2, 96, 10000.0, 1e-5
HEAD_DIM = HIDDEN // HEADS


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rope(x):
    """Interleaved pairs rotated as complex numbers. x [B, S, H, d]."""
    seq, head_dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
    phase = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), inv_freq))
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * phase[None, :, None, :]).flatten(-2)


def reference_layer(x, w):
    """The reference block on x [B, S, D] with weights named as in its state dict."""
    batch, seq, _ = x.shape
    h = rms_norm(x, w["attention_norm.weight"])
    q = rope((h @ w["attention.wq.weight"].T).view(batch, seq, HEADS, HEAD_DIM))
    k = rope((h @ w["attention.wk.weight"].T).view(batch, seq, GROUPS, HEAD_DIM))
    v = (h @ w["attention.wv.weight"].T).view(batch, seq, GROUPS, HEAD_DIM)
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=2) for t in (k, v))  # its repeat_kv
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    x = x + torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(-2) @ w["attention.wo.weight"].T
    h = rms_norm(x, w["ffn_norm.weight"])
    gate, up = h @ w["feed_forward.w1.weight"].T, h @ w["feed_forward.w3.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ w["feed_forward.w2.weight"].T


def test_grouped_query_layer_matches_reference(single_rank):
    tiny = preset("tiny", 64)
    config = LSTConfig(vocab_size=64, global_model=GlobalModelConfig(HIDDEN, 1, HEADS, FFN, GROUPS),
                       encoder=tiny.encoder, decoder=tiny.decoder, rope_theta=THETA, norm_eps=EPS)
    megatron_config = config.transformer_config()
    block = GlobalTransformer(megatron_config, global_block_spec(megatron_config, "local"), THETA,
                              final_norm=False)
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "attention.wq.weight": (HIDDEN, HIDDEN), "attention.wo.weight": (HIDDEN, HIDDEN),
        "attention.wk.weight": (GROUPS * HEAD_DIM, HIDDEN),
        "attention.wv.weight": (GROUPS * HEAD_DIM, HIDDEN),
        "feed_forward.w1.weight": (FFN, HIDDEN), "feed_forward.w3.weight": (FFN, HIDDEN),
        "feed_forward.w2.weight": (HIDDEN, FFN),
        "attention_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,),
    }
    assert set(shapes) == set(GLOBAL_LAYER_TENSORS)
    weights = {name: (1 + 0.1 * torch.randn(shape, generator=generator)) if len(shape) == 1
               else torch.randn(shape, generator=generator) / math.sqrt(shape[1])
               for name, shape in shapes.items()}
    mapped = global_layer_to_megatron(weights, config.global_model)
    missing, unexpected = block.load_state_dict(
        {f"block.layers.0.{suffix}": tensor for suffix, tensor in mapped.items()}, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)

    x = torch.randn(2, 7, HIDDEN, generator=generator)  # [B, S, D]
    with torch.no_grad():
        ours = block(x.transpose(0, 1).contiguous()).transpose(0, 1)  # megatron is [S, B, D]
    torch.testing.assert_close(ours, reference_layer(x, weights), atol=1e-5, rtol=1e-5)
