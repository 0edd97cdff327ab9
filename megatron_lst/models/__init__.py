"""LST and the token baseline on megatron.core (docs/architecture.md).

`build_model` picks the model for a patching mode: `none` gives the token baseline, every other
mode the LST model (patching itself happens in the data pipeline; the model reads patch_lengths).
"""

from __future__ import annotations

from megatron_lst.patching.curriculum import PATCHING_MODES

from .baseline import TokenBaselineModel
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
from .lst_model import LSTModel
from .replicated_parameters import finalize_lst_model_grads, finalize_replicated_encoder_grads


def build_model(
    config: LSTConfig,
    patching_mode: str,
    megatron_config,
    pre_process: bool = True,
    post_process: bool = True,
    transformer_impl: str = "auto",
    local_attention_backend: str = "auto",
    kernel_backend: str = "auto",
):
    """`TokenBaselineModel` for patching mode "none", else `LSTModel`, for one pipeline stage.

    Both are called as `model(tokens, patch_lengths, labels)`. Train with
    `config.finalize_model_grads_func = finalize_lst_model_grads` (it is megatron's
    `finalize_model_grads` for the baseline, plus the LST encoder-replica reduction under PP).
    """
    if patching_mode not in PATCHING_MODES:
        raise ModelConfigError(f"patching mode {patching_mode!r} is not one of {PATCHING_MODES}")
    if patching_mode == "none":
        return TokenBaselineModel(config, megatron_config, pre_process, post_process, transformer_impl,
                                  kernel_backend)
    return LSTModel(config, megatron_config, pre_process, post_process, transformer_impl,
                    local_attention_backend, kernel_backend)


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
