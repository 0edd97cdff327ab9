"""Model configuration: SwiGLU widths, presets, validation, the megatron config and the builder."""

import pytest
import torch

from megatron_lst.models import (
    PRESETS,
    LSTModel,
    ModelConfigError,
    TokenBaselineModel,
    build_model,
    preset,
    swiglu_ffn_size,
)
from megatron_lst.models.config import (
    CUDA_FUSIONS,
    GlobalModelConfig,
    LocalModelConfig,
    check_tensor_parallel_vocab,
)


@pytest.mark.parametrize("hidden,expected", [(32, 256), (64, 256), (1024, 2816), (2048, 5632), (4096, 11008)])
def test_swiglu_width_follows_reference_rule(hidden, expected):
    assert swiglu_ffn_size(hidden) == expected


def test_paper_1b_preset():
    config = preset("paper-1b", vocab_size=32508)
    g = config.global_model
    assert (g.num_layers, g.hidden_size, g.num_heads) == (25, 2048, 16)
    assert (config.encoder.num_layers, config.encoder.hidden_size) == (1, 1024)
    assert (config.decoder.num_layers, config.decoder.hidden_size) == (9, 1024)
    assert config.encoder.window == config.decoder.window == 512
    assert config.cross_attention.encoder_window == config.cross_attention.decoder_window == 512
    assert config.rope_theta == 5e5
    assert config.patch_width == g.hidden_size  # k * 1024 == 2048: no global input projection


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_consistent_configs(name):
    config = preset(name, vocab_size=1020)
    megatron_config = config.transformer_config()
    assert megatron_config.rotary_interleaved and megatron_config.gated_linear_unit
    assert megatron_config.normalization == "RMSNorm" and not megatron_config.add_bias_linear
    assert megatron_config.ffn_hidden_size == config.global_model.ffn_hidden_size
    assert not any(getattr(megatron_config, fusion) for fusion in CUDA_FUSIONS)


def test_invalid_configs_name_the_problem():
    with pytest.raises(ModelConfigError, match="decoder hidden_size"):
        tiny = preset("tiny", 64)
        type(tiny)(vocab_size=64, global_model=tiny.global_model, encoder=tiny.encoder,
                   decoder=LocalModelConfig(64, 1, 2, 256))
    with pytest.raises(ModelConfigError, match="not divisible by num_heads"):
        LocalModelConfig(30, 1, 4, 128)
    with pytest.raises(ModelConfigError, match="unknown model preset"):
        preset("3b", 64)
    config = preset("tiny", 1021)
    with pytest.raises(ModelConfigError, match="tensor_model_parallel_size 2"):
        check_tensor_parallel_vocab(config, config.transformer_config(tensor_model_parallel_size=2))


@pytest.mark.parametrize(("stack", "fields", "message"), [
    (GlobalModelConfig, {"hidden_size": 0},
     r"^global hidden_size \(0\), num_layers \(2\), num_heads \(4\), ffn_hidden_size \(256\), "
     r"num_query_groups \(None\), kv_channels \(None\) must be >= 1$"),
    (GlobalModelConfig, {"kv_channels": 0}, r"^global .*kv_channels \(0\) must be >= 1$"),
    (LocalModelConfig, {"window": 0},
     r"^local hidden_size \(64\), num_layers \(2\), num_heads \(4\), window \(0\), "
     r"ffn_hidden_size \(256\), num_query_groups \(None\), kv_channels \(None\) must be >= 1$"),
    (GlobalModelConfig, {"num_query_groups": 3}, r"^global num_heads 4 is not divisible by "
                                                 r"num_query_groups 3"),
    (LocalModelConfig, {"num_query_groups": 3}, r"^local num_heads 4 is not divisible by "
                                                r"num_query_groups 3"),
])
def test_a_stack_below_one_or_with_heads_that_do_not_fit_is_named(stack, fields, message):
    """The local and global stacks name every size with its value, and which stack it is."""
    with pytest.raises(ModelConfigError, match=message):
        stack(**{"hidden_size": 64, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 256,
                 **fields})



@pytest.mark.parametrize("field", ["norm_eps", "rope_theta", "init_std"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), None])
def test_scales_must_be_positive_numbers(field, value):
    """A non-positive RoPE base or norm epsilon gave NaN logits, which lst-convert then blamed
    on the conversion."""
    import dataclasses

    with pytest.raises(ModelConfigError, match=f"{field} must be a positive number"):
        dataclasses.replace(preset("tiny", 64), **{field: value})

def test_build_model_picks_the_baseline_for_mode_none(single_rank):
    config = preset("tiny", vocab_size=64)
    megatron_config = config.transformer_config()
    torch.manual_seed(0)
    assert isinstance(build_model(config, "none", megatron_config, transformer_impl="local"),
                      TokenBaselineModel)
    for mode in ("static", "aligned", "mixed", "curriculum"):
        assert isinstance(build_model(config, mode, megatron_config, transformer_impl="local"), LSTModel)
    with pytest.raises(ModelConfigError, match="patching mode"):
        build_model(config, "entropy", megatron_config)
