"""Core attention of the global block's local (non-Transformer-Engine) spec: causal PyTorch SDPA.

megatron's `DotProductAttention` materialises `[B, H, S, S]` scores, masks and softmaxes them in
separate kernels; on CPU that dominated the global transformer's step at a few thousand
positions. `CausalSDPAttention` fills the same `core_attention` slot with
`scaled_dot_product_attention(is_causal=True)` (PyTorch's flash kernels on CPU and CUDA: no score
matrix kept, masked blocks skipped). Same inputs and outputs as megatron's module; under
megatron's inference KV cache (fewer queries than keys) the causal mask is aligned to the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class CausalSDPAttention(MegatronModule):
    """query `[Sq, B, Hp, d]`, key/value `[Sk, B, Gp, d]` -> `[Sq, B, Hp*d]` (Hp, Gp: this
    tensor-parallel rank's heads and KV groups; Sq <= Sk, the queries being the last Sq
    positions), causal, scale `1/sqrt(d)` unless given."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CausalSDPAttention is causal only, got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1 or config.apply_query_key_layer_scaling:
            raise ValueError(
                "CausalSDPAttention supports neither context parallelism nor query-key layer "
                "scaling; use the Transformer Engine spec for those"
            )
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "CausalSDPAttention applies the causal mask itself and takes no attention_mask, "
                "attention_bias or packed sequences"
            )
        seq_len, batch = query.shape[:2]
        num_keys = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, d]
        dropout = self.dropout if self.training else 0.0
        # With a KV cache the queries are the last `seq_len` of `num_keys` positions, so the
        # causal mask is aligned bottom-right; SDPA's `is_causal` aligns it top-left, which is
        # only right when the two lengths agree.
        mask = None
        if seq_len != num_keys and seq_len > 1:
            offset = num_keys - seq_len
            mask = (torch.arange(num_keys, device=q.device)[None, :]
                    <= torch.arange(seq_len, device=q.device)[:, None] + offset)  # [Sq, Sk]

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=seq_len == num_keys, dropout_p=dropout,
                scale=self.scale, enable_gqa=self.groups_per_partition != self.heads_per_partition,
            )

        if dropout > 0:  # megatron's convention: attention dropout on the model-parallel stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)  # [S, B, Hp*d]
