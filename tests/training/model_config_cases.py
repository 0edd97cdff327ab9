"""Random valid model configurations (hypothesis) for the flag and checkpoint round trips."""

from __future__ import annotations

from hypothesis import strategies as st

from megatron_lst.models.config import (
    POOLINGS,
    CrossAttentionConfig,
    DocumentMaskingConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
)

EOS_ID = 2
"""The EOS of every drawn configuration's vocabulary (`JointVocab`'s layout puts it at 2)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def lst_configs(draw, max_width: int = 48, max_layers: int = 3) -> LSTConfig:
    """Any `LSTConfig` the model accepts, within small sizes: every field drawn independently
    of the presets (local FFN widths, windows, slot counts, switches, epsilons, RoPE bases)."""
    heads = draw(st.integers(1, 4))
    global_model = GlobalModelConfig(
        hidden_size=heads * 2 * draw(st.integers(1, max_width // 8)),  # even head dim (RoPE)
        num_layers=draw(st.integers(1, max_layers)),
        num_heads=heads,
        ffn_hidden_size=draw(st.integers(1, 4 * max_width)),
        num_query_groups=draw(st.sampled_from(_divisors(heads))),
        kv_channels=draw(st.sampled_from((None, 2, 6, 16))),  # None: hidden / heads
    )
    local_hidden = 2 * draw(st.integers(1, max_width // 2))
    even_head_counts = [d for d in _divisors(local_hidden) if (local_hidden // d) % 2 == 0]

    def local() -> LocalModelConfig:
        local_heads = draw(st.sampled_from(even_head_counts))
        return LocalModelConfig(
            hidden_size=local_hidden,
            num_layers=draw(st.integers(1, max_layers)),
            num_heads=local_heads,
            ffn_hidden_size=draw(st.integers(1, 4 * max_width)),
            window=draw(st.integers(1, 4096)),
            num_query_groups=draw(st.sampled_from(_divisors(local_heads))),
            kv_channels=draw(st.sampled_from((None, 2, 10))),  # None: hidden / heads
        )

    return LSTConfig(
        vocab_size=draw(st.integers(16, 600)),
        global_model=global_model,
        encoder=local(),
        decoder=local(),
        cross_attention=CrossAttentionConfig(
            slots_per_patch=draw(st.integers(1, 4)),
            num_heads=draw(st.sampled_from(_divisors(local_hidden))),
            encoder_window=draw(st.integers(1, 4096)),
            decoder_window=draw(st.integers(1, 4096)),
            all_encoder_layers=draw(st.booleans()),
            all_decoder_layers=draw(st.booleans()),
            pooling=draw(st.sampled_from(POOLINGS)),
            double_residual=draw(st.booleans()),
        ),
        norm_eps=draw(st.floats(1e-12, 1e-2)),
        rope_theta=draw(st.floats(1.0, 1e7)),
        max_sequence_length=draw(st.integers(2, 1 << 20)),
        documents=draw(st.sampled_from((
            None,  # both switches off
            DocumentMaskingConfig(EOS_ID, reset_attention_mask=True, reset_position_ids=False),
            DocumentMaskingConfig(EOS_ID, reset_attention_mask=True, reset_position_ids=True),
            DocumentMaskingConfig(EOS_ID, reset_attention_mask=False, reset_position_ids=True),
            # the reference's rules: cross-attention (and global attention) across documents
            DocumentMaskingConfig(EOS_ID, reset_cross_attention=False),
            DocumentMaskingConfig(EOS_ID, reset_cross_attention=False, reset_global_attention=False),
        ))),
        init_std=draw(st.floats(1e-5, 1.0)),
    )
