"""LST kernels: segment pooling and patch cross-attention (Triton on CUDA, PyTorch elsewhere)."""

from .backend import BACKEND_ENV_VAR, resolve_backend
from .patch_attention import patch_cross_attention
from .patch_attention_reference import patch_cross_attention_reference
from .ranges import (
    decoder_key_ranges,
    document_starts,
    encoder_key_ranges,
    patch_boundaries,
    patch_document_starts,
    patch_ids_from_lengths,
    patch_spans,
    sliding_window_key_starts,
    token_document_first_patch,
)
from .segment_pool import segment_pool
from .segment_pool_reference import segment_pool_reference

__all__ = [
    "BACKEND_ENV_VAR",
    "decoder_key_ranges",
    "document_starts",
    "encoder_key_ranges",
    "patch_boundaries",
    "patch_cross_attention",
    "patch_cross_attention_reference",
    "patch_document_starts",
    "patch_ids_from_lengths",
    "patch_spans",
    "resolve_backend",
    "segment_pool",
    "segment_pool_reference",
    "sliding_window_key_starts",
    "token_document_first_patch",
]
