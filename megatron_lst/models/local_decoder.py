"""Local decoder: token states + global patch outputs -> token states ready for the output head."""

from __future__ import annotations

import torch
from lst_kernels import decoder_key_ranges, patch_ids_from_lengths
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import LSTConfig
from .cross_attention import PatchCrossAttention, add_cross_attention_update
from .rope import RotaryTable


class LocalDecoder(torch.nn.Module):
    """Per layer: tokens cross-attend the k slots of their last W visible global patches (before
    every layer, or only the first), then sliding-window self-attention and MLP; final RMSNorm.

    Causality (DESIGN.md section 4): decoder patch ids come from `patch_lengths[:, 1:]`, so token t
    of decoder patch j sits at or after the last token of encoder patch j and reads only global
    patches <= j, all of which end at or before t.
    """

    def __init__(self, config: LSTConfig, layer_spec: ModuleSpec, kernel_backend: str = "auto"):
        super().__init__()
        dec, xattn = config.decoder, config.cross_attention
        self.slots_per_patch = xattn.slots_per_patch
        self.window = xattn.decoder_window
        self.double_residual = xattn.double_residual
        self.patch_projection = torch.nn.Linear(
            config.global_model.hidden_size, xattn.slots_per_patch * dec.hidden_size, bias=False
        )
        num_cross = dec.num_layers if xattn.all_decoder_layers else 1
        self.cross_attn_layers = torch.nn.ModuleList(
            PatchCrossAttention(dec.hidden_size, xattn.num_heads, config.norm_eps, kernel_backend)
            for _ in range(num_cross)
        )
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, dec, norm_eps=config.norm_eps) for _ in range(dec.num_layers)
        )
        self.final_norm = torch.nn.RMSNorm(dec.hidden_size, eps=config.norm_eps)
        self.rope = RotaryTable(dec.head_dim, config.rope_theta)

    def forward(
        self,
        token_states: torch.Tensor,  # [B, N, Dd]: the encoder's final hidden states
        global_states: torch.Tensor,  # [B, P, Dg]
        patch_lengths: torch.Tensor,  # [B, P]
    ) -> torch.Tensor:
        batch, num_tokens, width = token_states.shape
        num_patches = global_states.shape[1]
        slots = self.patch_projection(global_states).view(
            batch, num_patches * self.slots_per_patch, width
        )  # [B, P*k, Dd]
        decoder_patch_ids = patch_ids_from_lengths(patch_lengths[:, 1:], num_tokens)  # [B, N]
        key_start, key_end = decoder_key_ranges(
            decoder_patch_ids, self.slots_per_patch, self.window, num_patches
        )  # [B, N] each
        rope = self.rope.cos_sin(num_tokens, token_states.device)

        h = token_states
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn_layers):
                update = self.cross_attn_layers[i](h, slots, key_start, key_end)  # [B, N, Dd]
                h = add_cross_attention_update(h, update, self.double_residual)
            h = layer(h, rope)
        return self.final_norm(h)  # [B, N, Dd]
