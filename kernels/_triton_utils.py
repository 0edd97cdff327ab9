"""Shared launch settings for the Triton kernels."""

import torch
import triton
import triton.language as tl

from .backend import interpret_requested, triton_interpreted

# Whether the kernels, defined right after this module is imported, run in the interpreter.
INTERPRETED = interpret_requested()


def use_autotune(*tensors: torch.Tensor) -> bool:
    """Autotune only for compiled CUDA launches; the interpreter uses fixed tiny blocks."""
    return not triton_interpreted() and all(t.is_cuda for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact for fp32/fp64 inputs (no silent TF32); half precision
    ignores it."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def head_block(head_dim: int) -> int:
    """Padded head dimension: a power of two, at least 16 (the smallest `tl.dot` size)."""
    return max(16, triton.next_power_of_2(head_dim))


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """The kernels' accumulation type for inputs of `dtype`: fp64 for fp64 (gradcheck), else
    fp32 (`segment_pool_reference.accumulation_dtype` as a Triton type)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
