"""LST and the token baseline on megatron.core (docs/architecture.md).

`build_model` picks the model for a patching mode: `none` gives the token baseline, every other
mode the LST model (patching itself happens in the data pipeline; the model reads patch_lengths).

The model classes and gradient hooks load on first use (PEP 562 `__getattr__`): they import
megatron.core, which takes seconds, and flag parsing, `--help` and the refusals of bad flags need
only the configs.
"""

from __future__ import annotations

import importlib

from megatron_lst.patching.curriculum import PATCHING_MODES

from .config import (
    PRESETS,
    CrossAttentionConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    ModelConfigError,
    preset,
    swiglu_ffn_size,
)

_ON_FIRST_USE = {
    "LSTModel": ".lst_model",
    "TokenBaselineModel": ".baseline",
    "finalize_lst_model_grads": ".replicated_parameters",
    "finalize_replicated_encoder_grads": ".replicated_parameters",
}


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_ON_FIRST_USE[name], __name__), name)


def build_model(
    config: LSTConfig,
    patching_mode: str,
    megatron_config,
    pre_process: bool = True,
    post_process: bool = True,
    transformer_impl: str = "auto",
    local_attention_backend: str = "auto",
    kernel_backend: str = "auto",
    vp_stage: int | None = None,
):
    """`TokenBaselineModel` for patching mode "none", else `LSTModel`, for one pipeline stage
    (with virtual pipeline stages: one model chunk, of virtual stage `vp_stage`).

    Both are called as `model(tokens, patch_lengths, labels)`. Train with
    `config.finalize_model_grads_func = finalize_lst_model_grads` (it is megatron's
    `finalize_model_grads` for the baseline, plus the LST encoder-replica reduction under PP).
    """
    if patching_mode not in PATCHING_MODES:
        raise ModelConfigError(f"patching mode {patching_mode!r} is not one of {PATCHING_MODES}")
    if patching_mode == "none":
        from .baseline import TokenBaselineModel
        return TokenBaselineModel(config, megatron_config, pre_process, post_process, transformer_impl,
                                  kernel_backend, vp_stage)
    from .lst_model import LSTModel
    return LSTModel(config, megatron_config, pre_process, post_process, transformer_impl,
                    local_attention_backend, kernel_backend, vp_stage)


__all__ = [
    "PATCHING_MODES",
    "PRESETS",
    "CrossAttentionConfig",
    "GlobalModelConfig",
    "LSTConfig",
    "LSTModel",
    "LocalModelConfig",
    "ModelConfigError",
    "TokenBaselineModel",
    "build_model",
    "finalize_lst_model_grads",
    "finalize_replicated_encoder_grads",
    "preset",
    "swiglu_ffn_size",
]
