"""The global transformer: a megatron.core `TransformerBlock` over `[P, B, H]` with interleaved RoPE.

Free of LST logic: it sees a sequence of vectors and is causal over it. Pipeline stages each hold
their slice of the layers (megatron's `TransformerBlock` does the split; with virtual pipeline
stages each model chunk of a rank holds its `vp_stage`'s slice); stages after the first read their
input from `set_input_tensor`.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .rope import RotaryTable


class GlobalTransformer(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        block_spec: ModuleSpec | TransformerBlockSubmodules,
        rope_theta: float,
        final_norm: bool,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.pre_process = pre_process
        self.block = TransformerBlock(
            config, block_spec, post_layer_norm=final_norm,
            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
        )
        self.rope = RotaryTable(config.kv_channels, rope_theta)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.block.set_input_tensor(input_tensor)

    def forward(self, hidden_states: torch.Tensor | None, key_start: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`[S, B, H]` (`[S/tp, B, H]` under sequence parallelism) -> the same shape.

        `hidden_states` is the input on the first pipeline stage and ignored (None) on the others.
        Causal: no mask tensor is passed; the core attention (causal SDPA in the local spec, TE's
        in the TE spec) applies its causal mask type itself. Packed documents: `key_start [B, S]`,
        the first key of every position (causal within its document), goes to the core attention
        in the attention-mask slot (only `CausalSDPAttention` of the local spec reads it), and
        `positions [B, S]` are the RoPE positions (None: 0..S-1).
        """
        local = hidden_states if self.pre_process else self.block.input_tensor
        seq_len = local.shape[0]
        if self.config.sequence_parallel:
            seq_len *= parallel_state.get_tensor_model_parallel_world_size()
        rotary = self.rope.angles_at(positions, seq_len, local.device)  # [S, 1 or B, 1, d]
        return self.block(hidden_states, attention_mask=key_start, rotary_pos_emb=rotary)
