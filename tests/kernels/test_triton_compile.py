"""Compiles every Triton kernel (bf16 inputs) for an H100/H200 (sm_90) down to a cubin, no GPU
needed: one tile each, then every config the autotuner may pick, within sm_90's shared memory,
and the smallest attention config at the largest head dim the kernel takes (256), fp32 included.

The interpreter runs kernels as NumPy and misses what only the compiler checks (loop-carried
types, layouts, lowering); this catches those on CPU-only machines.
"""

import pytest
from lst_kernels.backend import interpret_requested

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(interpret_requested(), reason="interpreter mode"),
]

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - older Triton
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

import triton.language as tl  # noqa: E402
from lst_kernels import _triton_utils, patch_attention_triton, segment_pool_triton  # noqa: E402
from lst_kernels.patch_attention import TRITON_MAX_FP64_HEAD_DIM  # noqa: E402

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


def _signature(kernel, dtype: str, constexprs: dict, argmax: str = "*u8", stats: str = "fp32"
               ) -> dict:
    """Argument types by naming convention: `*_ptr` pointers, `scale*` floats, the rest i32;
    `stats` is the attention's log-sum-exp and delta type (fp64 for fp64 inputs)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in FP32_POINTERS:
            signature[name] = f"*{stats}"
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
    constexprs = {"PRECISION": "tf32", "ACC_DTYPE": tl.float32, "BLOCK_M": 64, "BLOCK_N": 64,
                  "BLOCK_D": 64}
    for kernel in (
        patch_attention_triton._attn_fwd_kernel,
        patch_attention_triton._attn_bwd_dq_kernel,
        patch_attention_triton._attn_bwd_dkdv_kernel,
    ):
        _compile(kernel, _signature(kernel, "bf16", constexprs), constexprs, num_stages=2)


@pytest.mark.parametrize("head_block", [64, _triton_utils.head_block(TRITON_MAX_FP64_HEAD_DIM)])
def test_fp64_attention_kernels_compile_and_fit(head_block):
    # fp64 inputs (gradcheck on CUDA) reach the Triton kernels under backend="auto": they failed
    # to compile ("Loop-carried variable row_max has initial type fp32 but is re-assigned to
    # fp64"), and at head dim 128 none of the large tiles the autotuner tried fit (dQ and dK/dV
    # need 264-710 KiB). At 64 the smallest tried fits (the autotuner skips the rest); at 128
    # every tried one does.
    tried = _tried_configs(patch_attention_triton._fwd_tuned, "ieee", head_block, tl.float64)
    if head_block == 64:
        tried = [min(tried, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                           c.num_stages))]
    for config in tried:
        constexprs = {"PRECISION": "ieee", "ACC_DTYPE": tl.float64, "BLOCK_D": head_block,
                      **config.kwargs}
        for name in ATTENTION_KERNELS:
            kernel = getattr(patch_attention_triton, name).fn
            signature = _signature(kernel, "fp64", constexprs, stats="fp64")
            compiled = _compile(kernel, signature, constexprs, config.num_warps,
                                config.num_stages)
            assert compiled.metadata.shared <= SM90_MAX_SHARED_BYTES, (name, str(config))


def test_fp64_heads_past_the_limit_have_no_backward_tile_that_fits():
    # Why the Triton path refuses fp64 heads past TRITON_MAX_FP64_HEAD_DIM (128): one channel more
    # takes the next head block, 256, where even the smallest tile the autotuner tries (32 x 32,
    # one stage) needs more than sm_90's shared memory in the dQ and dK/dV kernels (256 and 320
    # KiB), so a backward there had no config to run. (At the limit every tried config fits:
    # `test_fp64_attention_kernels_compile_and_fit`.)
    head_block = _triton_utils.head_block(TRITON_MAX_FP64_HEAD_DIM + 1)
    for name in ("_dq_tuned", "_dkdv_tuned"):
        tuned = getattr(patch_attention_triton, name)
        tried = _tried_configs(tuned, "ieee", head_block, tl.float64)
        smallest = min(tried, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                             c.num_stages))
        constexprs = {"PRECISION": "ieee", "ACC_DTYPE": tl.float64, "BLOCK_D": head_block,
                      **smallest.kwargs}
        compiled = _compile(tuned.fn, _signature(tuned.fn, "fp64", constexprs, stats="fp64"),
                            constexprs, smallest.num_warps, smallest.num_stages)
        assert compiled.metadata.shared > SM90_MAX_SHARED_BYTES, (name, str(smallest))


def _shared_bytes_of_every_config(tuned, fixed: dict, dtype: str) -> dict:
    """Shared memory of each autotune config of `tuned`, compiled for sm_90: {tiles: bytes}."""
    shared = {}
    for config in tuned.configs:
        constexprs = {**fixed, **config.kwargs}
        signature = _signature(tuned.fn, dtype, constexprs)
        compiled = _compile(tuned.fn, signature, constexprs, config.num_warps, config.num_stages)
        shared[str(config)] = compiled.metadata.shared
    return shared


ATTENTION_KERNELS = ("_fwd_tuned", "_dq_tuned", "_dkdv_tuned")


def test_every_bf16_autotune_config_fits_sm90_shared_memory():
    # Training's dtype, at the heaviest shapes: head dim 128 (BLOCK_D 128) for attention, max
    # (with its arg-max) for the segment pool. Every config must compile and fit.
    cases = [(getattr(patch_attention_triton, name),
              {"PRECISION": "tf32", "ACC_DTYPE": tl.float32, "BLOCK_D": 128})
             for name in ATTENTION_KERNELS]
    cases += [(tuned, {"REDUCE": 0, "ACC_DTYPE": tl.float32})
              for tuned in (segment_pool_triton._fwd_tuned, segment_pool_triton._bwd_tuned)]
    for tuned, fixed in cases:
        shared = _shared_bytes_of_every_config(tuned, fixed, "bf16")
        too_big = {c: b for c, b in shared.items() if b > SM90_MAX_SHARED_BYTES}
        assert not too_big, (tuned.fn.__name__, too_big)


def _tried_configs(tuned, precision: str, head_block: int, accumulator=tl.float32) -> list:
    """The configs the autotuner tries for a launch with these constexprs: its early prune, called
    as Triton calls it (configs, the launch's named arguments, the constexprs as keywords)."""
    return tuned.early_config_prune(tuned.configs, {}, PRECISION=precision,
                                    ACC_DTYPE=accumulator, BLOCK_D=head_block)


def test_the_autotuner_tries_the_small_tiles_only_for_wide_fp32_and_fp64_heads():
    # Each config tried costs a compilation (minutes for the large tiles at head dim 256, which
    # do not even fit in fp32): fp32 at 256 and fp64 at 128 or more try the 32-query tiles,
    # every other launch the rest.
    for name in ATTENTION_KERNELS:
        tuned = getattr(patch_attention_triton, name)
        small = [c for c in tuned.configs if c.kwargs["BLOCK_M"] == 32]
        large = [c for c in tuned.configs if c.kwargs["BLOCK_M"] != 32]
        assert small and large
        assert _tried_configs(tuned, "ieee", 256) == small
        for head_block in (128, 256):
            assert _tried_configs(tuned, "ieee", head_block, tl.float64) == small
        for precision, head_block in (("ieee", 128), ("tf32", 256), ("tf32", 64), ("ieee", 16)):
            assert _tried_configs(tuned, precision, head_block) == large
        assert _tried_configs(tuned, "ieee", 64, tl.float64) == large


@pytest.mark.parametrize("dtype, head_block", [("fp32", 128), ("fp32", 256), ("bf16", 256)])
def test_attention_keeps_a_config_that_fits_at_large_heads(dtype, head_block):
    # fp32 tiles take twice the bytes and head dim 256 twice again. The autotuner skips a config
    # that runs out of resources, but the configs it tries must hold one that fits, or a launch
    # at that head dim would have none to run; for fp32 at 256 every config it tries must fit.
    precision = "ieee" if dtype == "fp32" else "tf32"
    for name in ATTENTION_KERNELS:
        tuned = getattr(patch_attention_triton, name)
        tried = _tried_configs(tuned, precision, head_block)
        if (dtype, head_block) != ("fp32", 256):
            tried = [min(tried, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                               c.num_stages))]
        for config in tried:
            constexprs = {"PRECISION": precision, "ACC_DTYPE": tl.float32,
                          "BLOCK_D": head_block, **config.kwargs}
            compiled = _compile(tuned.fn, _signature(tuned.fn, dtype, constexprs), constexprs,
                                config.num_warps, config.num_stages)
            assert compiled.metadata.shared <= SM90_MAX_SHARED_BYTES, (name, str(config))
