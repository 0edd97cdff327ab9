"""The RoPE table equals megatron's interleaved RotaryEmbedding, and applying it rotates
interleaved pairs as complex numbers (the reference's `apply_rotary_emb`)."""

import torch

from megatron_lst.models.rope import RotaryTable, apply_interleaved_rope


def test_angles_equal_megatron_rotary_embedding(single_rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    megatron_rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_interleaved=True,
                                    rotary_base=500000, use_cpu_initialization=True)
    torch.testing.assert_close(RotaryTable(16, 500000.0).angles(37, "cpu"), megatron_rope(37),
                               atol=0, rtol=0)


def test_rotation_is_complex_multiplication():
    head_dim, theta, seq = 8, 10000.0, 11
    x = torch.randn(2, seq, 3, head_dim)
    cos, sin = RotaryTable(head_dim, theta).cos_sin(seq, "cpu")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    phase = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), inv_freq))
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
                                  * phase[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(apply_interleaved_rope(x, cos, sin), expected, atol=1e-6, rtol=1e-5)
