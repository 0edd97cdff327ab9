"""A PyTorch LayerNorm/RMSNorm for megatron.core specs that works with sequence parallelism.

Without apex or Transformer Engine (always the case on CPU) megatron.core's local spec
normalises with `WrappedTorchNorm`, which refuses `sequence_parallel=True`: under
sequence parallelism each tensor-parallel rank normalises only its slice of the sequence,
so the norm's weight gradients are partial sums that must be all-reduced across the
tensor-parallel group. megatron.core's `finalize_model_grads` does that for every
parameter marked `sequence_parallel = True`, which is all apex's `FusedLayerNorm` adds;
`SequenceParallelTorchNorm` adds the same mark to the plain PyTorch norm.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelTorchNorm:
    """Builds `torch.nn.LayerNorm` or `torch.nn.RMSNorm` (per `config.normalization`) with
    its parameters marked for megatron's sequence-parallel gradient all-reduce.

    A drop-in for `WrappedTorchNorm` in a `ModuleSpec` (same constructor arguments).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma=True is not supported by the "
                             "PyTorch norms; set it to False or use Transformer Engine")
        norm_cls = _NORMS.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization={config.normalization!r} is not supported; "
                             f"choose one of {sorted(_NORMS)}")
        norm = norm_cls(hidden_size, eps=eps)
        for parameter in norm.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        return norm
