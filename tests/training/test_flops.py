"""The analytic FLOP model against brute force: a tiny pure-torch restatement of the LST and
baseline forward passes whose attention visits only the keys allowed by dense masks built from
the reference rules, counted by torch's FlopCounterMode."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megatron_lst.training.flops import (
    FlopBreakdown,
    ModelShape,
    StackShape,
    causal_pairs,
    decoder_cross_attention_pairs,
    encoder_cross_attention_pairs,
    estimate_flops,
    flops_per_batch,
)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"

# Two rows of N = 15 input tokens (rows sum to N + 1); the second ends in empty patches.
NUM_TOKENS = 15
PATCH_LENGTHS = torch.tensor([[1, 3, 3, 1, 1, 4, 3], [1, 1, 5, 3, 6, 0, 0]])

SHAPES = {
    # k*De == Dg (no global projection), GQA, windows shorter than the rows.
    "windowed": ModelShape(
        vocab_size=37,
        global_stack=StackShape(dim=16, layers=2, heads=4, kv_heads=2, ffn_hidden=24),
        encoder=StackShape(dim=8, layers=2, heads=2, ffn_hidden=20, window=4),
        decoder=StackShape(dim=8, layers=2, heads=2, ffn_hidden=20, window=4),
        cross_attn_k=2,
        cross_attn_window_encoder=3,
        cross_attn_window_decoder=2,
    ),
    # k*De != Dg (projected), cross-attention in one layer each, head_dim != dim // heads,
    # reference FFN rule, no local windows, patch windows wider than the rows.
    "projected": ModelShape(
        vocab_size=29,
        global_stack=StackShape(dim=16, layers=1, heads=2),
        encoder=StackShape(dim=8, layers=2, heads=2, head_dim=6),
        decoder=StackShape(dim=8, layers=3, heads=2, kv_heads=1),
        cross_attn_k=3,
        cross_attn_window_encoder=100,
        cross_attn_window_decoder=100,
        cross_attn_all_layers_encoder=False,
        cross_attn_all_layers_decoder=False,
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The brute force runs thousands of tiny ops: extra threads only add barrier waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- masks from the reference rules (fixtures/reference_lst/README.md) -------------------------

def _patch_ids(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, N]: the last patch whose exclusive cumulative start is <= i."""
    bounds = torch.cat([torch.zeros_like(patch_lengths[:, :1]), patch_lengths.cumsum(-1)], -1)
    return (bounds[:, :, None] <= torch.arange(num_tokens)).sum(1) - 1


def _self_mask(length: int, window: int | None) -> torch.Tensor:
    """[S, S]: query i sees key j iff j <= i and i - j < window."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (j <= i) & ((i - j < window) if window else True)


def _encoder_cross_mask(patch_lengths, num_tokens, window) -> torch.Tensor:
    """[B, P, N]: patch q sees token i iff patch_id[i] <= q < patch_id[i] + W."""
    pid = _patch_ids(patch_lengths, num_tokens)[:, None, :]
    q = torch.arange(patch_lengths.shape[1])[None, :, None]
    return (pid <= q) & (q < pid + window)


def _decoder_cross_mask(patch_lengths, num_tokens, window) -> torch.Tensor:
    """[B, N, P]: token i of decoder patch j sees global patch q iff q <= j < q + W."""
    did = _patch_ids(patch_lengths[:, 1:], num_tokens)[:, :, None]
    q = torch.arange(patch_lengths.shape[1])[None, None, :]
    return (q <= did) & (did < q + window)


# ---- brute-force forward --------------------------------------------------------------------------

def _attend(q, k, v, mask):
    """q [B, Sq, H, d], k/v [B, Sk, H, d], mask [B, Sq, Sk]: queries that see the same keys are
    multiplied with exactly those keys, so the products cost exactly the useful pairs."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        key_sets, group_of_query = torch.unique(mask[b], dim=0, return_inverse=True)
        for group, key_set in enumerate(key_sets):
            queries, keys = (group_of_query == group).nonzero()[:, 0], key_set.nonzero()[:, 0]
            if keys.numel() == 0:
                continue  # a query that sees no key outputs 0
            scores = torch.matmul(q[b, queries].transpose(0, 1), k[b, keys].permute(1, 2, 0))
            values = torch.matmul(scores.softmax(-1), v[b, keys].transpose(0, 1))  # [H, nq, d]
            out = out.index_put((torch.full_like(queries, b), queries), values.transpose(0, 1))
    return out


class _Layer(nn.Module):
    def __init__(self, s: StackShape):
        super().__init__()
        self.heads, self.kv_heads = s.heads, s.num_kv_heads
        self.head_dim = s.head_dim or s.dim // s.heads
        self.q = nn.Linear(s.dim, s.heads * self.head_dim, bias=False)
        self.k = nn.Linear(s.dim, self.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(s.dim, self.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(s.heads * self.head_dim, s.dim, bias=False)
        self.w1 = nn.Linear(s.dim, s.ffn, bias=False)
        self.w3 = nn.Linear(s.dim, s.ffn, bias=False)
        self.w2 = nn.Linear(s.ffn, s.dim, bias=False)

    def forward(self, x, mask):  # x [B, S, D], mask [S, S]
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.head_dim)
        k = self.k(x).view(b, length, self.kv_heads, self.head_dim)
        v = self.v(x).view(b, length, self.kv_heads, self.head_dim)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        x = x + self.o(_attend(q, k, v, mask.expand(b, -1, -1)).flatten(2))
        return x + self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x, kv, mask):  # x [B, Sq, D], kv [B, Sk, D], mask [B, Sq, Sk]
        split = lambda t: t.view(*t.shape[:2], self.heads, -1)  # noqa: E731
        out = _attend(split(self.q(x)), split(self.k(kv)), split(self.v(kv)), mask)
        return 2 * x + self.o(out.flatten(2))


class _BruteForce(nn.Module):
    """LST (or the baseline when shape.encoder is None) restated with plain torch modules."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        g = shape.global_stack
        self.global_layers = nn.ModuleList(_Layer(g) for _ in range(g.layers))
        if shape.is_baseline:
            self.embedding = nn.Embedding(shape.vocab_size, g.dim)
            self.head = nn.Linear(g.dim, shape.vocab_size, bias=False)
            return
        enc, dec, k = shape.encoder, shape.decoder, shape.cross_attn_k
        self.embedding = nn.Embedding(shape.vocab_size, enc.dim)
        self.encoder_layers = nn.ModuleList(_Layer(enc) for _ in range(enc.layers))
        self.encoder_cross = nn.ModuleList(
            _CrossAttention(enc.dim) for _ in range(shape.encoder_cross_attn_layers)
        )
        self.patch_projection = nn.Linear(enc.dim, enc.dim * k, bias=False)
        self.global_projection = (
            nn.Linear(k * enc.dim, g.dim, bias=False) if shape.needs_global_projection else None
        )
        self.decoder_projection = nn.Linear(g.dim, dec.dim * k, bias=False)
        self.decoder_cross = nn.ModuleList(
            _CrossAttention(dec.dim) for _ in range(shape.decoder_cross_attn_layers)
        )
        self.decoder_layers = nn.ModuleList(_Layer(dec) for _ in range(dec.layers))
        self.head = nn.Linear(dec.dim, shape.vocab_size, bias=False)

    def forward(self, tokens, patch_lengths, part):
        """`part(name)` is the context that counts the FLOPs of model part `name`."""
        if self.shape.is_baseline:
            h = self.embedding(tokens)
            with part("global_"):
                for layer in self.global_layers:
                    h = layer(h, _self_mask(tokens.shape[1], self.shape.global_stack.window))
            with part("head"):
                return self.head(h)
        return self._lst(tokens, patch_lengths, part)

    def _lst(self, tokens, patch_lengths, part):
        s, (b, n), num_patches = self.shape, tokens.shape, patch_lengths.shape[1]
        k, enc, dec = s.cross_attn_k, s.encoder, s.decoder
        enc_cross_mask = _encoder_cross_mask(patch_lengths, n, s.cross_attn_window_encoder)
        dec_cross_mask = _decoder_cross_mask(patch_lengths, n, s.cross_attn_window_decoder)
        slot_mask = enc_cross_mask.repeat_interleave(k, 1)  # [B, P*k, N]
        token_mask = dec_cross_mask.repeat_interleave(k, 2)  # [B, N, P*k]
        pid = _patch_ids(patch_lengths, n)

        h = self.embedding(tokens)  # [B, N, De]
        patches = None
        for i, layer in enumerate(self.encoder_layers):
            with part("encoder"):
                h = layer(h, _self_mask(n, enc.window))
            if not (s.cross_attn_all_layers_encoder or i == enc.layers - 1):
                continue
            if patches is None:
                pooled = torch.stack([
                    torch.stack([
                        h[r, pid[r] == q].max(0).values if (pid[r] == q).any() else h.new_zeros(enc.dim)
                        for q in range(num_patches)
                    ]) for r in range(b)
                ])  # [B, P, De]
                with part("encoder"):
                    patches = self.patch_projection(pooled).view(b, num_patches * k, enc.dim)
            with part("cross_attention"):
                patches = self.encoder_cross[i if s.cross_attn_all_layers_encoder else 0](
                    patches, h, slot_mask
                )

        g = patches.reshape(b, num_patches, k * enc.dim)
        with part("global_"):
            if self.global_projection is not None:
                g = self.global_projection(g)
            for layer in self.global_layers:
                g = layer(g, _self_mask(num_patches, None))
        with part("decoder"):
            slots = self.decoder_projection(g).view(b, num_patches * k, dec.dim)
        for i, layer in enumerate(self.decoder_layers):
            if s.cross_attn_all_layers_decoder or i == 0:
                with part("cross_attention"):
                    h = self.decoder_cross[i](h, slots, token_mask)
            with part("decoder"):
                h = layer(h, _self_mask(n, dec.window))
        with part("head"):
            return self.head(h)


def _counted_forward(shape: ModelShape, patch_lengths: torch.Tensor, num_tokens: int) -> FlopBreakdown:
    torch.manual_seed(0)
    model = _BruteForce(shape)
    totals = dict.fromkeys(("encoder", "global_", "decoder", "cross_attention", "head"), 0)

    @contextlib.contextmanager
    def part(name):
        with FlopCounterMode(display=False) as counter:
            yield
        totals[name] += counter.get_total_flops()

    tokens = torch.randint(shape.vocab_size, (patch_lengths.shape[0], num_tokens))
    with torch.no_grad():
        model(tokens, patch_lengths, part)
    return FlopBreakdown(**totals)


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,window", [(1, None), (7, None), (7, 3), (7, 7), (7, 20), (12, 1)])
def test_causal_pairs_equal_a_dense_mask_count(length, window):
    assert causal_pairs(length, window) == int(_self_mask(length, window).sum())


def _random_patch_lengths(generator: torch.Generator, rows: int, num_patches: int, max_len: int):
    """Rows obeying the contract: first patch 1, then random lengths (some zero at the end)."""
    lengths = torch.randint(1, max_len + 1, (rows, num_patches), generator=generator)
    lengths[:, 0] = 1
    for r in range(rows):
        empty = int(torch.randint(0, 3, (), generator=generator))
        if empty:
            lengths[r, -empty:] = 0
    num_tokens = int(lengths.sum(-1).min()) - 1
    for r in range(rows):  # trim each row's last non-empty patches down to num_tokens + 1
        excess = int(lengths[r].sum()) - (num_tokens + 1)
        for q in range(num_patches - 1, 0, -1):
            cut = min(excess, int(lengths[r, q]))
            lengths[r, q] -= cut
            excess -= cut
    return lengths, num_tokens


@pytest.mark.parametrize("window", [1, 2, 5, 512])
def test_cross_attention_pairs_equal_dense_mask_counts(window):
    generator = torch.Generator().manual_seed(window)
    for _ in range(20):
        lengths, num_tokens = _random_patch_lengths(generator, rows=3, num_patches=9, max_len=5)
        dense_encoder = int(_encoder_cross_mask(lengths, num_tokens, window).sum())
        dense_decoder = int(_decoder_cross_mask(lengths, num_tokens, window).sum())
        assert encoder_cross_attention_pairs(lengths, num_tokens, window) == dense_encoder
        assert decoder_cross_attention_pairs(lengths, num_tokens, window) == dense_decoder


@pytest.mark.parametrize("name", ["static", "aligned", "ragged"])
def test_cross_attention_pairs_on_reference_batches(name):
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    batch = json.loads((FIXTURES / f"inputs_{name}.json").read_text())
    lengths, num_tokens = torch.tensor(batch["patch_lengths"]), len(batch["tokens"][0])
    for window in (3, 512):
        assert encoder_cross_attention_pairs(lengths, num_tokens, window) == int(
            _encoder_cross_mask(lengths, num_tokens, window).sum()
        )
        assert decoder_cross_attention_pairs(lengths, num_tokens, window) == int(
            _decoder_cross_mask(lengths, num_tokens, window).sum()
        )


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_flops_equal_brute_force_count_per_part(name):
    shape = SHAPES[name]
    assert flops_per_batch(shape, PATCH_LENGTHS, NUM_TOKENS, training=False) == _counted_forward(
        shape, PATCH_LENGTHS, NUM_TOKENS
    )


def test_baseline_flops_equal_brute_force_count():
    shape = SHAPES["windowed"].baseline_of()
    counted = _counted_forward(shape, PATCH_LENGTHS, NUM_TOKENS)
    assert counted.encoder == counted.decoder == counted.cross_attention == 0
    assert flops_per_batch(shape, PATCH_LENGTHS, NUM_TOKENS, training=False) == counted


def test_training_is_three_forwards_of_brute_force_with_backward():
    shape = SHAPES["windowed"]
    torch.manual_seed(0)
    model = _BruteForce(shape)
    tokens = torch.randint(shape.vocab_size, (2, NUM_TOKENS))
    with FlopCounterMode(display=False) as counter:
        model(tokens, PATCH_LENGTHS, lambda name: contextlib.nullcontext()).sum().backward()
    assert flops_per_batch(shape, PATCH_LENGTHS, NUM_TOKENS).total == counter.get_total_flops()


def test_estimate_is_exact_outside_cross_attention_and_close_inside():
    generator = torch.Generator().manual_seed(0)
    shape = ModelShape(
        vocab_size=1000,
        global_stack=StackShape(dim=64, layers=2, heads=4),
        encoder=StackShape(dim=32, layers=1, heads=2, window=64),
        decoder=StackShape(dim=32, layers=2, heads=2, window=64),
        cross_attn_k=2,
        cross_attn_window_encoder=16,
        cross_attn_window_decoder=16,
    )
    lengths = torch.randint(1, 8, (4, 200), generator=generator)  # mean 4 tokens per patch
    lengths[:, 0] = 1
    lengths[:, -1] += lengths.sum(-1).max() - lengths.sum(-1)  # equal row sums
    num_tokens = int(lengths[0].sum()) - 1
    exact = flops_per_batch(shape, lengths, num_tokens)
    estimate = estimate_flops(shape, num_tokens, lengths.shape[1], batch=4)
    for part in ("encoder", "global_", "decoder", "head"):
        assert getattr(estimate, part) == getattr(exact, part)
    assert estimate.cross_attention == pytest.approx(exact.cross_attention, rel=0.02)
    baseline = shape.baseline_of()
    assert estimate_flops(baseline, num_tokens, 0, batch=4) == flops_per_batch(baseline, lengths, num_tokens)


def test_estimate_equals_exact_for_equal_patches_without_windows():
    shape = SHAPES["projected"]  # patch windows wider than the rows
    lengths = torch.tensor([[1] + [4] * 10])  # 41 tokens in 11 patches; N = 40
    exact = flops_per_batch(shape, lengths, 40)
    # Equal patches as the estimate sees them: 40 / 11 tokens per patch, 40 / 10 per decoder patch.
    estimate = estimate_flops(shape, 40, 11, batch=1)
    encoder_pairs = 40 / 11 * causal_pairs(11)
    decoder_pairs = 40 / 10 * causal_pairs(10)
    assert decoder_cross_attention_pairs(lengths, 40, 100) == decoder_pairs
    difference = 3 * 4 * shape.encoder.dim * shape.cross_attn_k * (
        encoder_pairs - encoder_cross_attention_pairs(lengths, 40, 100)
    )
    assert estimate.total - exact.total == pytest.approx(difference)


def test_flops_scale_with_batch_and_breakdown_arithmetic():
    shape = SHAPES["windowed"]
    one = flops_per_batch(shape, PATCH_LENGTHS[:1], NUM_TOKENS)
    two = flops_per_batch(shape, PATCH_LENGTHS[:1].repeat(2, 1), NUM_TOKENS)
    assert two == one + one == one.scaled(2)
    assert one.as_dict()["total"] == one.total == sum(
        one.as_dict()[p] for p in ("encoder", "global", "decoder", "cross_attention", "head")
    )


@pytest.mark.parametrize("lengths,num_tokens,match", [
    (torch.tensor([[1, 4, 4]]), 10, "sum to"),
    (torch.tensor([[2, 4, 4]]), 9, "first of length 1"),
    (torch.tensor([[1, 6, -1]]), 5, "non-negative"),
    (torch.tensor([[1.0, 4.0]]), 4, "integer tensor"),
])
def test_patch_lengths_breaking_the_contract_are_rejected(lengths, num_tokens, match):
    with pytest.raises(ValueError, match=match):
        flops_per_batch(SHAPES["windowed"], lengths, num_tokens)


def test_inconsistent_shapes_are_rejected():
    stack = StackShape(dim=8, layers=1, heads=2)
    with pytest.raises(ValueError, match="both a local encoder and a local decoder"):
        ModelShape(vocab_size=10, global_stack=stack, encoder=stack)
    with pytest.raises(ValueError, match="widths must match"):
        ModelShape(10, stack, encoder=stack, decoder=StackShape(dim=16, layers=1, heads=2))
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        StackShape(dim=12, layers=1, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="not divisible by heads"):
        StackShape(dim=10, layers=1, heads=4)


def test_model_config_head_shapes_reach_the_flop_count():
    """Grouped key/value heads and head sizes other than hidden / heads (local and global) are
    counted: a local stack's dense FLOPs per position are twice the matrix parameters of the
    layers the model builds, and the global stack's q/k/v/o widths are heads * kv_channels and
    groups * kv_channels."""
    import dataclasses

    from megatron.core.transformer.spec_utils import build_module

    from megatron_lst.models.config import GlobalModelConfig, preset
    from megatron_lst.models.specs import local_layer_spec

    config = preset("tiny", 64)
    encoder = dataclasses.replace(config.encoder, num_query_groups=1, kv_channels=12)
    config = dataclasses.replace(config, encoder=encoder, decoder=encoder,
                                 global_model=GlobalModelConfig(64, 2, 4, 256, 2, 24))
    shape = ModelShape.from_model_config(config)
    layer = build_module(local_layer_spec("sdpa"), encoder, norm_eps=1e-5)
    matrices = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    assert matrices == 32 * 12 * (2 * 2 + 2 * 1) + 3 * 32 * encoder.ffn_hidden_size  # q,o; k,v
    assert shape.encoder.dense_flops(5) == 2 * 5 * encoder.num_layers * matrices
    assert shape.encoder.attention_flops(7) == 4 * encoder.num_layers * 2 * 12 * 7
    g = shape.global_stack
    assert (g.attention_dim, g.num_kv_heads) == (4 * 24, 2)
    assert g.dense_flops(1) == 2 * 2 * (2 * 64 * 4 * 24 + 2 * 64 * 2 * 24 + 3 * 64 * 256)


def test_per_batch_count_takes_no_advanced_indexing():
    """`flops_per_batch` runs for every micro-batch before its forward is launched. CPU advanced
    indexing (`t[:, index]`) took 1.5-12 ms there for a paper-1b batch of 2 x 4097 patches on a
    busy 2-core host (index_select: 0.3 ms), so the count uses index_select; same numbers."""
    from models.host_syncs import count_aten_ops

    from megatron_lst.models.config import preset

    shape = ModelShape.from_model_config(preset("paper-1b", 32768))
    lengths = torch.full((2, 4097), 4, dtype=torch.int32)
    lengths[:, 0], lengths[:, -1] = 1, 0
    num_tokens = int(lengths[0].sum()) - 1
    with count_aten_ops() as ops:
        flops = flops_per_batch(shape, lengths, num_tokens)
    assert ops[torch.ops.aten.index.Tensor] == 0
    assert flops == flops_per_batch(shape, lengths.long(), num_tokens)
    window = shape.cross_attn_window_encoder
    starts = lengths.long().cumsum(-1) - lengths  # [B, P]: the encoder ranges, restated
    first = (torch.arange(4097) - window + 1).clamp(min=0)
    pairs = (lengths.long().cumsum(-1).clamp(max=num_tokens)
             - starts[:, first].clamp(max=num_tokens)).clamp(min=0).sum()
    assert encoder_cross_attention_pairs(lengths, num_tokens, window) == int(pairs)
