"""Local encoder: tokens -> token states (`TokenEncoder`) -> patch vectors (`PatchEncoder`).

Split in two because the token states are needed twice: by the patch pooling on the first
pipeline stage and as the decoder's input on the last (see `lst_model.py` for how they get there).
"""

from __future__ import annotations

import torch
from lst_kernels import encoder_key_ranges, segment_pool
from megatron.core import parallel_state
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import LSTConfig
from .cross_attention import PatchCrossAttention, add_cross_attention_update
from .documents import RowDocuments
from .local_layers import SlidingKVCache
from .rope import RotaryTable


class TokenEncoder(torch.nn.Module):
    """Joint-vocabulary embedding (vocab-parallel; no scaling, no positions) and the encoder's
    sliding-window self-attention layers. Never changed by the patch cross-attention."""

    def __init__(self, config: LSTConfig, layer_spec: ModuleSpec, megatron_config):
        super().__init__()
        enc = config.encoder
        self.embedding = VocabParallelEmbedding(
            config.vocab_size, enc.hidden_size,
            init_method=lambda w: torch.nn.init.normal_(w, std=config.init_std),
            config=megatron_config,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, enc, norm_eps=config.norm_eps) for _ in range(enc.num_layers)
        )
        self.rope = RotaryTable(enc.head_dim, config.rope_theta)

    def forward(self, tokens: torch.Tensor, documents: RowDocuments | None = None) -> list[torch.Tensor]:
        """tokens `[B, N]` (packing `documents`, if given) -> the hidden state after every layer,
        each `[B, N, De]`."""
        h = self.embedding(tokens)  # [B, N, De], complete on every tensor-parallel rank
        positions = key_start = sequences = None
        if documents is not None:
            positions = documents.token_positions()  # [B, N] or None
            key_start = documents.token_key_starts(self.layers[0].self_attention.core_attention.window)
            sequences = documents.varlen_sequences
        rope = self.rope.cos_sin_at(positions, tokens.shape[1], tokens.device)
        states = []
        for layer in self.layers:
            h = layer(h, rope, key_start, sequences)
            states.append(h)
        return states

    def forward_step(self, tokens: torch.Tensor, offset: int,
                     caches: list[SlidingKVCache]) -> list[torch.Tensor]:
        """Generation: the next tokens `[1, n]` at positions `offset..offset+n-1` of a sequence
        whose earlier tokens are in `caches` (one per layer) -> each layer's states `[1, n, De]`."""
        h = self.embedding(tokens)  # [1, n, De]
        cos, sin = self.rope.cos_sin(offset + tokens.shape[1], tokens.device)
        rope = (cos[:, offset:], sin[:, offset:])
        states = []
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer.forward_step(h, rope, cache)
            states.append(h)
        return states


class PatchEncoder(torch.nn.Module):
    """Token states -> k slots per patch -> one vector of width `k * De` per patch.

    The slots start as a segment max (or mean, or min) pool of their patch's tokens at the first
    layer that cross-attends (empty patch -> 0), projected `De -> k * De` and viewed as `[B, P*k, De]`
    (slot s belongs to patch s // k). Then, after every encoder layer (or only the last), the
    slots of patch q attend the tokens of patches q-W+1 .. q in that layer's states.
    """

    def __init__(self, config: LSTConfig, kernel_backend: str = "auto"):
        super().__init__()
        enc, xattn = config.encoder, config.cross_attention
        self.slots_per_patch = xattn.slots_per_patch
        self.window = xattn.encoder_window
        self.pooling = xattn.pooling
        self.double_residual = xattn.double_residual
        self.kernel_backend = kernel_backend
        self.patch_projection = torch.nn.Linear(
            enc.hidden_size, xattn.slots_per_patch * enc.hidden_size, bias=False
        )
        num_cross = enc.num_layers if xattn.all_encoder_layers else 1
        self.cross_attn_layers = torch.nn.ModuleList(
            PatchCrossAttention(enc.hidden_size, xattn.num_heads, config.norm_eps, kernel_backend)
            for _ in range(num_cross)
        )

    def pool(self, h: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
        """`h [B, N, De]` pooled over the patches of `patch_lengths [B, P]` -> `[B, P, De]`; min
        is the negated max of the negated states (empty patch -> 0 either way)."""
        if self.pooling == "min":
            return -segment_pool(-h, patch_lengths, "max", self.kernel_backend)
        return segment_pool(h, patch_lengths, self.pooling, self.kernel_backend)

    def forward(self, layer_states: list[torch.Tensor], patch_lengths: torch.Tensor,
                documents: RowDocuments | None = None) -> torch.Tensor:
        """layer_states: `TokenEncoder` output; patch_lengths `[B, P]` -> patches `[B, P, k*De]`.
        With `documents`, a patch's slots see only the tokens of its own document."""
        # Cross-attention follows the last len(cross_attn_layers) encoder layers.
        states = layer_states[len(layer_states) - len(self.cross_attn_layers):]
        batch, num_tokens, width = states[0].shape
        num_patches = patch_lengths.shape[1]
        key_start, key_end = encoder_key_ranges(
            patch_lengths, self.slots_per_patch, self.window, num_tokens,
            None if documents is None else documents.encoder_document_starts(),
        )  # [B, P*k] each

        pooled = self.pool(states[0], patch_lengths)  # [B, P, De]
        slots = self.patch_projection(pooled).view(batch, num_patches * self.slots_per_patch, width)
        for cross_attn, h in zip(self.cross_attn_layers, states, strict=True):
            update = cross_attn(slots, h, key_start, key_end)  # [B, P*k, De]
            slots = add_cross_attention_update(slots, update, self.double_residual)
        return slots.view(batch, num_patches, self.slots_per_patch * width)  # [B, P, k*De]

    def encode_patch(self, layer_states: list[torch.Tensor], bounds: list[int],
                     patch: int) -> torch.Tensor:
        """Generation: `forward`'s output for one patch only, `[1, 1, k*De]`, from the encoder's
        states of the sequence so far (`layer_states`, each `[1, T, De]`) and the token bounds of
        its patches (`bounds[q]` .. `bounds[q + 1]` are patch q's tokens)."""
        states = layer_states[len(layer_states) - len(self.cross_attn_layers):]
        first = bounds[max(patch - self.window + 1, 0)]  # the tokens this patch's slots see
        start, end = bounds[patch], bounds[patch + 1]
        # [1, 1]; filled on the device: a tensor copied from the host waits for the queued work
        lengths = torch.full((1, 1), end - start, device=states[0].device)
        pooled = self.pool(states[0][:, start:end], lengths)
        width = pooled.shape[-1]
        slots = self.patch_projection(pooled).view(1, self.slots_per_patch, width)  # [1, k, De]
        key_start = torch.zeros(1, self.slots_per_patch, dtype=torch.int32, device=slots.device)
        key_end = torch.full_like(key_start, end - first)
        for cross_attn, h in zip(self.cross_attn_layers, states, strict=True):
            update = cross_attn(slots, h[:, first:end], key_start, key_end)  # [1, k, De]
            slots = add_cross_attention_update(slots, update, self.double_residual)
        return slots.view(1, 1, self.slots_per_patch * width)
