"""Patching: patch lengths of interleaved documents and the batch contract (docs/architecture.md#the-batch-contract)."""

from megatron_lst.patching.contract import (
    BatchContractError,
    check_batch,
    decoder_patch_ids,
    patch_ids,
)
from megatron_lst.patching.curriculum import PATCHING_MODES, Patcher, PatchingConfig
from megatron_lst.patching.patchers import (
    PatchingError,
    aligned_patch_lengths,
    static_patch_lengths,
    token_patch_lengths,
)

__all__ = [
    "PATCHING_MODES",
    "BatchContractError",
    "Patcher",
    "PatchingConfig",
    "PatchingError",
    "aligned_patch_lengths",
    "check_batch",
    "decoder_patch_ids",
    "patch_ids",
    "static_patch_lengths",
    "token_patch_lengths",
]
