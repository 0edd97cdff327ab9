"""Model configuration: one frozen dataclass per part, presets, and the megatron.core config.

Every field has an `lst-train` flag (`megatron_lst.training.model_flags`). `LSTConfig` describes
the whole model (local encoder, global transformer, local decoder and the
cross-attention between them); `TokenBaselineModel` uses only `vocab_size`, `global_model`,
`norm_eps`, `rope_theta`, `max_sequence_length` and `init_std`. `LSTConfig.transformer_config()` turns it
into the `TransformerConfig` that megatron.core modules (the global block, the embedding and the
output head) are built with, parallel settings included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class ModelConfigError(ValueError):
    """A model configuration is inconsistent or asks for something not implemented."""


CUDA_FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                "apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm")
"""megatron.core `TransformerConfig` switches of fused kernels that need CUDA (or Apex): a
megatron.core model on CPU needs them all off, as `LSTConfig.transformer_config` sets them."""


def swiglu_ffn_size(hidden_size: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """SwiGLU hidden width of the reference (and Llama): `multiple_of * ceil(int(m * int(8h/3)) / multiple_of)`."""
    width = int(multiplier * int(2 * 4 * hidden_size / 3))
    return multiple_of * math.ceil(width / multiple_of)


def _head_shape_errors(where: str, hidden: int, heads: int, groups: int,
                       kv_channels: int | None) -> str | None:
    """What is wrong with a self-attention's heads, or None: `groups` key/value heads must divide
    the `heads` query heads; a head size of `kv_channels` (None: `hidden / heads`, which must then
    divide) must be even for RoPE."""
    if heads % groups:
        return (f"{where} num_heads {heads} is not divisible by num_query_groups {groups} "
                "(each key/value head serves a whole group of query heads)")
    if kv_channels is None and hidden % heads:
        return (f"{where} hidden_size {hidden} is not divisible by num_heads {heads}; "
                "choose a divisor or give the head size (kv_channels) explicitly")
    head_dim = kv_channels if kv_channels is not None else hidden // heads
    if head_dim % 2:
        return f"{where} head dim {head_dim} must be even for RoPE"
    return None


def _given_or(value: int | None, default: int) -> int:
    """A size that may be None ("derived"): 0 stays 0, to be refused as no size."""
    return default if value is None else value


def _head_dim(config) -> int:
    """A local or global config's head size: `kv_channels`, else `hidden_size / num_heads`."""
    return config.kv_channels if config.kv_channels is not None else config.hidden_size // config.num_heads


def _normalise_head_shape(config) -> None:
    """Store a local or global config's spelt-out defaults as None (key/value heads equal to the
    heads, a head size equal to `hidden / heads`), so that two configs of the same model compare
    equal."""
    if config.num_query_groups == config.num_heads:
        object.__setattr__(config, "num_query_groups", None)
    if config.kv_channels is not None and config.kv_channels * config.num_heads == config.hidden_size:
        object.__setattr__(config, "kv_channels", None)


def _check_stack_shape(config, where: str, size_fields: tuple[str, ...]) -> None:
    """Refuse a local or global config (`where` names it) whose `size_fields`, key/value heads or
    head size are below 1, every size named with its value, or whose heads do not fit
    (`_head_shape_errors`)."""
    groups = _given_or(config.num_query_groups, config.num_heads)
    sizes = {**{name: getattr(config, name) for name in size_fields},
             "num_query_groups": groups, "kv_channels": _given_or(config.kv_channels, 1)}
    if min(sizes.values()) < 1:  # before dividing by num_heads
        raise ModelConfigError(
            f"{where} " + ", ".join(f"{name} ({getattr(config, name)})" for name in sizes)
            + " must be >= 1")
    error = _head_shape_errors(where, config.hidden_size, config.num_heads, groups,
                               config.kv_channels)
    if error:
        raise ModelConfigError(error)


@dataclass(frozen=True)
class LocalModelConfig:
    """A stack of pre-norm sliding-window causal self-attention layers (encoder or decoder)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    window: int = 512
    """Sliding-window length in tokens: token i attends tokens i-window+1 .. i."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention: query head h reads key/value head
    `h // (num_heads / num_query_groups)`); None means one per query head, and a count equal to
    `num_heads` is stored as None."""
    kv_channels: int | None = None
    """Size of one attention head (megatron's `kv_channels`): q, k and v are `num_heads` (resp.
    `num_query_groups`) heads of this size, and the output projection reads
    `num_heads * kv_channels`. None means `hidden_size / num_heads`; that value is stored as
    None."""

    def __post_init__(self):
        _normalise_head_shape(self)
        _check_stack_shape(self, "local", ("hidden_size", "num_layers", "num_heads", "window",
                                           "ffn_hidden_size"))

    @property
    def head_dim(self) -> int:
        return _head_dim(self)

    @property
    def kv_groups(self) -> int:
        """Key/value heads (`num_query_groups`, or one per query head)."""
        return _given_or(self.num_query_groups, self.num_heads)


@dataclass(frozen=True)
class GlobalModelConfig:
    """The global (latent) transformer over patches: a megatron.core TransformerBlock."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    num_query_groups: int | None = None
    """Key/value heads (GQA); None means one per query head, and a count equal to `num_heads` is
    stored as None, so that two configs of the same model compare equal."""
    kv_channels: int | None = None
    """Size of one attention head (megatron's `kv_channels`); None means `hidden_size /
    num_heads`, and that value is stored as None."""

    def __post_init__(self):
        _normalise_head_shape(self)
        _check_stack_shape(self, "global", ("hidden_size", "num_layers", "num_heads",
                                            "ffn_hidden_size"))

    @property
    def head_dim(self) -> int:
        return _head_dim(self)


# How the patch slots start from their patch's tokens (`CrossAttentionConfig.pooling`).
POOLINGS = ("max", "mean", "min")


@dataclass(frozen=True)
class CrossAttentionConfig:
    """How patches and tokens exchange information (docs/architecture.md#attention-ranges)."""

    slots_per_patch: int = 2
    """k: each patch is k vectors of the local width, concatenated for the global model."""
    num_heads: int = 2
    encoder_window: int = 512
    """In patches: the k slots of patch q attend the tokens of patches q-W+1 .. q."""
    decoder_window: int = 512
    """In patches: a token of decoder patch j attends the slots of global patches j-W+1 .. j."""
    all_encoder_layers: bool = True
    """Update the patch slots after every encoder layer (else only after the last)."""
    all_decoder_layers: bool = True
    """Cross-attend before every decoder layer (else only before the first)."""
    pooling: str = "max"
    """How the slots are initialised from their patch's tokens: "max", "mean" or "min"."""
    double_residual: bool = True
    """Reference quirk: its cross-attention returns `x + out` and the caller adds `x` again, so the
    update is `x <- 2 * x + out`. True reproduces the reference; False is the usual `x + out`."""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ModelConfigError(f"cross-attention pooling must be one of {POOLINGS}, got "
                                   f"{self.pooling!r}")
        if min(self.slots_per_patch, self.num_heads, self.encoder_window, self.decoder_window) < 1:
            raise ModelConfigError(f"cross-attention sizes must all be >= 1, got {self}")


@dataclass(frozen=True)
class DocumentMaskingConfig:
    """Rows that pack several documents, each ended by `eos_id` (see `documents.py`)."""

    eos_id: int
    reset_attention_mask: bool = True
    """No attention crosses a document start (Megatron-LM's `--reset-attention-mask`)."""
    reset_position_ids: bool = False
    """RoPE positions restart at every document start (Megatron-LM's `--reset-position-ids`)."""
    reset_cross_attention: bool = True
    """With `reset_attention_mask`, the LST model's patch cross-attention (encoder slots and
    decoder tokens) stops at document starts too; False: its patch windows alone bound it, as the
    reference's cross-attention, whose masks know no documents."""
    reset_global_attention: bool = True
    """With `reset_attention_mask`, the LST model's global transformer stops at document starts
    too; False: it is causal over the whole row, as the reference's global model with
    attn_bias_type "causal" (whose local models still stop at EOS)."""

    def __post_init__(self):
        if not self.reset_attention_mask:  # no attention is reset: the two switches mean nothing
            object.__setattr__(self, "reset_cross_attention", True)
            object.__setattr__(self, "reset_global_attention", True)


@dataclass(frozen=True)
class LSTConfig:
    vocab_size: int
    global_model: GlobalModelConfig
    encoder: LocalModelConfig
    decoder: LocalModelConfig
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    """One RoPE base for the local and global models, as in the reference."""
    max_sequence_length: int = 4096
    """Most global positions (patches; tokens for the baseline) the model is built for:
    GPTModel's `max_sequence_length` in the token baseline. RoPE itself has no length cap, so the
    LST model only records it."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix (megatron's `init_method_std`)."""
    documents: DocumentMaskingConfig | None = None
    """Packed documents in a row; None: every row is one sequence (attention and positions run
    across EOS)."""

    def __post_init__(self):
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ModelConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("vocab_size", "max_sequence_length"):
            if getattr(self, name) < 1:  # an embedding of no rows, a RoPE table of no positions
                raise ModelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder.hidden_size != self.encoder.hidden_size:
            # The decoder's input is the encoder's final hidden state (reference rule 8).
            raise ModelConfigError(
                f"decoder hidden_size {self.decoder.hidden_size} must equal encoder hidden_size "
                f"{self.encoder.hidden_size}: the decoder reads the encoder's token states"
            )
        for name, local in (("encoder", self.encoder), ("decoder", self.decoder)):
            if local.hidden_size % self.cross_attention.num_heads:
                raise ModelConfigError(
                    f"{name} hidden_size {local.hidden_size} is not divisible by "
                    f"cross_attention.num_heads {self.cross_attention.num_heads}"
                )

    @property
    def patch_width(self) -> int:
        """Width of one patch as the local encoder emits it: k slots of the encoder width."""
        return self.cross_attention.slots_per_patch * self.encoder.hidden_size

    def transformer_config(self, **overrides):
        """The megatron.core `TransformerConfig` of the global model.

        `overrides` carries parallel and precision settings (tensor_model_parallel_size,
        pipeline_model_parallel_size, sequence_parallel, params_dtype, bf16, ...). The defaults
        reproduce the reference block: pre-norm RMSNorm, SwiGLU without biases, interleaved RoPE,
        no dropout, fp32 softmax scale 1/sqrt(head_dim). Fusions that need CUDA kernels are off by
        default; turn them on through `overrides` on GPU.
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        g = self.global_model
        settings = dict(
            num_layers=g.num_layers,
            hidden_size=g.hidden_size,
            num_attention_heads=g.num_heads,
            num_query_groups=g.num_query_groups,
            kv_channels=g.head_dim,
            ffn_hidden_size=g.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            **dict.fromkeys(CUDA_FUSIONS, False),
            rotary_interleaved=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        settings.update(overrides)
        # Pipeline p2p buffers carry activations in the parameters' dtype unless told otherwise.
        settings.setdefault("pipeline_dtype", settings.get("params_dtype", torch.float32))
        return TransformerConfig(**settings)


def check_tensor_parallel_vocab(config: LSTConfig, megatron_config) -> None:
    """The vocab-parallel embedding and head split the vocabulary evenly over TP ranks."""
    tp = megatron_config.tensor_model_parallel_size
    if config.vocab_size % tp:
        raise ModelConfigError(
            f"vocab_size {config.vocab_size} is not divisible by tensor_model_parallel_size {tp}; "
            f"pad the joint vocabulary to a multiple of {tp} (e.g. with spare speech-unit slots, "
            "JointVocab(num_units=...)) or use another TP size"
        )


def _local(hidden: int, layers: int, heads: int, window: int, multiple_of: int = 256) -> LocalModelConfig:
    return LocalModelConfig(hidden, layers, heads, swiglu_ffn_size(hidden, multiple_of), window)


def _global(hidden: int, layers: int, heads: int, groups: int | None = None,
            multiple_of: int = 256) -> GlobalModelConfig:
    return GlobalModelConfig(hidden, layers, heads, swiglu_ffn_size(hidden, multiple_of), groups)


def preset(name: str, vocab_size: int) -> LSTConfig:
    """A named model size. `vocab_size` comes from the joint vocabulary (`JointVocab.size`).

    These are also the `--preset` model sizes of `lst-train` (megatron_lst.training.arguments).

    - "tiny":     model and checkpoint tests (global 64 x 2, local 32 with 1 encoder and 2
                  decoder layers, k=2, windows 512).
    - "tiny-cpu": training tests and the CPU demo (global 64 x 2 x 4 heads with a SwiGLU width
                  of 176, local 32 with 1 encoder and 1 decoder layer, k=2, cross-attention
                  windows 16 patches, local windows 64 tokens, 64 positions).
    - "medium":   CPU benchmarks; the configuration the reference was timed at (global 256 x 4 x
                  4 heads, local 128 with 1 encoder and 2 decoder layers, k=2, windows 512).
    - "paper-1b": the paper's 1B (encoder 1 x 1024, global 25 x 2048 x 16 heads, as the
                  reference's apps/main/configs/llama_1B.yaml, decoder 9 x 1024, windows 512,
                  RoPE theta 5e5).
    - "7b":       a 7B-class model: the reference's llama_7B global model (32 x 4096 x 32 heads,
                  RoPE theta 1e5) with the 1B's local models (1024 wide, 1 encoder and 9 decoder
                  layers) and k=4 slots, so a patch is 4 x 1024 = 4096 wide.
    """
    if name not in _PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of {PRESETS}")
    return _PRESETS[name](vocab_size)


_PRESETS: dict[str, Callable[[int], LSTConfig]] = {
    "tiny": lambda vocab_size: LSTConfig(
        vocab_size=vocab_size,
        global_model=_global(64, 2, 4),
        encoder=_local(32, 1, 2, 512),
        decoder=_local(32, 2, 2, 512),
        cross_attention=CrossAttentionConfig(slots_per_patch=2, num_heads=2),
    ),
    "tiny-cpu": lambda vocab_size: LSTConfig(
        vocab_size=vocab_size,
        global_model=_global(64, 2, 4, multiple_of=16),
        encoder=_local(32, 1, 2, 64),
        decoder=_local(32, 1, 2, 64),
        cross_attention=CrossAttentionConfig(
            slots_per_patch=2, num_heads=2, encoder_window=16, decoder_window=16
        ),
        max_sequence_length=64,
    ),
    "medium": lambda vocab_size: LSTConfig(
        vocab_size=vocab_size,
        global_model=_global(256, 4, 4),
        encoder=_local(128, 1, 4, 512),
        decoder=_local(128, 2, 4, 512),
        cross_attention=CrossAttentionConfig(slots_per_patch=2, num_heads=4),
    ),
    "paper-1b": lambda vocab_size: LSTConfig(
        vocab_size=vocab_size,
        global_model=_global(2048, 25, 16),
        encoder=_local(1024, 1, 16, 512),
        decoder=_local(1024, 9, 16, 512),
        cross_attention=CrossAttentionConfig(slots_per_patch=2, num_heads=16),
        rope_theta=500000.0,
    ),
    "7b": lambda vocab_size: LSTConfig(
        vocab_size=vocab_size,
        global_model=_global(4096, 32, 32),
        encoder=_local(1024, 1, 16, 512),
        decoder=_local(1024, 9, 16, 512),
        cross_attention=CrossAttentionConfig(slots_per_patch=4, num_heads=16),
        rope_theta=100000.0,
    ),
}
PRESETS = tuple(_PRESETS)


def with_windows(config: LSTConfig, token_window: int, patch_window: int) -> LSTConfig:
    """The same model with other sliding-window (tokens) and cross-attention (patches) windows."""
    return dataclasses.replace(
        config,
        encoder=dataclasses.replace(config.encoder, window=token_window),
        decoder=dataclasses.replace(config.decoder, window=token_window),
        cross_attention=dataclasses.replace(
            config.cross_attention, encoder_window=patch_window, decoder_window=patch_window
        ),
    )
