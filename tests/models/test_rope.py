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


def test_half_precision_input_is_cast_to_fp32_once():
    """A bf16 `x` is copied to fp32 once (and the result back once), not once for each of its
    two uses: every local layer rotates its queries and keys, so a second copy is a full extra
    fp32 write and read of both. The result is the fp32 rotation rounded once to bf16."""
    from host_syncs import count_aten_ops

    x = torch.randn(2, 9, 3, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    cos, sin = RotaryTable(8, 10000.0).cos_sin(9, "cpu")
    with count_aten_ops() as ops:
        out = apply_interleaved_rope(x, cos, sin)
    assert ops[torch.ops.aten._to_copy.default] == 2
    assert torch.equal(out, apply_interleaved_rope(x.float(), cos, sin).bfloat16())


def test_a_table_sliced_from_a_longer_one_is_the_table_of_its_length():
    """RotaryTable keeps one table per device, of a power-of-two length, and slices it: every
    length gets exactly (bitwise) the entries a table of that length has."""
    from megatron_lst.models.rope import rotary_angles

    table = RotaryTable(64, 10000.0)
    for seq_len in (1, 2, 3, 13, 64, 65, 300, 4097, 17):
        angles = rotary_angles(seq_len, 64, 10000.0, "cpu")  # [S, 1, 1, d]
        assert torch.equal(table.angles(seq_len, "cpu"), angles)
        cos, sin = table.cos_sin(seq_len, "cpu")  # [1, S, 1, d]
        assert torch.equal(cos, angles[:, 0].unsqueeze(0).cos())
        assert torch.equal(sin, angles[:, 0].unsqueeze(0).sin())
        assert cos.is_contiguous() and table.angles(seq_len, "cpu").is_contiguous()
