"""Peak dense FLOP/s by device name and precision, the matmul precision a run's flags give,
and MFU."""

import contextlib

import pytest
import torch

from megatron_lst.training.device_peak import (
    device_peak_flops,
    matmul_precision,
    mfu,
    peak_flops_by_name,
)


def test_peak_flops_table_and_mfu():
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_by_name("NVIDIA GeForce RTX 3090") is None
    assert peak_flops_by_name("NVIDIA H100 NVL") is None  # power-capped: not in the table
    assert device_peak_flops("cpu") is None
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    # Other precisions: fp16 as bf16, TF32 tensor cores at half of it, plain FP32 far below.
    for name, fp32, tf32, bf16 in [("NVIDIA H100 80GB HBM3", 67e12, 494e12, 989e12),
                                   ("NVIDIA H100 PCIe", 51e12, 378e12, 756e12),
                                   ("NVIDIA H200", 67e12, 494e12, 989e12),
                                   ("NVIDIA A100-SXM4-40GB", 19.5e12, 156e12, 312e12)]:
        assert peak_flops_by_name(name, "fp16") == peak_flops_by_name(name, "bf16") == bf16
        assert peak_flops_by_name(name, "tf32") == tf32
        assert peak_flops_by_name(name, "fp32") == fp32
    assert peak_flops_by_name("NVIDIA H100 NVL", "fp32") is None
    with pytest.raises(ValueError, match="precision 'fp8'"):
        peak_flops_by_name("NVIDIA H200", "fp8")


@contextlib.contextmanager
def allow_tf32(value: bool):
    """torch.backends.cuda.matmul.allow_tf32 = value for the block (monkeypatch cannot set it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_matmul_precision_follows_the_flags_and_torch_tf32():
    with allow_tf32(False):
        assert matmul_precision(bf16=True) == "bf16"
        assert matmul_precision(fp16=True) == "fp16"
        assert matmul_precision() == "fp32"
    with allow_tf32(True):
        assert matmul_precision() == "tf32"
        assert matmul_precision(bf16=True) == "bf16"
    assert mfu(1e12, None) is None
