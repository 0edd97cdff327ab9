"""Module specs: which implementation fills each slot of the local layers and the global block.

Swapping implementations is a different spec, never an `if` inside a layer.
- Global block: megatron's Transformer Engine layer spec (`transformer_impl="transformer_engine"`)
  or its local PyTorch spec (`"local"`, with causal SDPA as core attention and norms that support
  sequence parallelism); `"auto"` takes TE when it is installed and CUDA is up.
- Local layers: `LocalSelfAttention` + `SwiGLUMLP`, with the sliding-window attention backend
  ("auto" | "flash" | "sdpa", see `local_attention.py`) as a spec parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_lst.compat.norm import SequenceParallelTorchNorm

from .global_attention import CausalSDPAttention
from .local_layers import LocalLayerSubmodules, LocalSelfAttention, LocalTransformerLayer, SwiGLUMLP

logger = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@functools.cache
def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(transformer_impl: str) -> str:
    """"local" or "transformer_engine"; "auto" picks TE when installed and CUDA is available."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl {transformer_impl!r} is not one of {TRANSFORMER_IMPLS}")
    te_ok = transformer_engine_available() and torch.cuda.is_available()
    if transformer_impl == "transformer_engine" and not te_ok:
        raise RuntimeError(
            "transformer_impl='transformer_engine' needs transformer_engine installed and CUDA; "
            "use 'local' or 'auto'"
        )
    if transformer_impl == "auto":
        return "transformer_engine" if te_ok else "local"
    return transformer_impl


def global_block_spec(megatron_config, transformer_impl: str = "auto"):
    """The megatron.core spec of the global transformer block (pre-norm RMSNorm, SwiGLU) for this
    pipeline stage: TE's layer spec, or the local one as `TransformerBlockSubmodules`."""
    impl = resolve_transformer_impl(transformer_impl)
    logger.info("global transformer layer spec: %s", impl)
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    # megatron's own PyTorch norm refuses sequence parallelism; this one marks its weights for
    # the tensor-parallel gradient all-reduce that `finalize_model_grads` performs. Causal SDPA
    # replaces megatron's unfused DotProductAttention (see global_attention.py).
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = layer.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=CausalSDPAttention))
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


def local_layer_spec(attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one local encoder/decoder layer."""
    return ModuleSpec(
        module=LocalTransformerLayer,
        submodules=LocalLayerSubmodules(
            self_attention=ModuleSpec(
                module=LocalSelfAttention, params={"attention_backend": attention_backend}
            ),
            mlp=SwiGLUMLP,
        ),
    )
