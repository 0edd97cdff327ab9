"""Documents of packed rows, as the attentions and RoPE use them (Megatron-LM's
`--reset-attention-mask` / `--reset-position-ids`).

A row packs documents that each end with EOS; position i > 0 starts a document iff token i - 1 is
EOS (`lst_kernels.document_starts`). With attention reset, every attention's key range starts no
earlier than its query's document start: the local sliding windows, the encoder's pooling
cross-attention and the decoder's cross-attention (patches of the same document only; unless
`reset_cross_attention` is off), and the global transformer (causal within the document; unless
`reset_global_attention` is off). Every one stays one contiguous range per query.
With position reset, RoPE positions count from the document start, in the local models (tokens)
and the global one (patches).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from lst_kernels import (
    document_starts,
    patch_document_starts,
    sliding_window_key_starts,
    token_document_first_patch,
)

from .config import DocumentMaskingConfig
from .local_attention import VarlenSequences


def global_spec_for_documents(config: DocumentMaskingConfig | None, transformer_impl: str) -> str:
    """The global block's spec under packed documents: the local one, whose core attention
    (`CausalSDPAttention`) reads the document ranges; `transformer_impl` unchanged without."""
    if config is None:
        return transformer_impl
    if transformer_impl == "transformer_engine":
        raise ValueError(
            "packed-document attention (--reset-attention-mask / --reset-position-ids) runs the "
            "global block on the local spec, whose core attention reads the document ranges; use "
            "--transformer-impl local (or auto), or turn it off with --no-reset-attention-mask")
    return "local"


def documents_of_stage(tokens: torch.Tensor | None,
                       config: DocumentMaskingConfig | None) -> RowDocuments | None:
    """`RowDocuments.of` for a model stage; raises when the stage lacks the tokens it needs."""
    if tokens is None and config is not None:
        raise ValueError("packed-document attention (LSTConfig.documents) needs the tokens on "
                         "every pipeline stage: pass tokens (and patch_lengths) to this stage too")
    return RowDocuments.of(tokens, config)


@dataclass(frozen=True)
class RowDocuments:
    """The documents of a batch of B rows of N input tokens."""

    config: DocumentMaskingConfig
    starts: torch.Tensor
    """`[B, N + 1]` int64: first position of the document of positions 0..N (N: the last target)."""

    @classmethod
    def of(cls, tokens: torch.Tensor | None, config: DocumentMaskingConfig | None) -> RowDocuments | None:
        """The documents of `tokens [B, N]`, or None when rows are single sequences (no config,
        or nothing to reset) or the tokens are not on this pipeline stage."""
        if config is None or tokens is None or not (config.reset_attention_mask
                                                    or config.reset_position_ids):
            return None
        return cls(config, document_starts(tokens, config.eos_id))

    @property
    def num_tokens(self) -> int:
        return self.starts.shape[1] - 1

    def token_document_starts(self) -> torch.Tensor | None:
        """`[B, N]` first key of every token under causal attention within its document (the
        token baseline's global attention), or None without attention reset."""
        return self.starts[:, :self.num_tokens] if self.config.reset_attention_mask else None

    def token_key_starts(self, window: int) -> torch.Tensor | None:
        """`[B, N]` first key of every token's sliding window, or None without attention reset."""
        if not self.config.reset_attention_mask:
            return None
        return sliding_window_key_starts(self.starts[:, :self.num_tokens], window)

    def varlen_sequences(self) -> VarlenSequences:
        """The documents of the input tokens as flash-attn's varlen sequences. Found on the
        first call (one host sync) and kept: every local layer of the batch, encoder, decoder
        and the last stage's encoder replica, reads the same."""
        return self._varlen_sequences

    @functools.cached_property
    def _varlen_sequences(self) -> VarlenSequences:
        positions = torch.arange(self.num_tokens, device=self.starts.device)  # [N]
        return VarlenSequences.of(self.starts[:, :self.num_tokens] == positions)

    def token_positions(self) -> torch.Tensor | None:
        """`[B, N]` RoPE position of every token, or None (0..N-1) without position reset."""
        if not self.config.reset_position_ids:
            return None
        return torch.arange(self.num_tokens, device=self.starts.device) - self.starts[:, :self.num_tokens]

    @property
    def resets_cross_attention(self) -> bool:
        return self.config.reset_attention_mask and self.config.reset_cross_attention

    def encoder_document_starts(self) -> torch.Tensor | None:
        """`document_starts` for `encoder_key_ranges`, or None when the cross-attention is not
        reset."""
        return self.starts if self.resets_cross_attention else None

    def token_first_patch(self, patch_lengths: torch.Tensor) -> torch.Tensor | None:
        """`[B, N]` first patch of every token's document for `decoder_key_ranges`, or None when
        the cross-attention is not reset."""
        if not self.resets_cross_attention:
            return None
        return token_document_first_patch(patch_lengths, self.starts)

    def patch_first_patch(self, patch_lengths: torch.Tensor) -> torch.Tensor:
        """`[B, P]` first patch of every patch's document."""
        return patch_document_starts(patch_lengths, self.starts)

    def global_key_starts(self, patch_lengths: torch.Tensor) -> torch.Tensor | None:
        """`[B, P]` first key of every global position (causal within its document), or None
        when the global attention is not reset."""
        if not (self.config.reset_attention_mask and self.config.reset_global_attention):
            return None
        return self.patch_first_patch(patch_lengths)

    def patch_positions(self, patch_lengths: torch.Tensor) -> torch.Tensor | None:
        """`[B, P]` RoPE position of every global position, or None (0..P-1)."""
        if not self.config.reset_position_ids:
            return None
        patches = torch.arange(patch_lengths.shape[1], device=self.starts.device)
        return patches - self.patch_first_patch(patch_lengths)
