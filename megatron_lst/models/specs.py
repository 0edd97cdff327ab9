"""Module specs: which implementation fills each slot of the local layers and the global block.

Swapping implementations is a different spec, never an `if` inside a layer.
- Global block: megatron's Transformer Engine layer spec (`transformer_impl="transformer_engine"`)
  or its local PyTorch spec (`"local"`, with causal SDPA as core attention and norms that support
  sequence parallelism); `"auto"` takes TE when CUDA is up and `transformer_engine.pytorch`
  imports (an installed build for another torch or CUDA that does not is passed over, logged).
  Both take `PreRotatedKeySelfAttention` as self-attention: generation's static KV cache holds
  rotated keys (see global_attention.py).
- Local layers: `LocalSelfAttention` + `SwiGLUMLP`, with the sliding-window attention backend
  ("auto" | "flash" | "sdpa", see `local_attention.py`) as a spec parameter.
Both take the kernel backend of their range attention ("auto" | "triton" | "torch",
`lst_kernels.backend`) as a spec parameter of the attention.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_lst.compat.norm import SequenceParallelTorchNorm

from .global_attention import CausalSDPAttention, PreRotatedKeySelfAttention
from .local_layers import LocalLayerSubmodules, LocalSelfAttention, LocalTransformerLayer, SwiGLUMLP
from .optional_imports import import_failure

logger = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


def transformer_engine_failure() -> str | None:
    """None when Transformer Engine's PyTorch modules import; else why not."""
    return import_failure("transformer_engine.pytorch")


def resolve_transformer_impl(transformer_impl: str) -> str:
    """"local" or "transformer_engine"; "auto" picks TE when it imports and CUDA is available."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl {transformer_impl!r} is not one of {TRANSFORMER_IMPLS}")
    cuda = torch.cuda.is_available()
    # TE is imported only where it could be chosen: without CUDA "auto" never pays for it.
    wanted = transformer_impl == "transformer_engine" or (transformer_impl == "auto" and cuda)
    failure = transformer_engine_failure() if wanted else None
    te_ok = cuda and failure is None
    if transformer_impl == "transformer_engine" and not te_ok:
        raise RuntimeError(
            "transformer_impl='transformer_engine' needs transformer_engine installed and CUDA "
            f"({'CUDA is up' if cuda else 'CUDA is not available'}"
            + (f"; transformer_engine is {failure}" if failure else "") + "); use 'local' or 'auto'"
        )
    if transformer_impl == "auto":
        return "transformer_engine" if te_ok else "local"
    return transformer_impl


def global_block_spec(megatron_config, transformer_impl: str = "auto",
                      kernel_backend: str = "auto"):
    """The megatron.core spec of the global transformer block (pre-norm RMSNorm, SwiGLU) for this
    pipeline stage: TE's layer spec, or the local one as `TransformerBlockSubmodules`, whose
    packed-document attention runs its range attention on `kernel_backend`."""
    impl = resolve_transformer_impl(transformer_impl)
    logger.info("global transformer layer spec: %s", impl)
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return _with_pre_rotated_keys(get_gpt_layer_with_transformer_engine_spec())
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    # megatron's own PyTorch norm refuses sequence parallelism; this one marks its weights for
    # the tensor-parallel gradient all-reduce that `finalize_model_grads` performs. Causal SDPA
    # replaces megatron's unfused DotProductAttention (see global_attention.py).
    layer = _with_pre_rotated_keys(get_gpt_layer_local_spec(normalization="RMSNorm"))
    attention = layer.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=ModuleSpec(
            module=CausalSDPAttention, params={"kernel_backend": kernel_backend})))
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules,
        self_attention=attention,
        input_layernorm=SequenceParallelTorchNorm,
        pre_mlp_layernorm=SequenceParallelTorchNorm,
    ))
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(megatron_config),
        layer_norm=SequenceParallelTorchNorm,
    )


def _with_pre_rotated_keys(layer: ModuleSpec) -> ModuleSpec:
    """`layer` (a megatron GPT layer spec) with `PreRotatedKeySelfAttention` as self-attention,
    its submodules (TE's or the local ones) kept."""
    attention = dataclasses.replace(layer.submodules.self_attention,
                                    module=PreRotatedKeySelfAttention)
    return dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, self_attention=attention))


def local_layer_spec(attention_backend: str = "auto", kernel_backend: str = "auto") -> ModuleSpec:
    """Spec of one local encoder/decoder layer."""
    return ModuleSpec(
        module=LocalTransformerLayer,
        submodules=LocalLayerSubmodules(
            self_attention=ModuleSpec(
                module=LocalSelfAttention,
                params={"attention_backend": attention_backend, "kernel_backend": kernel_backend},
            ),
            mlp=SwiGLUMLP,
        ),
    )
