"""Compiles every Triton kernel (bf16 inputs) for an H100/H200 (sm_90) down to a cubin, no GPU
needed: one tile each, then every config the autotuner may pick, within sm_90's shared memory.

The interpreter runs kernels as NumPy and misses what only the compiler checks (loop-carried
types, layouts, lowering); this catches those on CPU-only machines.
"""

import os

import pytest

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter mode"),
]

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - older Triton
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

import triton.language as tl  # noqa: E402
from lst_kernels import patch_attention_triton, segment_pool_triton  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# Shared memory one block may use on sm_90 (H100/H200: 227 KiB with the opt-in carve-out).
SM90_MAX_SHARED_BYTES = 227 * 1024
INT32_POINTERS = {
    "start_ptr",
    "end_ptr",
    "ks_ptr",
    "ke_ptr",
    "token_patch_ptr",
    "first_query_ptr",
    "end_query_ptr",
}
FP32_POINTERS = {"lse_ptr", "delta_ptr"}


def _signature(kernel, dtype: str, constexprs: dict, argmax: str = "*u8") -> dict:
    """Argument types by naming convention: `*_ptr` pointers, `scale*` floats, the rest i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name == "argmax_ptr":
            signature[name] = argmax
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _compile(kernel, signature, constexprs, num_warps=4, num_stages=3):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source,
        target=H100,
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True},
    )
    assert compiled.asm["cubin"]
    return compiled


@pytest.mark.parametrize("reduce", [0, 1, 2], ids=["max", "mean", "sum"])
def test_segment_pool_kernels_compile(reduce):
    for kernel, block in (
        (segment_pool_triton._segment_pool_fwd_kernel, {"BLOCK_T": 4, "BLOCK_D": 512}),
        (segment_pool_triton._segment_pool_bwd_kernel, {"BLOCK_N": 32, "BLOCK_D": 256}),
    ):
        constexprs = {"REDUCE": reduce, "ACC_DTYPE": tl.float32, **block}
        _compile(kernel, _signature(kernel, "bf16", constexprs), constexprs)


def test_attention_kernels_compile():
    # bf16, the training dtype (fp32 inputs differ only in `tl.dot`'s input precision).
    constexprs = {"PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}
    for kernel in (
        patch_attention_triton._attn_fwd_kernel,
        patch_attention_triton._attn_bwd_dq_kernel,
        patch_attention_triton._attn_bwd_dkdv_kernel,
    ):
        _compile(kernel, _signature(kernel, "bf16", constexprs), constexprs, num_stages=2)


def _autotune_configs(tuned):
    return [(config.kwargs, config.num_warps, config.num_stages) for config in tuned.configs]


def test_every_autotune_config_compiles_within_sm90_shared_memory():
    # The configs the GPU autotuner may pick, at their heaviest: head dim 128 (BLOCK_D 128) for
    # attention, max with its arg-max for the segment pool.
    attention = {"PRECISION": "tf32", "BLOCK_D": 128}
    pool = {"REDUCE": 0, "ACC_DTYPE": tl.float32}
    for tuned, fixed in (
        (patch_attention_triton._fwd_tuned, attention),
        (patch_attention_triton._dq_tuned, attention),
        (patch_attention_triton._dkdv_tuned, attention),
        (segment_pool_triton._fwd_tuned, pool),
        (segment_pool_triton._bwd_tuned, pool),
    ):
        for tiles, num_warps, num_stages in _autotune_configs(tuned):
            constexprs = {**fixed, **tiles}
            kernel = tuned.fn
            compiled = _compile(
                kernel, _signature(kernel, "bf16", constexprs), constexprs, num_warps, num_stages
            )
            shared = compiled.metadata.shared
            assert shared <= SM90_MAX_SHARED_BYTES, (kernel.__name__, tiles, shared)
