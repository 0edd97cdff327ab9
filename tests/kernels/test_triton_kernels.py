"""Triton kernels vs the PyTorch references, forward and backward, at the interpreter's tiles and
at every tile size the GPU autotuner may pick.

Runs compiled on CUDA, or on CPU under the Triton interpreter when this process started with
TRITON_INTERPRET=1 (`test_triton_interpreter.py` launches exactly that in a subprocess, so a plain
`pytest tests/` covers it). Otherwise every test here skips. The interpreter computes bf16
`tl.dot` wrongly, so on CPU `patch_cross_attention` runs bf16 inputs upcast to fp32.
"""


import pytest
import torch
from kernel_cases import model_key_ranges, random_patch_lengths
from lst_kernels import (
    decoder_key_ranges,
    document_starts,
    encoder_key_ranges,
    patch_cross_attention,
    patch_ids_from_lengths,
    ranges,
    segment_pool,
    sliding_window_key_starts,
    token_document_first_patch,
)
from lst_kernels.backend import interpret_requested
from patching.document_rule import (
    decoder_mask,
    dense_attention,
    encoder_mask,
    global_mask,
    self_attention_mask,
)

INTERPRETED = interpret_requested()
# Compiled runs need CUDA (the conftest skips `gpu` tests without it); interpreted ones do not.
pytestmark = [] if INTERPRETED else [pytest.mark.gpu]
pytest.importorskip("triton")
from lst_kernels import patch_attention_triton, segment_pool_triton  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
# (dtype, forward/backward tolerance vs the fp32 reference on the same rounded inputs). The
# interpreter runs bf16 only in `test_bf16_inputs`, to keep the suite fast.
DTYPES = [(torch.float32, 1e-5)] + ([] if INTERPRETED else [(torch.bfloat16, 2e-2)])


def _compare(run, inputs, tolerance):
    """Run `run(*inputs, backend=...)` on Triton and on the reference (fed fp32 copies of the same
    values); compare outputs and input gradients for one random output gradient."""
    triton_in = [t.detach().clone().requires_grad_() for t in inputs]
    reference_in = [t.detach().float().clone().requires_grad_() for t in inputs]
    out = run(*triton_in, backend="triton")
    expected = run(*reference_in, backend="torch")
    assert out.dtype == inputs[0].dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    out.backward(grad)
    expected.backward(grad.float())
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    for got, want in zip(triton_in, reference_in, strict=True):
        scale = want.grad.abs().max().clamp(min=1)
        torch.testing.assert_close(
            got.grad.float() / scale, want.grad / scale, rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize("dtype, tolerance", DTYPES, ids=lambda d: str(d))
@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
@pytest.mark.parametrize("seed", range(3))
def test_segment_pool(reduce, seed, dtype, tolerance):
    generator = torch.Generator().manual_seed(seed)
    lengths = random_patch_lengths(generator, batch=3, num_patches=9)
    num_tokens = max(int(lengths.sum(1).max()) + seed - 1, 1)  # sums below, at and above N
    dim = 13 + 24 * seed  # not a multiple of any channel block
    x = torch.randn(3, num_tokens, dim + 5, generator=generator)
    if reduce == "max":
        x = x.round(decimals=1)  # ties: the gradient must go to the first arg-max
    x = x.to(DEVICE, dtype)

    def run(x, backend):
        # A strided channel slice: the kernel must honour the row strides.
        return segment_pool(x[..., 2 : 2 + dim], lengths.to(DEVICE), reduce, backend=backend)

    _compare(run, [x], tolerance)


def test_segment_pool_max_long_patches():
    # N > 256 stores the arg-max offsets as int16: offsets past 255 must survive the round trip.
    num_tokens = 300
    lengths = torch.tensor([[1, 280, 0, 9], [0, 3, 290, 1]], dtype=torch.int32)
    x = torch.randn(2, num_tokens, 3, generator=torch.Generator().manual_seed(5))
    x[0, 270, :] = 9.0  # offset 269 in patch 1
    x[1, 295, 1] = 9.0  # offset 292 in patch 2
    x = x.to(DEVICE)
    _compare(
        lambda t, backend: segment_pool(t, lengths.to(DEVICE), "max", backend=backend), [x], 1e-6
    )


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_segment_pool_counts_unchecked_negative_lengths_as_empty(monkeypatch, reduce):
    # CUDA lengths are not checked for negatives (that would sync the host): a negative length
    # must count as 0, never start a patch before its row (an out-of-bounds read of x). The
    # interpreter runs on CPU, where lengths are checked: switch the check off to take that path.
    monkeypatch.setattr(ranges, "_refuse_negative_lengths", lambda patch_lengths: None)
    lengths = torch.tensor([[-2, 3, 2], [3, -1, 4]], dtype=torch.int32)
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    triton_x, reference_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = segment_pool(triton_x, lengths.to(DEVICE), reduce, backend="triton")
    expected = segment_pool(reference_x, lengths.clamp(min=0).to(DEVICE), reduce, backend="torch")
    out.backward(torch.ones_like(out))
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(triton_x.grad, reference_x.grad, rtol=0, atol=1e-6)


def _attention_case(seed, direction, k, window, head_dim=16, heads=2):
    generator = torch.Generator().manual_seed(seed)
    lengths = random_patch_lengths(generator, batch=2, num_patches=13, max_length=5)
    num_tokens = max(int(lengths.sum(1).max()) - 1, 1)
    start, end, num_queries, num_keys = model_key_ranges(
        lengths, num_tokens, direction, k, window
    )
    q = torch.randn(2, num_queries, heads, head_dim, generator=generator)
    kv = torch.randn(2, num_keys, heads, 2 * head_dim, generator=generator)
    return q, kv, start, end


@pytest.mark.parametrize("dtype, tolerance", DTYPES, ids=lambda d: str(d))
@pytest.mark.parametrize("direction", ["decoder", "encoder"])
@pytest.mark.parametrize("k, window", [(1, 1), (2, 1), (1, 2), (2, 3), (2, 64)])
def test_patch_cross_attention(direction, k, window, dtype, tolerance):
    q, kv, start, end = _attention_case(window * 10 + k, direction, k, window)
    q, kv = q.to(DEVICE, dtype), kv.to(DEVICE, dtype)
    start, end = start.to(DEVICE), end.to(DEVICE)
    head_dim = q.shape[-1]

    def run(q, kv, backend):
        # k and v as strided views of one packed tensor: the kernel must honour strides.
        return patch_cross_attention(
            q, kv[..., :head_dim], kv[..., head_dim:], start, end, backend=backend
        )

    _compare(run, [q, kv], tolerance)


@pytest.mark.parametrize("head_dim, heads, kv_heads", [(8, 3, 3), (12, 3, 3), (200, 3, 3),
                                                      (12, 6, 2)])
def test_patch_cross_attention_arbitrary_ranges(head_dim, heads, kv_heads):
    # Non-monotone ranges, empty ranges, out-of-bounds ends, head dims that are not a power of two
    # (200: 56 of the 256 padded channels masked, at the kernel's largest head block); the dK/dV
    # pass over all queries (non-monotone), for each of a group's three query heads.
    generator = torch.Generator().manual_seed(head_dim)
    num_queries, num_keys = 37, 29
    start = torch.randint(-3, num_keys, (2, num_queries), generator=generator, dtype=torch.int32)
    end = start + torch.randint(-2, 20, (2, num_queries), generator=generator, dtype=torch.int32)
    q = torch.randn(2, num_queries, heads, head_dim, generator=generator).to(DEVICE)
    k = torch.randn(2, num_keys, kv_heads, head_dim, generator=generator).to(DEVICE)
    v = torch.randn(2, num_keys, kv_heads, head_dim, generator=generator).to(DEVICE)
    start, end = start.to(DEVICE), end.to(DEVICE)

    def run(q, k, v, backend):
        return patch_cross_attention(q, k, v, start, end, scale=0.2, backend=backend)

    _compare(run, [q, k, v], 1e-5)


@pytest.mark.parametrize("dtype, num_keys", [(torch.int8, 130), (torch.uint8, 260)])
def test_patch_cross_attention_takes_ranges_in_a_narrow_integer_dtype(dtype, num_keys):
    """Ranges in an integer dtype that cannot hold Sk (int8 over 130 keys, uint8 over 260), some
    starting below 0: the Triton path clipped them to [0, Sk] in their own dtype, which `clamp`
    refuses ("value cannot be converted to type int8_t without overflow"); they give the
    reference's output and gradients."""
    generator = torch.Generator().manual_seed(8)
    num_queries = 9
    end = torch.randint(1, torch.iinfo(dtype).max + 1, (2, num_queries), generator=generator)
    end = end.sort().values
    start = end - 20 if dtype.is_signed else (end - 20).clamp(min=0)
    assert num_keys > torch.iinfo(dtype).max and (start < 0).any() == dtype.is_signed
    start, end = start.to(DEVICE, dtype), end.to(DEVICE, dtype)
    q = torch.randn(2, num_queries, 2, 16, generator=generator)
    k, v = (torch.randn(2, num_keys, 2, 16, generator=generator) for _ in range(2))
    _compare(lambda *qkv, backend: patch_cross_attention(*qkv, start, end, backend=backend),
             [t.to(DEVICE) for t in (q, k, v)], 1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=lambda d: str(d))
@pytest.mark.parametrize("direction, kv_heads", [("decoder", 1), ("encoder", 2), ("window", 2)])
def test_patch_cross_attention_grouped_kv_heads(direction, kv_heads, dtype, tolerance):
    """k/v with G < H = 4 heads (query head h reads h // (H / G)) over several 16-wide tiles each
    way: the forward and dQ read the group's head, the dK/dV pass sums the group's query heads."""
    generator = torch.Generator().manual_seed(kv_heads)
    if direction == "window":  # the local and global self-attention: keys [i - W + 1, i + 1)
        num_queries = num_keys = 70
        end = torch.arange(1, num_keys + 1).expand(2, num_keys)
        start = (end - 23).clamp(min=0)
    else:
        lengths = random_patch_lengths(generator, batch=2, num_patches=40, max_length=5)
        num_tokens = max(int(lengths.sum(1).max()) - 1, 1)
        start, end, num_queries, num_keys = model_key_ranges(
            lengths, num_tokens, direction, 2, 3)
    assert min(num_queries, num_keys) > 2 * 16  # three tiles or more
    head_dim = 16
    q = torch.randn(2, num_queries, 4, head_dim, generator=generator).to(DEVICE, dtype)
    kv = torch.randn(2, num_keys, kv_heads, 2 * head_dim, generator=generator).to(DEVICE, dtype)
    start, end = start.to(DEVICE), end.to(DEVICE)

    def run(q, kv, backend):
        return patch_cross_attention(
            q, kv[..., :head_dim], kv[..., head_dim:], start, end, backend=backend
        )

    _compare(run, [q, kv], tolerance)


ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")


class _CudaLaunches:
    """Stands for a kernel: records each launch's grid, and refuses one past `max_rows` programs
    on axis 1 or 2, as CUDA does at 65535 (the interpreter has no such limit)."""

    def __init__(self, kernel, max_rows: int):
        self.kernel, self.max_rows, self.grids = kernel, max_rows, []

    def __getitem__(self, grid):
        assert max(grid[1:]) <= self.max_rows, f"grid {grid} is past CUDA's limit on axes 1, 2"
        self.grids.append(grid)
        return self.kernel[grid]


def _watch_attention_kernels(monkeypatch, max_rows: int = 65535) -> dict[str, _CudaLaunches]:
    """The attention kernels, each replaced by its `_CudaLaunches` (returned by name)."""
    launches = {}
    for name in ATTENTION_KERNELS:
        launches[name] = _CudaLaunches(getattr(patch_attention_triton, name), max_rows)
        monkeypatch.setattr(patch_attention_triton, name, launches[name])
    return launches


def _grouped_attention_inputs(seed: int, heads: int = 6, kv_heads: int = 2):
    """q `[2, 21, heads, 16]`, k and v `[2, 19, kv_heads, 16]` and monotone ranges of up to 7
    keys (some empty), on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    batch, num_queries, num_keys, head_dim = 2, 21, 19, 16
    end = torch.randint(0, num_keys + 1, (batch, num_queries), generator=generator).sort().values
    start = (end - 7).clamp(min=0)
    q = torch.randn(batch, num_queries, heads, head_dim, generator=generator)
    k, v = (torch.randn(batch, num_keys, kv_heads, head_dim, generator=generator)
            for _ in range(2))
    return [t.to(DEVICE) for t in (q, k, v, start, end)]


def test_patch_cross_attention_takes_more_batch_heads_than_a_grid_axis(monkeypatch):
    """Scoring thousands of items x 16 heads in one batch passes CUDA's 65535 programs on grid
    axis 1: with that limit at 3, B x H = 12 query rows and B x G = 4 key/value rows (both cut
    inside a batch row) still give the reference's output and gradients."""
    monkeypatch.setattr(patch_attention_triton, "MAX_GRID_ROWS", 3)
    launches = _watch_attention_kernels(monkeypatch, max_rows=3)
    q, k, v, start, end = _grouped_attention_inputs(seed=4)
    _compare(lambda *qkv, backend: patch_cross_attention(*qkv, start, end, backend=backend),
             [q, k, v], 1e-5)
    assert [len(launches[name].grids) for name in ATTENTION_KERNELS] == [4, 4, 2]


# A real launch past CUDA's 65535 grid rows, compiled runs only: the interpreter has no such
# limit (the test above covers the chunking there), and `test_triton_interpreter.py` wants
# no test skipped under it.
if not INTERPRETED:
    def test_patch_cross_attention_runs_past_cudas_grid_limit():
        """4200 items x 16 heads in one batch: 67200 query rows and as many key/value rows,
        more than CUDA launches on one grid axis, at the module's own MAX_GRID_ROWS."""
        generator = torch.Generator().manual_seed(6)
        batch, length, heads, head_dim = 4200, 3, 16, 16
        assert batch * heads > patch_attention_triton.MAX_GRID_ROWS
        q, k, v = (torch.randn(batch, length, heads, head_dim, generator=generator).to(DEVICE)
                   for _ in range(3))
        end = torch.arange(1, length + 1).expand(batch, length).contiguous().to(DEVICE)  # causal
        start = torch.zeros_like(end)
        _compare(lambda *qkv, backend: patch_cross_attention(*qkv, start, end, backend=backend),
                 [q, k, v], 1e-5)


@pytest.mark.parametrize("wanted", ["q", "kv", "k", "v", "qv"])
def test_patch_cross_attention_backward_runs_only_the_passes_asked_for(monkeypatch, wanted):
    """Frozen keys and values (fine-tuning) need no dK/dV pass, frozen queries no dQ pass: the
    gradients asked for still equal the reference's, and a pass that none needs does not run."""
    launches = _watch_attention_kernels(monkeypatch)
    q, k, v, start, end = _grouped_attention_inputs(seed=5)
    grads = {}
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_(name in wanted)
                  for name, t in zip("qkv", (q, k, v), strict=True)]
        out = patch_cross_attention(*inputs, start, end, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        grads[backend] = [t.grad for t in inputs]
    for name, got, want in zip("qkv", grads["triton"], grads["torch"], strict=True):
        assert (got is None) == (want is None) == (name not in wanted)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(launches["_attn_bwd_dq_kernel"].grids) == ("q" in wanted)
    assert len(launches["_attn_bwd_dkdv_kernel"].grids) == (wanted != "q")


def test_patch_cross_attention_refuses_a_head_dim_past_the_kernel():
    # Head dim 264 pads to a 512-wide block: no tile fits shared memory, so the call says so and
    # names the backend that takes it, instead of failing inside the autotuner.
    q = torch.zeros(1, 4, 1, 264, device=DEVICE)
    ranges = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 264 is larger than.*backend='torch'"):
        patch_cross_attention(q, q, q, ranges, ranges + 1, backend="triton")
    assert patch_cross_attention(q, q, q, ranges, ranges + 1, backend="torch").shape == q.shape


def test_patch_cross_attention_refuses_an_fp64_head_past_the_kernel():
    # fp64 inputs (gradcheck, which runs the Triton kernel on CUDA under backend="auto") at head
    # dims past 128: no tile of the backward fits sm_90's shared memory (the smallest needs 256
    # and 320 KiB), so the call says so up front instead of failing in the autotuner's backward.
    q = torch.zeros(1, 4, 1, 136, dtype=torch.float64, device=DEVICE)
    ranges = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 136 is larger than .* in fp64 \\(128.*"
                                         "backend='torch'"):
        patch_cross_attention(q, q, q, ranges, ranges + 1, backend="triton")
    assert patch_cross_attention(q, q, q, ranges, ranges + 1, backend="torch").shape == q.shape


# --- every tile size the autotuner may pick ---------------------------------------------------
# A compiled launch runs the one config the autotuner picks, the interpreter fixed tiny tiles; here
# autotuning is off and each config's tiles are forced (the interpreter's or the compiler's
# launch), at shapes spanning two to three of its tiles.


def _autotune_launches(tuned) -> list[dict]:
    """Each autotune config as launch keywords: its tiles, warps and stages (the interpreter
    ignores the last two)."""
    return [{**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            for config in tuned.configs]


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("config", range(len(segment_pool_triton._fwd_tuned.configs)))
def test_segment_pool_at_the_autotuner_tiles(monkeypatch, config, reduce):
    forward = _autotune_launches(segment_pool_triton._fwd_tuned)[config]
    backward = _autotune_launches(segment_pool_triton._bwd_tuned)[config]
    monkeypatch.setattr(segment_pool_triton, "use_autotune", lambda *tensors: False)
    monkeypatch.setattr(segment_pool_triton, "_FIXED_FWD_BLOCKS", forward)
    monkeypatch.setattr(segment_pool_triton, "_FIXED_BWD_BLOCKS", backward)
    generator = torch.Generator().manual_seed(config)
    lengths = random_patch_lengths(generator, batch=2, num_patches=30, max_length=12)
    lengths[:, 0] = 3 * forward["BLOCK_T"] + 1  # a patch that takes four row steps
    num_tokens = int(lengths.sum(1).max())
    dim = 2 * max(forward["BLOCK_D"], backward["BLOCK_D"]) + 40  # three channel blocks
    assert num_tokens > 2 * backward["BLOCK_N"]  # several token blocks in the backward
    x = torch.randn(2, num_tokens, dim, generator=generator)
    if reduce == "max":
        x = x.round(decimals=1)
    x, lengths = x.to(DEVICE), lengths.to(DEVICE)
    _compare(lambda t, backend: segment_pool(t, lengths, reduce, backend=backend), [x], 1e-5)


@pytest.mark.parametrize("direction", ["decoder", "encoder"])
@pytest.mark.parametrize("config", range(len(patch_attention_triton._fwd_tuned.configs)))
def test_patch_cross_attention_at_the_autotuner_tiles(monkeypatch, config, direction):
    launch = _autotune_launches(patch_attention_triton._fwd_tuned)[config]
    # The three kernels share the configs.
    for tuned in (patch_attention_triton._dq_tuned, patch_attention_triton._dkdv_tuned):
        assert _autotune_launches(tuned)[config] == launch
    monkeypatch.setattr(patch_attention_triton, "use_autotune", lambda *tensors: False)
    monkeypatch.setattr(patch_attention_triton, "_FIXED_TILES", launch)
    tiles = {name: launch[name] for name in ("BLOCK_M", "BLOCK_N")}
    generator = torch.Generator().manual_seed(config)
    k, window, num_patches = 2, 80, 120  # a token sees up to 160 slots: more than one key tile
    lengths = torch.randint(1, 5, (1, num_patches), generator=generator, dtype=torch.int32)
    num_tokens = int(lengths.sum()) - 1
    start, end, num_queries, num_keys = model_key_ranges(
        lengths, num_tokens, direction, k, window
    )
    assert min(num_queries, num_keys) > 1.5 * max(tiles.values())
    assert int((end - start).max()) > tiles["BLOCK_N"]
    head_dim = 64  # as in the kernel benchmarks at the paper's shapes
    q = torch.randn(1, num_queries, 2, head_dim, generator=generator).to(DEVICE)
    kv = torch.randn(1, num_keys, 2, 2 * head_dim, generator=generator).to(DEVICE)
    start, end = start.to(DEVICE), end.to(DEVICE)

    def run(q, kv, backend):
        return patch_cross_attention(
            q, kv[..., :head_dim], kv[..., head_dim:], start, end, backend=backend
        )

    _compare(run, [q, kv], 1e-5)

def test_bf16_inputs():
    generator = torch.Generator().manual_seed(9)
    lengths = random_patch_lengths(generator, batch=2, num_patches=6)
    x = torch.randn(2, int(lengths.sum(1).max()), 24, generator=generator).to(
        DEVICE, torch.bfloat16
    )
    _compare(
        lambda t, backend: segment_pool(t, lengths.to(DEVICE), "mean", backend=backend), [x], 2e-2
    )
    q, kv, start, end = _attention_case(9, "encoder", 2, 3)
    q, kv = q.to(DEVICE, torch.bfloat16), kv.to(DEVICE, torch.bfloat16)
    start, end = start.to(DEVICE), end.to(DEVICE)
    head_dim = q.shape[-1]

    def run(q, kv, backend):
        return patch_cross_attention(
            q, kv[..., :head_dim], kv[..., head_dim:], start, end, backend=backend
        )

    _compare(run, [q, kv], 2e-2)


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
@pytest.mark.parametrize("layout", ["every token a patch", "one patch a row", "transposed x"])
def test_segment_pool_edge_layouts_in_fp16(layout, reduce):
    """All-text rows (every token its own patch), rows of a single patch (one longer than N, one
    shorter), and x a transposed view (channels not contiguous), in fp16, over several tiles."""
    generator = torch.Generator().manual_seed(1)
    num_tokens = 37  # not a multiple of any tile
    if layout == "every token a patch":
        lengths = torch.ones(2, num_tokens, dtype=torch.int64)
    elif layout == "one patch a row":
        lengths = torch.tensor([[num_tokens + 4], [20]])
    else:
        lengths = torch.tensor([[3, 1, 30, 0], [1, 1, 1, 5]])
    x = torch.randn(2, 40, num_tokens, generator=generator).to(DEVICE, torch.float16)
    x = x.transpose(1, 2) if layout == "transposed x" else x.transpose(1, 2).contiguous()
    assert (x.stride(-1) != 1) == (layout == "transposed x")
    if reduce == "max":
        x = x.round(decimals=1)  # ties: the gradient must go to the first arg-max
    _compare(lambda t, backend: segment_pool(t, lengths.to(DEVICE), reduce, backend=backend),
             [x], 1e-2)


def test_patch_cross_attention_transposed_fp16_views():
    """q and k transposed from `[B, H, S, d]` (sequence stride d, head stride S * d), v a
    contiguous tensor, fp16, with empty ranges: outputs and gradients against the reference."""
    generator = torch.Generator().manual_seed(2)
    num_queries, num_keys = 37, 29
    q = torch.randn(2, 2, num_queries, 16, generator=generator).transpose(1, 2)
    k = torch.randn(2, 2, num_keys, 16, generator=generator).transpose(1, 2)
    v = torch.randn(2, num_keys, 2, 16, generator=generator)
    start = torch.randint(0, num_keys, (2, num_queries), generator=generator)
    end = start + torch.randint(0, 9, (2, num_queries), generator=generator)
    inputs = [t.to(DEVICE, torch.float16) for t in (q, k, v)]
    assert (end == start).any() and inputs[0].stride()[1:3] == (16, num_queries * 16)
    _compare(lambda *qkv, backend: patch_cross_attention(*qkv, start.to(DEVICE), end.to(DEVICE),
                                                         backend=backend), inputs, 1e-2)


def _saved_shapes(run) -> list[tuple]:
    """Shapes of every tensor autograd saves while `run()` builds its graph."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_autograd_functions_save_no_quadratic_or_recomputable_tensor(reduce):
    """Attention saves its inputs, output, one log-sum-exp per query and head and the clipped
    ranges: no `[B, H, Sq, Sk]` scores or probabilities (the backward recomputes them). Pooling
    saves neither x nor the token -> patch map (rebuilt from the lengths): the lengths, the
    spans and, for max, the arg-max offsets."""
    batch, num_queries, num_keys, heads, kv_heads, head_dim = 2, 37, 29, 4, 2, 8
    q = torch.randn(batch, num_queries, heads, head_dim, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(batch, num_keys, kv_heads, head_dim, device=DEVICE, requires_grad=True)
            for _ in range(2))
    start = torch.zeros(batch, num_queries, dtype=torch.int64, device=DEVICE)
    end = torch.full((batch, num_queries), num_keys, device=DEVICE)
    saved = _saved_shapes(lambda: patch_cross_attention(q, k, v, start, end, backend="triton"))
    assert sorted(saved) == sorted([q.shape, k.shape, v.shape, q.shape,
                                    (batch, heads, num_queries), start.shape, end.shape])
    lengths = torch.tensor([[3, 1, 30, 0], [1, 1, 1, 5]], device=DEVICE)
    x = torch.randn(batch, num_keys, 40, device=DEVICE, requires_grad=True)
    saved = _saved_shapes(lambda: segment_pool(x, lengths, reduce, backend="triton"))
    pooled = [(batch, 4, 40)] if reduce == "max" else []
    assert sorted(saved) == sorted([lengths.shape] * 3 + pooled)


def test_double_backward_raises_instead_of_dropping_second_order_terms():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, 6, 16, generator=generator).to(DEVICE).requires_grad_()
    lengths = torch.tensor([[1, 3, 2]], dtype=torch.int32, device=DEVICE)
    start, end = torch.zeros(1, 6, dtype=torch.int32), torch.full((1, 6), 6, dtype=torch.int32)
    start, end = start.to(DEVICE), end.to(DEVICE)
    q = x.view(1, 6, 1, 16)
    for out in (segment_pool(x, lengths, "mean", backend="triton"),
                patch_cross_attention(q, q, q, start, end, backend="triton")):
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
            grad.sum().backward()


# --- packed documents: the ranges cut at document starts, against the rule's dense masks ---------

EOS = 2


def _packed_documents(generator, batch, num_patches):
    """Rows of patches of 1..5 tokens, about one in six ending with EOS (which ends its document
    and, as every EOS in the data, sits in a patch that ends there), no zero-length patches
    inside, a few trailing. Returns tokens `[B, N]` (N = sum - 1) and patch lengths `[B, P]`."""
    lengths = torch.randint(1, 6, (batch, num_patches), generator=generator)
    lengths[:, -2:] = 0
    lengths[:, 0] = 1
    num_tokens = int(lengths.sum(1).max()) - 1
    lengths[:, -3] += num_tokens + 1 - lengths.sum(1)  # every row sums to N + 1
    tokens = torch.randint(3, 50, (batch, num_tokens), generator=generator)
    ends = lengths.cumsum(1) - 1  # [B, P] last position of each patch
    ending = (torch.rand(batch, num_patches, generator=generator) < 0.17) & (ends < num_tokens)
    for b, q in ending.nonzero().tolist():
        tokens[b, ends[b, q]] = EOS
    return tokens, lengths.int()


@pytest.mark.parametrize("attention", ["window", "encoder", "decoder", "global"])
@pytest.mark.parametrize("window", [3, 500])  # tokens / patches: shorter and longer than documents
def test_document_ranges_match_the_dense_rule(attention, window):
    """Every attention's key ranges cut at the document start, run by the Triton kernel over
    several 16-wide tiles, equal dense attention under the rule's masks, forward and backward."""
    generator = torch.Generator().manual_seed(window)
    tokens, lengths = _packed_documents(generator, batch=2, num_patches=56)
    batch, num_tokens = tokens.shape
    num_patches, k = lengths.shape[1], 2
    starts = document_starts(tokens, EOS)  # [B, N + 1]
    if attention == "window":
        window = min(window, 40)
        key_start = sliding_window_key_starts(starts[:, :-1], window)
        key_end = torch.arange(1, num_tokens + 1).expand(batch, num_tokens)
        visible, num_queries, num_keys = self_attention_mask(tokens, EOS, window), num_tokens, num_tokens
    elif attention == "encoder":
        key_start, key_end = encoder_key_ranges(lengths, k, window, num_tokens, starts)
        visible = encoder_mask(tokens, EOS, lengths, window, k)
        num_queries, num_keys = num_patches * k, num_tokens
    elif attention == "decoder":
        ids = patch_ids_from_lengths(lengths[:, 1:], num_tokens)
        key_start, key_end = decoder_key_ranges(ids, k, window, num_patches,
                                                token_document_first_patch(lengths, starts))
        visible = decoder_mask(tokens, EOS, lengths, window, k)
        num_queries, num_keys = num_tokens, num_patches * k
    else:
        from lst_kernels import patch_document_starts

        key_start = patch_document_starts(lengths, starts)
        key_end = torch.arange(1, num_patches + 1).expand(batch, num_patches)
        visible, num_queries, num_keys = global_mask(tokens, EOS, lengths), num_patches, num_patches
    assert num_queries > 3 * 16 and num_keys > 3 * 16  # several tiles each way
    q = torch.randn(batch, num_queries, 2, 16, generator=generator, requires_grad=True)
    kk = torch.randn(batch, num_keys, 2, 16, generator=generator, requires_grad=True)
    v = torch.randn(batch, num_keys, 2, 16, generator=generator, requires_grad=True)
    inputs = [t.detach().to(DEVICE).requires_grad_() for t in (q, kk, v)]
    out = patch_cross_attention(*inputs, key_start.to(DEVICE), key_end.to(DEVICE), backend="triton")
    expected = dense_attention(q.double(), kk.double(), v.double(), visible)
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, inputs, grad.to(DEVICE))
    want = torch.autograd.grad(expected, (q, kk, v), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double().cpu(), w.double(), atol=1e-5, rtol=1e-5)


def test_layers_sharing_ranges_prepare_them_once(monkeypatch):
    """Layers that pass the same range tensors (the global stack, the decoder's cross-attention
    layers) clip them once and find each key's queries once, with the outputs and gradients of
    separate preparations; new or modified range tensors are prepared again."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 2, 16, generator=generator).to(DEVICE) for _ in range(3))
    key_end = torch.arange(1, 41).expand(2, 40).to(DEVICE)
    key_start = (key_end - 7).clamp(min=0)
    calls = {"clip": 0, "queries per key": 0}

    def counting(name, compute):
        def counted(*args):
            calls[name] += 1
            return compute(*args)
        return counted

    for name, memo in (("clip", patch_attention_triton.prepared_ranges),
                       ("queries per key", patch_attention_triton.prepared_queries_per_key)):
        monkeypatch.setattr(memo, "compute", counting(name, memo.compute))
    layers = []
    for _ in range(3):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = patch_cross_attention(*inputs, key_start, key_end, backend="triton")
        out.square().sum().backward()
        layers.append((out, *(t.grad for t in inputs)))
    assert calls == {"clip": 1, "queries per key": 1}
    for layer in layers[1:]:
        for got, want in zip(layer, layers[0], strict=True):
            assert torch.equal(got, want)
    key_start[:, 20:] = 20  # modified in place: prepared again, and the output follows
    out = patch_cross_attention(q, k, v, key_start, key_end, backend="triton")
    assert calls["clip"] == 2
    expected = patch_cross_attention(q, k, v, key_start, key_end, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_shared_ranges_made_under_inference_mode_still_train():
    """`causal_key_end` / `window_key_start` keep one tensor per shape for every later call, even
    when made first under torch.inference_mode; the range preparation read the version counter
    such inference tensors do not have."""
    from megatron_lst.models.local_attention import causal_key_end, window_key_start

    batch, length, window = 1, 37, 5  # a shape no other test uses: made here first
    with torch.inference_mode():
        causal_key_end(batch, length, torch.device(DEVICE))
        window_key_start(batch, length, window, torch.device(DEVICE))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, 2, 16, generator=generator).to(DEVICE)
               for _ in range(3))
    q.requires_grad_(True)
    key_start = window_key_start(batch, length, window, torch.device(DEVICE))
    key_end = causal_key_end(batch, length, torch.device(DEVICE))
    patch_cross_attention(q, k, v, key_start, key_end, backend="triton").sum().backward()
    assert torch.isfinite(q.grad).all() and not key_end.is_inference()


# --- float64: gradcheck on the Triton paths ------------------------------------------------------


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_segment_pool_gradcheck_float64(reduce):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 7, 2, generator=generator, dtype=torch.float64).to(DEVICE)
    lengths = torch.tensor([[1, 3, 0, 2]], device=DEVICE)  # token 6 belongs to no patch
    assert torch.autograd.gradcheck(
        lambda t: segment_pool(t, lengths, reduce, backend="triton"), (x.requires_grad_(),),
        fast_mode=True,
    )


def _float64_attention_case(generator, num_queries, num_keys):
    """q `[1, Sq, 2, 3]`, k/v `[1, Sk, 1, 3]` (grouped heads) in fp64 on DEVICE, and monotone
    ranges: up to 3 keys before the query's position, cut at a document start half way, so the
    first query and the document's first one see nothing."""
    position = torch.arange(num_queries) * num_keys // num_queries  # [Sq]
    document = torch.where(position >= position[num_queries // 2], position[num_queries // 2], 0)
    start = torch.maximum(position - 3, document)[None]  # [1, Sq]
    end = torch.maximum(position, document)[None]
    assert (end == start).sum() >= 2 and (end > start).any()
    q = torch.randn(1, num_queries, 2, 3, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, num_keys, 1, 3, generator=generator, dtype=torch.float64)
            for _ in range(2))
    return [t.to(DEVICE).requires_grad_() for t in (q, k, v)], start.to(DEVICE), end.to(DEVICE)


def test_patch_cross_attention_float64_accumulates_in_float64():
    """fp64 inputs keep fp64 softmax statistics and accumulators (they did not compile on CUDA,
    and the interpreter's fp32 log-sum-exp left gradients 1e-7 off): over several 16-wide tiles
    the output and every gradient equal the fp64 reference to 1e-12."""
    generator = torch.Generator().manual_seed(6)
    inputs, start, end = _float64_attention_case(generator, num_queries=37, num_keys=35)
    out = patch_cross_attention(*inputs, start, end, backend="triton")
    expected = patch_cross_attention(*inputs, start, end, backend="torch")
    assert out.dtype == torch.float64
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_patch_cross_attention_gradcheck_float64():
    inputs, start, end = _float64_attention_case(torch.Generator().manual_seed(7), 6, 5)
    assert torch.autograd.gradcheck(
        lambda *qkv: patch_cross_attention(*qkv, start, end, backend="triton"), inputs,
        fast_mode=True,  # a few interpreted launches instead of one per input element
    )
