"""Local decoder: token states + global patch outputs -> token states ready for the output head."""

from __future__ import annotations

import numpy as np
import torch
from lst_kernels import decoder_key_ranges, patch_ids_from_lengths
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import LSTConfig
from .cross_attention import PatchCrossAttention, add_cross_attention_update
from .documents import RowDocuments
from .local_layers import SlidingKVCache
from .rope import RotaryTable


class LocalDecoder(torch.nn.Module):
    """Per layer: tokens cross-attend the k slots of their last W visible global patches (before
    every layer, or only the first), then sliding-window self-attention and MLP; final RMSNorm.

    Causality (docs/architecture.md#the-batch-contract): decoder patch ids come from `patch_lengths[:, 1:]`, so token t
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
        documents: RowDocuments | None = None,  # packed documents: attend within them only
    ) -> torch.Tensor:
        batch, num_tokens, width = token_states.shape
        num_patches = global_states.shape[1]
        slots = self.patch_projection(global_states).view(
            batch, num_patches * self.slots_per_patch, width
        )  # [B, P*k, Dd]
        decoder_patch_ids = patch_ids_from_lengths(patch_lengths[:, 1:], num_tokens)  # [B, N]
        positions = first_patch = self_key_start = sequences = None
        if documents is not None:
            sequences = documents.varlen_sequences
            positions = documents.token_positions()  # [B, N] or None
            first_patch = documents.token_first_patch(patch_lengths)  # [B, N] or None
            self_key_start = documents.token_key_starts(
                self.layers[0].self_attention.core_attention.window)
        key_start, key_end = decoder_key_ranges(
            decoder_patch_ids, self.slots_per_patch, self.window, num_patches, first_patch
        )  # [B, N] each
        rope = self.rope.cos_sin_at(positions, num_tokens, token_states.device)

        h = token_states
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn_layers):
                update = self.cross_attn_layers[i](h, slots, key_start, key_end)  # [B, N, Dd]
                h = add_cross_attention_update(h, update, self.double_residual)
            h = layer(h, rope, self_key_start, sequences)
        return self.final_norm(h)  # [B, N, Dd]

    def forward_step(self, token_states: torch.Tensor, new_global_states: torch.Tensor,
                     patch_ids: torch.Tensor, num_patches: int, offset: int,
                     cache: DecoderCache) -> torch.Tensor:
        """Generation: `forward` for the next tokens of a sequence whose earlier tokens (and the
        global patches closed so far) are in `cache`.

        token_states `[1, n, Dd]`: the encoder's final states of tokens offset..offset+n-1.
        new_global_states `[1, m, Dg]`: the global outputs of the patches closed since the last
        call (m may be 0). patch_ids `[1, n]` (on the device): the new tokens' decoder patch
        ids under the generation patching of the whole sequence so far, which has `num_patches`
        patches (the last open); the caller records them in `cache` (`add_patch_ids`) from the
        host, as reading them back here would wait for the GPU. Returns `[1, n, Dd]`.
        """
        num_new = token_states.shape[1]
        if new_global_states.shape[1]:
            slots = self.patch_projection(new_global_states).view(
                1, -1, token_states.shape[-1])  # [1, m*k, Dd]
            cache.add_slots([cross_attn.keys_values(slots) for cross_attn in self.cross_attn_layers])
        key_start, key_end = decoder_key_ranges(
            patch_ids, self.slots_per_patch, self.window, num_patches)  # [1, n] each
        cos, sin = self.rope.cos_sin(offset + num_new, token_states.device)
        rope = (cos[:, offset:], sin[:, offset:])

        h = token_states
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn_layers):
                update = self.cross_attn_layers[i].attend(h, *cache.slots[i], key_start, key_end)
                h = add_cross_attention_update(h, update, self.double_residual)
            h = layer.forward_step(h, rope, cache.layers[i])
        return self.final_norm(h)


class DecoderCache:
    """Generation cache of a `LocalDecoder`: per self-attention layer a `SlidingKVCache`, per
    cross-attention layer the keys and values of the slots of every closed global patch, and the
    decoder patch id each cached token was decoded with. The slots and patch ids live in buffers
    of their maximum size (`max_patches` closed patches, `max_tokens` decoded tokens), written in
    place: growing them by concatenation copied all of them at every step.

    A token's decoder patch can change after it was decoded: when a text token ends a speech run,
    the run's short last patch closes, and its last token, decoded while the next token's slot
    still belonged to that patch, moves to the decoder patch that reads it (as static patching
    of the whole sequence has it). `rollback` then takes it back (`spare`, the patch size,
    bounds how many tokens it can take back)."""

    def __init__(self, decoder: LocalDecoder, spare: int, max_patches: int, max_tokens: int):
        self.layers = [SlidingKVCache(layer.self_attention.core_attention.window, spare)
                       for layer in decoder.layers]
        self.spare = spare
        self.max_slots = max_patches * decoder.slots_per_patch
        self.num_slots = 0
        self._slots: list[tuple[torch.Tensor, torch.Tensor]] = []  # per cross layer, [1, S_max, H, d]
        self._patch_ids = np.zeros(max_tokens, dtype=np.int64)  # [T_max], on the host
        self.num_decoded = 0

    @property
    def slots(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer, the keys and values of the cached slots, `[1, S, H, d]`."""
        return [(k[:, :self.num_slots], v[:, :self.num_slots]) for k, v in self._slots]

    def add_slots(self, keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append the keys and values `[1, m, H, d]` of new slots, one pair per cross layer."""
        if not self._slots:
            self._slots = [(k.new_empty(1, self.max_slots, *k.shape[2:]),
                            v.new_empty(1, self.max_slots, *v.shape[2:])) for k, v in keys_values]
        end = self.num_slots + keys_values[0][0].shape[1]
        for (k_all, v_all), (k, v) in zip(self._slots, keys_values, strict=True):
            k_all[:, self.num_slots:end] = k
            v_all[:, self.num_slots:end] = v
        self.num_slots = end

    def add_patch_ids(self, patch_ids: np.ndarray) -> None:
        """Record the decoder patch ids `[n]` of the next decoded tokens."""
        end = self.num_decoded + len(patch_ids)
        self._patch_ids[self.num_decoded:end] = patch_ids
        self.num_decoded = end

    @property
    def changeable_from(self) -> int:
        """The first cached token whose decoder patch id the next tokens can change. Token i's
        decoder patch is the patch of position i + L0 (L0 = the first patch's length, at most
        the patch size `spare`), and a new token moves only the position it takes (it was the
        slot, which leaves a short patch when the token closes it), so only the token L0
        before it, one of the last `spare` decoded, can change."""
        return max(self.num_decoded - self.spare, 0)

    def first_changed(self, patch_ids: np.ndarray) -> int:
        """The first cached token whose decoder patch id differs in `patch_ids` (`[N - c]`: the
        ids of tokens c = `changeable_from` .. N-1), or the number of cached tokens if none
        does. Compares at most `spare` ids, however long the sequence."""
        start, cached = self.changeable_from, self.num_decoded
        changed = np.flatnonzero(self._patch_ids[start:cached] != patch_ids[:cached - start])
        return start + int(changed[0]) if len(changed) else cached

    def rollback(self, keep: int) -> None:
        """Keep only the first `keep` decoded tokens."""
        for layer in self.layers:
            layer.drop_last(self.num_decoded - keep)
        self.num_decoded = keep
