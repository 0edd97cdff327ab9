"""`training.flops` against a hand count from first principles, and against the real model's
weight shapes.

The hand count walks every query of a crafted batch: each matrix product costs 2*m*n*k, each
attention query costs 2 * heads * head_dim per key it sees for the scores and as much for the
weighted values, and training is 3x the forward pass. It reads the model config directly (no
`ModelShape`, no pair helpers), so a wrong shape rule or pair rule in `flops.py` shows as a
mismatch in one named part.
"""

import pytest
import torch

from megatron_lst.models.config import (
    CrossAttentionConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
)
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.training.flops import ModelShape, flops_per_batch

# Global: GQA (6 heads over 2 groups) and a head size (12) that is not hidden / heads (8).
# Local: GQA (4 heads over 2 groups), head size 6 != 16 / 4, a 3-token window shorter than rows.
# k * De = 32 != Dg = 48: the global input projection exists. Cross-attention windows cut.
CONFIG = LSTConfig(
    vocab_size=41,
    global_model=GlobalModelConfig(48, 2, 6, 40, num_query_groups=2, kv_channels=12),
    encoder=LocalModelConfig(16, 2, 4, 24, window=3, num_query_groups=2, kv_channels=6),
    decoder=LocalModelConfig(16, 3, 4, 20, window=3, num_query_groups=2, kv_channels=6),
    cross_attention=CrossAttentionConfig(slots_per_patch=2, num_heads=4, encoder_window=2,
                                         decoder_window=3),
)
ONE_CROSS_LAYER = LSTConfig(
    vocab_size=CONFIG.vocab_size, global_model=CONFIG.global_model, encoder=CONFIG.encoder,
    decoder=CONFIG.decoder,
    cross_attention=CrossAttentionConfig(slots_per_patch=3, num_heads=2, encoder_window=100,
                                         decoder_window=1, all_encoder_layers=False,
                                         all_decoder_layers=False),
)

# Two rows of N = 14 input tokens (each row sums to N + 1, the first patch has length 1): ragged
# patches, a long one, and zero-length trailing patches as a row that stopped early has them.
NUM_TOKENS = 14
PATCH_LENGTHS = torch.tensor([[1, 4, 1, 1, 6, 2, 0], [1, 2, 2, 9, 1, 0, 0]])


def _head_dim(stack) -> int:
    return stack.kv_channels or stack.hidden_size // stack.num_heads


def _self_attention_stack(stack, positions: int, window: int | None) -> int:
    """Forward FLOPs of a pre-norm stack (self-attention + SwiGLU) over one row, query by query."""
    d, heads, groups = stack.hidden_size, stack.num_heads, stack.num_query_groups or stack.num_heads
    head = _head_dim(stack)
    total = 0
    for i in range(positions):
        keys = i + 1 if window is None else min(i + 1, window)  # keys before a row start: none
        total += 2 * d * heads * head  # q
        total += 2 * 2 * d * groups * head  # k and v (one per query group)
        total += 2 * heads * head * keys  # scores, every query head
        total += 2 * heads * head * keys  # weights x values
        total += 2 * heads * head * d  # output projection
        total += 3 * 2 * d * stack.ffn_hidden_size  # SwiGLU: gate, up, down
    return stack.num_layers * total


def _bounds(lengths: list[int]) -> list[int]:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return bounds


def _hand_count(config: LSTConfig, patch_lengths: torch.Tensor, num_tokens: int) -> dict:
    """Training FLOPs per part of one LST batch, as 3x a query-by-query forward count."""
    enc, dec, glob, xattn = config.encoder, config.decoder, config.global_model, config.cross_attention
    k, de, dd = xattn.slots_per_patch, enc.hidden_size, dec.hidden_size
    parts = dict(encoder=0, global_=0, decoder=0, cross_attention=0, head=0)
    for row in patch_lengths.tolist():
        num_patches, bounds = len(row), _bounds(row)
        parts["encoder"] += _self_attention_stack(enc, num_tokens, enc.window)
        parts["encoder"] += num_patches * 2 * de * (k * de)  # pooled patch -> k slots
        if k * de != glob.hidden_size:
            parts["global_"] += num_patches * 2 * (k * de) * glob.hidden_size
        parts["global_"] += _self_attention_stack(glob, num_patches, None)
        parts["decoder"] += num_patches * 2 * glob.hidden_size * (k * dd)
        parts["decoder"] += _self_attention_stack(dec, num_tokens, dec.window)

        # Encoder cross-attention: every slot of patch q reads the tokens of patches q-W+1..q
        # (the last input position N is a label only, never a key).
        encoder_cross = 0
        for q in range(num_patches):
            first = bounds[max(0, q - xattn.encoder_window + 1)]
            seen = max(0, min(bounds[q + 1], num_tokens) - min(first, num_tokens))
            encoder_cross += k * (2 * de * de + 2 * de * de)  # q and o projections of the slots
            encoder_cross += k * 2 * 2 * de * seen  # scores and values, heads x head_dim = De
        encoder_cross += num_tokens * 2 * de * (2 * de)  # k and v of every token
        layers = enc.num_layers if xattn.all_encoder_layers else 1
        parts["cross_attention"] += layers * encoder_cross

        # Decoder cross-attention: a token of decoder patch j (patch_lengths[1:]) reads the k
        # slots of global patches max(0, j-W+1)..j.
        decoder_cross = 0
        decoder_bounds = _bounds(row[1:])
        for token in range(num_tokens):
            j = max(p for p in range(num_patches - 1) if decoder_bounds[p] <= token)
            seen = k * (j - max(0, j - xattn.decoder_window + 1) + 1)
            decoder_cross += 2 * dd * dd + 2 * dd * dd  # q and o of the token
            decoder_cross += 2 * 2 * dd * seen
        decoder_cross += num_patches * k * 2 * dd * (2 * dd)  # k and v of every slot
        layers = dec.num_layers if xattn.all_decoder_layers else 1
        parts["cross_attention"] += layers * decoder_cross
        parts["head"] += num_tokens * 2 * dd * config.vocab_size
    return {name: 3 * value for name, value in parts.items()}


def _hand_count_baseline(config: LSTConfig, rows: int, num_tokens: int) -> dict:
    glob = config.global_model
    return dict(encoder=0, decoder=0, cross_attention=0,
                global_=3 * rows * _self_attention_stack(glob, num_tokens, None),
                head=3 * rows * num_tokens * 2 * glob.hidden_size * config.vocab_size)


def _as_parts(breakdown) -> dict:
    return {name: getattr(breakdown, name)
            for name in ("encoder", "global_", "decoder", "cross_attention", "head")}


@pytest.mark.parametrize("config", [CONFIG, ONE_CROSS_LAYER], ids=["every-layer", "one-layer"])
def test_lst_flops_equal_the_hand_count_per_part(config):
    counted = flops_per_batch(ModelShape.from_model_config(config), PATCH_LENGTHS, NUM_TOKENS)
    assert _as_parts(counted) == _hand_count(config, PATCH_LENGTHS, NUM_TOKENS)


def test_baseline_flops_equal_the_hand_count():
    shape = ModelShape.from_model_config(CONFIG).baseline_of()
    counted = flops_per_batch(shape, PATCH_LENGTHS, NUM_TOKENS)
    assert _as_parts(counted) == _hand_count_baseline(CONFIG, 2, NUM_TOKENS)


def test_the_hand_count_sees_a_changed_rule():
    """The comparison above can fail: one more key per encoder window changes the count."""
    wider = LSTConfig(vocab_size=CONFIG.vocab_size, global_model=CONFIG.global_model,
                      encoder=LocalModelConfig(16, 2, 4, 24, window=4, num_query_groups=2,
                                               kv_channels=6),
                      decoder=CONFIG.decoder, cross_attention=CONFIG.cross_attention)
    counted = flops_per_batch(ModelShape.from_model_config(CONFIG), PATCH_LENGTHS, NUM_TOKENS)
    assert _as_parts(counted)["encoder"] != _hand_count(wider, PATCH_LENGTHS, NUM_TOKENS)["encoder"]


# ---- the real model's matrices --------------------------------------------------------------

@pytest.fixture(scope="module")
def lst_model():
    from megatron_lst.models.lst_model import LSTModel

    initialize_parallel(seed=1234)
    try:
        yield LSTModel(CONFIG, CONFIG.transformer_config(), transformer_impl="local",
                       kernel_backend="torch")
    finally:
        destroy_parallel()


def _matrix_elements(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weight elements of the 2-D matrices of `module` that multiply activations (embeddings and
    norm vectors left out): 2x this is the forward FLOPs per position through them."""
    return sum(p.numel() for name, p in module.named_parameters()
               if p.dim() == 2 and "embedding" not in name and not name.startswith(skip))


def test_dense_flops_match_the_real_models_matrices(lst_model):
    """Per position, the projections and FFNs `flops.py` counts are the model's matrices: one
    position through a matrix of m x n weights costs 2 m n FLOPs."""
    shape = ModelShape.from_model_config(CONFIG)
    assert shape.encoder.dense_flops(1) == 2 * _matrix_elements(lst_model.token_encoder)
    assert shape.decoder.dense_flops(1) == 2 * _matrix_elements(
        lst_model.local_decoder, skip=("cross_attn_layers", "patch_projection"))
    assert shape.global_stack.dense_flops(1) == 2 * _matrix_elements(lst_model.global_transformer)
    # The patch, global-input and decoder projections act once per patch.
    per_patch = _matrix_elements(lst_model.patch_encoder, skip=("cross_attn_layers",)) \
        + _matrix_elements(lst_model.global_input_projection) \
        + _matrix_elements(lst_model.local_decoder.patch_projection)
    one_patch = flops_per_batch(shape, torch.tensor([[1, 1]]), 1, training=False)
    two_patches = flops_per_batch(shape, torch.tensor([[1, 1, 0]]), 1, training=False)
    projections = (two_patches.encoder - one_patch.encoder) + (two_patches.decoder - one_patch.decoder)
    projections += (two_patches.global_ - one_patch.global_) \
        - (shape.global_stack.flops(1, 3) - shape.global_stack.flops(1, 2))
    assert projections == 2 * per_patch
    # A cross-attention layer: q and o per query, k and v per key, all De x De.
    cross = lst_model.patch_encoder.cross_attn_layers[0]
    de = CONFIG.encoder.hidden_size
    assert _matrix_elements(cross, skip=("linear_kv",)) == 2 * de * de
    assert _matrix_elements(cross.linear_kv) == 2 * de * de
    assert _matrix_elements(lst_model.output_layer) == CONFIG.decoder.hidden_size * CONFIG.vocab_size
