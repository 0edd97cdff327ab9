"""Model FLOPs of LST and of the token-level baseline.

What is counted: every matrix multiplication of the forward pass at 2*m*n*k FLOPs (projections,
SwiGLU FFNs, the output head) and the two attention products (scores Q.K^T and the weighted sum
with V) over the *useful* query-key pairs only: a causal query sees its past, a sliding-window
query at most `window` keys, a cross-attention query exactly its key range. Masked-out pairs that
a dense kernel would still compute are not counted, so the numbers describe the model, not a
kernel.

What is not counted: the embedding lookup, norms, softmax, RoPE, activations, residual adds and
the max-pool that initialises the patch states (all elementwise, well under 1% of the total).
Attention is counted over the whole row, as if no document ended inside it: with document masking
(`--reset-attention-mask`, on by default, as the reference's block-causal GPU path) the model
does less attention work on packed rows than counted, and the counts do not depend on where
documents end.
Training is counted as 3x the forward pass (the backward pass computes two products per forward
product); recomputation (activation checkpointing, flash-attention's backward, the last pipeline
stage's TokenEncoder replica when PP > 1) is not counted, as is usual for MFU: the counts are
model FLOPs, the same under every parallel layout.

Shapes follow the reference LST: per row, N tokens and P patches, De/Dg/Dd the encoder/global/decoder widths, k the
cross-attention slots per patch.
- local encoder: n_enc layers (sliding-window self-attention + SwiGLU) over N tokens; the patch
  states are pooled, projected De -> De*k over P patches and refined by cross-attention after
  every layer (or the last only): P*k slot queries over the tokens of their last W_enc patches.
- global: k*De -> Dg projection over P patches when k*De != Dg, then n_glob causal layers over P.
- local decoder: Dg -> Dd*k projection over P patches, then n_dec layers over N tokens, each
  preceded (or only the first) by cross-attention: N token queries over the k slots of the
  last W_dec global patches.
- head: Dd x V over N tokens.
The baseline (patching mode `none`) is the global stack run over the N tokens plus the head.
Every row position is counted, padding and zero-length patches included: the model computes them.
MFU divides these counts by a device's peak (`device_peak.py`); `compute_plan.py` plans runs
with the closed-form estimate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_lst.models.config import LocalModelConfig, LSTConfig, swiglu_ffn_size

__all__ = [
    "StackShape",
    "ModelShape",
    "FlopBreakdown",
    "causal_pairs",
    "encoder_cross_attention_pairs",
    "decoder_cross_attention_pairs",
    "flops_per_batch",
    "estimate_flops",
]


@dataclass(frozen=True)
class StackShape:
    """A stack of pre-norm transformer layers: self-attention (GQA aware) and a SwiGLU FFN.

    `kv_heads`, `ffn_hidden` and `head_dim` default to `heads`, `swiglu_ffn_size(dim)` and
    `dim // heads`. `window` is the sliding-window length in positions (None: fully causal).
    """

    dim: int
    layers: int
    heads: int
    kv_heads: int | None = None
    ffn_hidden: int | None = None
    head_dim: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"StackShape.{name} = {getattr(self, name)}; it must be >= 1")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(
                f"StackShape: dim {self.dim} is not divisible by heads {self.heads}; "
                "choose a divisor or give head_dim explicitly"
            )
        if self.heads % self.num_kv_heads:
            raise ValueError(
                f"StackShape: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"StackShape.window = {self.window}; give a positive length or None")

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def ffn(self) -> int:
        return swiglu_ffn_size(self.dim) if self.ffn_hidden is None else self.ffn_hidden

    @property
    def attention_dim(self) -> int:
        """Width of all query heads together (heads * head_dim)."""
        return self.heads * (self.dim // self.heads if self.head_dim is None else self.head_dim)

    def dense_flops(self, positions: float) -> float:
        """Forward FLOPs of all layers' projections and FFNs at `positions` positions."""
        q_and_o = 2 * self.dim * self.attention_dim
        k_and_v = 2 * self.dim * (self.attention_dim // self.heads) * self.num_kv_heads
        ffn = 3 * self.dim * self.ffn
        return 2 * positions * self.layers * (q_and_o + k_and_v + ffn)

    def attention_flops(self, pairs: float) -> float:
        """Forward FLOPs of scores and weighted values of all layers over `pairs` query-key
        pairs per layer (each pair costs a head_dim dot product in both products, per head)."""
        return 4 * self.layers * self.attention_dim * pairs

    def flops(self, rows: int, positions: int | float) -> float:
        """Forward FLOPs of the stack over `rows` sequences of `positions` each."""
        pairs = causal_pairs(positions, self.window)
        return rows * (self.dense_flops(positions) + self.attention_flops(pairs))


@dataclass(frozen=True)
class ModelShape:
    """The shape of an LST model, or of the token-level baseline when `encoder` and `decoder`
    are None (build it with `ModelShape.baseline`).

    Cross-attention uses `dim x dim` query/key/value/output projections in both local models
    (the reference's head_dim = dim // heads), so its head count does not change the FLOPs.
    Windows are in patches; `encoder.window`/`decoder.window` (tokens) are the local
    self-attention windows.
    """

    vocab_size: int
    global_stack: StackShape
    encoder: StackShape | None = None
    decoder: StackShape | None = None
    cross_attn_k: int = 1
    cross_attn_window_encoder: int = 512
    cross_attn_window_decoder: int = 512
    cross_attn_all_layers_encoder: bool = True
    cross_attn_all_layers_decoder: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"ModelShape.vocab_size = {self.vocab_size}; it must be >= 1")
        if (self.encoder is None) != (self.decoder is None):
            raise ValueError(
                "ModelShape: give both a local encoder and a local decoder (LST) or neither "
                "(the token-level baseline)"
            )
        if self.encoder is None:
            return
        if self.encoder.dim != self.decoder.dim:
            raise ValueError(
                f"ModelShape: encoder dim {self.encoder.dim} != decoder dim {self.decoder.dim}; "
                "the decoder reads the encoder's final hidden states, so both widths must match"
            )
        for name in ("cross_attn_k", "cross_attn_window_encoder", "cross_attn_window_decoder"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} = {getattr(self, name)}; it must be >= 1")

    @classmethod
    def from_model_config(cls, config: LSTConfig) -> ModelShape:
        """The LST shape of a model config (`.baseline_of()` gives its token baseline)."""
        g, xattn = config.global_model, config.cross_attention
        return cls(
            vocab_size=config.vocab_size,
            global_stack=StackShape(
                dim=g.hidden_size, layers=g.num_layers, heads=g.num_heads,
                kv_heads=g.num_query_groups, ffn_hidden=g.ffn_hidden_size,
                head_dim=g.kv_channels,
            ),
            encoder=_local_stack(config.encoder),
            decoder=_local_stack(config.decoder),
            cross_attn_k=xattn.slots_per_patch,
            cross_attn_window_encoder=xattn.encoder_window,
            cross_attn_window_decoder=xattn.decoder_window,
            cross_attn_all_layers_encoder=xattn.all_encoder_layers,
            cross_attn_all_layers_decoder=xattn.all_decoder_layers,
        )

    @classmethod
    def baseline(cls, vocab_size: int, global_stack: StackShape) -> ModelShape:
        """The plain token-level transformer: embedding, `global_stack` over tokens, head."""
        return cls(vocab_size=vocab_size, global_stack=global_stack)

    def baseline_of(self) -> ModelShape:
        """The baseline with this model's global width and depth and vocabulary."""
        return ModelShape.baseline(self.vocab_size, self.global_stack)

    @property
    def is_baseline(self) -> bool:
        return self.encoder is None

    @property
    def needs_global_projection(self) -> bool:
        if self.is_baseline:
            return False
        return self.cross_attn_k * self.encoder.dim != self.global_stack.dim

    @property
    def encoder_cross_attn_layers(self) -> int:
        return self.encoder.layers if self.cross_attn_all_layers_encoder else 1

    @property
    def decoder_cross_attn_layers(self) -> int:
        return self.decoder.layers if self.cross_attn_all_layers_decoder else 1


def _local_stack(local: LocalModelConfig) -> StackShape:
    return StackShape(
        dim=local.hidden_size, layers=local.num_layers, heads=local.num_heads,
        kv_heads=local.num_query_groups, ffn_hidden=local.ffn_hidden_size, window=local.window,
        head_dim=local.kv_channels,
    )


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per model part. `cross_attention` holds both local models' cross-attention
    (projections and attention); `encoder` the encoder stack and the patch projection;
    `global_` the global stack and its input projection; `decoder` the decoder stack and its
    Dg -> Dd*k projection; `head` the output layer."""

    encoder: float = 0
    global_: float = 0
    decoder: float = 0
    cross_attention: float = 0
    head: float = 0

    @property
    def total(self) -> float:
        return self.encoder + self.global_ + self.decoder + self.cross_attention + self.head

    def __add__(self, other: FlopBreakdown) -> FlopBreakdown:
        return FlopBreakdown(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def scaled(self, factor: float) -> FlopBreakdown:
        return FlopBreakdown(*(getattr(self, f.name) * factor for f in dataclasses.fields(self)))

    def as_dict(self) -> dict[str, float]:
        """Plain names for logs and JSON: encoder, global, decoder, cross_attention, head, total."""
        parts = {f.name.rstrip("_"): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**parts, "total": self.total}


def causal_pairs(length: int | float, window: int | None = None) -> int | float:
    """Query-key pairs of causal attention over `length` positions: the sum over queries i of
    min(i + 1, window). Exact for an integer length; the same closed form for a mean length."""
    visible = length if window is None else min(window, length)
    triangle = visible * (visible + 1)  # even for integers: keep integer counts exact
    triangle = triangle // 2 if isinstance(triangle, int) else triangle / 2
    return triangle + (length - visible) * visible


def _check_patch_lengths(patch_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if patch_lengths.dim() != 2 or patch_lengths.is_floating_point():
        raise ValueError(
            f"patch_lengths must be an integer tensor [B, P], got {tuple(patch_lengths.shape)} "
            f"of {patch_lengths.dtype}"
        )
    lengths = patch_lengths.detach().to("cpu", torch.int64)
    sums = lengths.sum(-1)
    if (lengths < 0).any() or (sums != num_tokens + 1).any():
        raise ValueError(
            f"patch_lengths rows sum to {sums.tolist()} (negative entries: "
            f"{bool((lengths < 0).any())}); the batch contract needs non-negative lengths that "
            f"sum to num_tokens + 1 = {num_tokens + 1} in every row (docs/architecture.md#the-batch-contract)"
        )
    if lengths.shape[1] < 2 or (lengths[:, 0] != 1).any():
        raise ValueError(
            f"patch_lengths {tuple(lengths.shape)} with first patches {lengths[:, 0].tolist()}; "
            "the batch contract needs at least 2 patches per row, the first of length 1"
        )
    return lengths


def encoder_cross_attention_pairs(patch_lengths: torch.Tensor, num_tokens: int,
                                  window: int) -> int:
    """Patch-token pairs of encoder cross-attention, per slot and layer, summed over the batch:
    patch q sees the tokens of patches q-W+1 .. q, the token range
    [start of patch max(0, q-W+1), end of patch q) cut at num_tokens."""
    lengths = _check_patch_lengths(patch_lengths, num_tokens)
    ends = lengths.cumsum(-1)  # [B, P], exclusive ends
    starts = ends - lengths  # [B, P]
    first = (torch.arange(lengths.shape[1]) - window + 1).clamp(min=0)  # [P]
    # index_select, not starts[:, first]: CPU advanced indexing takes 10-1000x longer, and this
    # runs for every micro-batch on the training step's path
    range_start = starts.index_select(1, first).clamp(max=num_tokens)  # [B, P]
    range_end = ends.clamp(max=num_tokens)  # [B, P], the last token of a row is a target only
    return int((range_end - range_start).clamp(min=0).sum())


def decoder_cross_attention_pairs(patch_lengths: torch.Tensor, num_tokens: int,
                                  window: int) -> int:
    """Token-patch pairs of decoder cross-attention, per slot and layer, summed over the batch:
    a token of decoder patch j sees global patches max(0, j-W+1) .. j, and decoder patch j
    holds patch_lengths[:, j + 1] tokens (the contract makes them cover all num_tokens)."""
    lengths = _check_patch_lengths(patch_lengths, num_tokens)
    decoder_lengths = lengths[:, 1:]  # [B, P-1]: the tokens of each decoder patch
    visible = (torch.arange(decoder_lengths.shape[1]) + 1).clamp(max=window)  # [P-1]
    return int((decoder_lengths * visible).sum())


def _lst_flops(shape: ModelShape, rows: int, tokens: float, patches: float,
               encoder_pairs: float, decoder_pairs: float) -> FlopBreakdown:
    """Forward FLOPs of LST for `rows` rows of `tokens` tokens and `patches` patches; the
    cross-attention pair counts (per slot, per layer) are summed over rows."""
    enc, dec, glob, k = shape.encoder, shape.decoder, shape.global_stack, shape.cross_attn_k
    patch_projection = 2 * rows * patches * enc.dim * enc.dim * k
    global_projection = (
        2 * rows * patches * k * enc.dim * glob.dim if shape.needs_global_projection else 0
    )
    decoder_projection = 2 * rows * patches * glob.dim * dec.dim * k

    # One cross-attention layer: q and o projections over the queries, k and v over the keys.
    slots, de, dd = rows * patches * k, enc.dim, dec.dim
    encoder_cross = 4 * slots * de * de + 4 * rows * tokens * de * de + 4 * de * k * encoder_pairs
    decoder_cross = 4 * rows * tokens * dd * dd + 4 * slots * dd * dd + 4 * dd * k * decoder_pairs
    return FlopBreakdown(
        encoder=enc.flops(rows, tokens) + patch_projection,
        global_=glob.flops(rows, patches) + global_projection,
        decoder=dec.flops(rows, tokens) + decoder_projection,
        cross_attention=shape.encoder_cross_attn_layers * encoder_cross
        + shape.decoder_cross_attn_layers * decoder_cross,
        head=2 * rows * tokens * dec.dim * shape.vocab_size,
    )


def _baseline_flops(shape: ModelShape, rows: int, tokens: float) -> FlopBreakdown:
    return FlopBreakdown(
        global_=shape.global_stack.flops(rows, tokens),
        head=2 * rows * tokens * shape.global_stack.dim * shape.vocab_size,
    )


def flops_per_batch(shape: ModelShape, patch_lengths: torch.Tensor, num_tokens: int,
                    training: bool = True) -> FlopBreakdown:
    """Exact FLOPs of one batch of `B` rows of `num_tokens` input tokens.

    patch_lengths: [B, P] integer, the batch contract's patch lengths (rows sum to
        num_tokens + 1; zero-length trailing patches allowed). For the baseline only B is used.
        Pass the CPU copy: the counts are read back to the host.
    training: count forward + backward (3x forward) instead of the forward alone.
    """
    rows = patch_lengths.shape[0]
    if shape.is_baseline:
        forward = _baseline_flops(shape, rows, num_tokens)
    else:
        forward = _lst_flops(
            shape,
            rows,
            num_tokens,
            patch_lengths.shape[1],
            encoder_pairs=encoder_cross_attention_pairs(
                patch_lengths, num_tokens, shape.cross_attn_window_encoder
            ),
            decoder_pairs=decoder_cross_attention_pairs(
                patch_lengths, num_tokens, shape.cross_attn_window_decoder
            ),
        )
    return forward.scaled(3) if training else forward


def estimate_flops(shape: ModelShape, seq_tokens: float, num_patches: int, batch: int,
                   training: bool = True) -> FlopBreakdown:
    """Closed-form FLOPs of `batch` rows of `seq_tokens` tokens (a mean is fine) and
    `num_patches` patches, as if every patch held seq_tokens / num_patches tokens.

    Only the cross-attention depends on how tokens fall into patches; with equal patches the
    encoder sees L * min(q + 1, W) tokens from patch q and the decoder's N tokens spread evenly
    over P - 1 decoder patches. Everything else is exact. `num_patches` is ignored for the
    baseline, whose positions are its tokens.
    """
    if shape.is_baseline:
        forward = _baseline_flops(shape, batch, seq_tokens)
    else:
        if num_patches < 2:
            raise ValueError(f"num_patches = {num_patches}; LST rows have at least 2 patches")
        per_patch = seq_tokens / num_patches
        per_decoder_patch = seq_tokens / (num_patches - 1)
        forward = _lst_flops(
            shape,
            batch,
            seq_tokens,
            num_patches,
            encoder_pairs=batch * per_patch
            * causal_pairs(num_patches, shape.cross_attn_window_encoder),
            decoder_pairs=batch * per_decoder_patch
            * causal_pairs(num_patches - 1, shape.cross_attn_window_decoder),
        )
    return forward.scaled(3) if training else forward
