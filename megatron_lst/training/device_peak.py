"""Peak dense FLOP/s of a GPU in a run's math mode (`matmul_precision`), from NVIDIA's
datasheets, and model FLOP utilisation (MFU): the model FLOP/s counted by `flops.py` over that
peak."""

from __future__ import annotations

import torch

__all__ = [
    "PEAK_DENSE_FLOPS",
    "matmul_precision",
    "peak_flops_by_name",
    "device_peak_flops",
    "mfu",
]


# Peak dense (no structured sparsity) FLOP/s per GPU and math mode, from NVIDIA's datasheets.
# bf16 tensor cores (fp16 has the same peak): H100 SXM5 and H200 SXM 1,979 TFLOPS "with sparsity"
# -> 989 dense; H100 PCIe 1,513 -> 756; A100 SXM4 and PCIe 312. TF32 tensor cores: 989 -> 494,
# 756 -> 378, A100 156. Plain FP32 (CUDA cores, what fp32 matmuls use while torch leaves TF32 off,
# its default): 67, 51, 19.5. Matched against torch.cuda.get_device_name(), first match wins. The
# power-capped NVL boards are left out on purpose (None), as are all other GPUs: no MFU for them.
PEAK_DENSE_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float] | None], ...] = (
    (("NVL",), None),
    (("H200",), {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (("H100", "PCIe"), {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    # SXM5 boards report themselves as "NVIDIA H100 80GB HBM3".
    (("H100", "HBM3"), {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (("H100", "SXM"), {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (("A100",), {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def matmul_precision(bf16: bool = False, fp16: bool = False) -> str:
    """The math mode of a run's matrix products, a key of the peak tables: "bf16" or "fp16"
    (lst-train --bf16 / --fp16), else fp32 weights multiplied in TF32 when torch allows it
    (`torch.backends.cuda.matmul.allow_tf32`) or in plain FP32 (torch's default)."""
    if bf16 or fp16:
        return "bf16" if bf16 else "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops_by_name(device_name: str, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s in `precision` ("bf16", "fp16", "tf32" or "fp32") of a GPU named like
    torch.cuda.get_device_name() reports it, or None when the GPU is missing from the tables."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {sorted(PRECISIONS)}")
    for parts, peaks in PEAK_DENSE_FLOPS:
        if all(part.lower() in device_name.lower() for part in parts):
            return None if peaks is None else peaks["bf16" if precision == "fp16" else precision]
    return None


def device_peak_flops(device: torch.device | str | None = None,
                      precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s in `precision` (see `peak_flops_by_name`) of a device (default: the
    current CUDA device); None on CPU, when CUDA is absent, and on unknown GPUs."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), precision)


def mfu(flops_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation of one device: achieved model FLOP/s (from `flops_per_batch`,
    divided by the step time and the number of devices) over its peak; None without a peak."""
    if peak_flops is None:
        return None
    return flops_per_s / peak_flops
