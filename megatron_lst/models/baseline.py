"""The token-level baseline (patching mode `none`): a plain decoder-only transformer.

Every token is its own global position; there are no local modules. It is megatron's `GPTModel`
with the same block spec, width, depth, heads, RMSNorm, SwiGLU and interleaved RoPE as LST's
global transformer, plus the usual final norm and a vocab-parallel head over the joint vocabulary,
so LST and the baseline are compared inside one framework on the same interleaved data.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import LSTConfig, check_tensor_parallel_vocab
from .specs import global_block_spec


class TokenBaselineModel(GPTModel):
    """`GPTModel` called like `LSTModel`: `forward(tokens, patch_lengths, labels)`."""

    def __init__(
        self,
        config: LSTConfig,
        megatron_config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        transformer_impl: str = "auto",
    ):
        check_tensor_parallel_vocab(config, megatron_config)
        super().__init__(
            config=megatron_config,
            transformer_layer_spec=global_block_spec(megatron_config, transformer_impl),
            vocab_size=config.vocab_size,
            max_sequence_length=config.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=config.rope_theta,
        )
        self.lst_config = config

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # [B, N]
        patch_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # [B, N]
    ) -> torch.Tensor:
        """Same contract as `LSTModel.forward`: per-token cross entropy `[B, N]` with labels, full
        fp32 logits `[B, N, V]` without; the hidden activation on non-last pipeline stages.
        `patch_lengths` is accepted and unused: the baseline's patches are its tokens."""
        del patch_lengths
        output = super().forward(input_ids=tokens, position_ids=None, attention_mask=None,
                                 labels=labels)
        if labels is not None or not self.post_process:
            return output
        return tensor_parallel.gather_from_tensor_model_parallel_region(output).float()
