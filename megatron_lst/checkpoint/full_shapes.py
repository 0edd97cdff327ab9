"""The shapes of an `LSTModel`'s full state dict (`model_state.full_state_dict` names), from its
configuration alone.

A checkpoint file and the configuration it came with are checked against each other with these
before a model is built: a configuration of another model (a params.json of a larger run beside
a small checkpoint, a crafted `lst_config.json`) is refused naming the tensor, rather than first
allocating a model of the size it describes (a configuration of a few billion parameters failed
with a bare allocator error, after minutes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from megatron_lst.models.config import LSTConfig

from .model_state import VOCAB_TENSORS, CheckpointContentError


def _layer(prefix: str, hidden: int, heads: int, groups: int, head_dim: int, ffn: int,
           norms: tuple[str, str]) -> dict[str, tuple[int, ...]]:
    """A pre-norm self-attention + SwiGLU layer: fused `[q; k; v]` rows, fused `[w1; w3]`."""
    return {
        f"{prefix}{norms[0]}.weight": (hidden,),
        f"{prefix}self_attention.linear_qkv.weight": ((heads + 2 * groups) * head_dim, hidden),
        f"{prefix}self_attention.linear_proj.weight": (hidden, heads * head_dim),
        f"{prefix}{norms[1]}.weight": (hidden,),
        f"{prefix}mlp.linear_fc1.weight": (2 * ffn, hidden),
        f"{prefix}mlp.linear_fc2.weight": (hidden, ffn),
    }


def _cross_attention(prefix: str, hidden: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.norm_q.weight": (hidden,), f"{prefix}.norm_kv.weight": (hidden,),
            f"{prefix}.linear_q.weight": (hidden, hidden),
            f"{prefix}.linear_kv.weight": (2 * hidden, hidden),
            f"{prefix}.linear_proj.weight": (hidden, hidden)}


def _parts(config: LSTConfig) -> list[tuple[int, Callable[[int], dict[str, tuple[int, ...]]]]]:
    """The full state dict of `config`'s model in order, as `(repeats, shapes of repeat i)`: a
    stack of layers repeats one layer's shapes under the layer's number, the rest is there once."""
    g, enc, dec, xattn = config.global_model, config.encoder, config.decoder, config.cross_attention
    k = xattn.slots_per_patch

    def once(shapes: dict[str, tuple[int, ...]]):
        return 1, lambda i: shapes

    projection = ({"global_input_projection.weight": (g.hidden_size, config.patch_width)}
                  if config.patch_width != g.hidden_size else {})
    return [
        once({"token_encoder.embedding.weight": (config.vocab_size, enc.hidden_size)}),
        (enc.num_layers, lambda i: _layer(f"token_encoder.layers.{i}.", enc.hidden_size,
                                          enc.num_heads, enc.kv_groups, enc.head_dim,
                                          enc.ffn_hidden_size, ("input_norm", "pre_mlp_norm"))),
        once({"patch_encoder.patch_projection.weight": (k * enc.hidden_size, enc.hidden_size)}),
        (enc.num_layers if xattn.all_encoder_layers else 1,
         lambda i: _cross_attention(f"patch_encoder.cross_attn_layers.{i}", enc.hidden_size)),
        once(projection),
        (g.num_layers, lambda i: _layer(f"global_transformer.block.layers.{i}.", g.hidden_size,
                                        g.num_heads, g.num_query_groups or g.num_heads,
                                        g.head_dim, g.ffn_hidden_size,
                                        ("input_layernorm", "pre_mlp_layernorm"))),
        once({"local_decoder.patch_projection.weight": (k * dec.hidden_size, g.hidden_size)}),
        (dec.num_layers if xattn.all_decoder_layers else 1,
         lambda i: _cross_attention(f"local_decoder.cross_attn_layers.{i}", dec.hidden_size)),
        (dec.num_layers, lambda i: _layer(f"local_decoder.layers.{i}.", dec.hidden_size,
                                          dec.num_heads, dec.kv_groups, dec.head_dim,
                                          dec.ffn_hidden_size, ("input_norm", "pre_mlp_norm"))),
        once({"local_decoder.final_norm.weight": (dec.hidden_size,),
              "output_layer.weight": (config.vocab_size, dec.hidden_size)}),
    ]


def full_state_shapes(config: LSTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the unsharded `LSTModel` built from `config`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for repeats, part in _parts(config):
        for i in range(repeats):
            shapes |= part(i)
    return shapes


def full_state_size(config: LSTConfig) -> int:
    """The weights (elements) of `full_state_shapes(config)`, counted per stack of layers rather
    than listed: a crafted layer count (10^9) costs nothing here."""
    return sum(repeats * sum(math.prod(shape) for shape in part(0).values())
               for repeats, part in _parts(config))


def check_layer_count(config: LSTConfig, tensor_count: int, source: str) -> None:
    """Refuse a configuration of more layers than `tensor_count`, the tensors of the weights it
    came with, before anything lists the tensors it describes (several per layer, so it cannot
    describe those weights): listing them for a crafted count of 10^9 layers filled the memory
    first, and 10^6 took half a minute."""
    layers = config.encoder.num_layers + config.global_model.num_layers + config.decoder.num_layers
    if layers > tensor_count:
        raise CheckpointContentError(
            f"{source}: the configuration describes {layers} layers, but only {tensor_count} "
            f"tensors are stored (each layer has several); the weights and the configuration "
            f"are of different models")


def check_full_state_shapes(state_shapes: dict[str, tuple[int, ...]], config: LSTConfig,
                            source: str) -> None:
    """Refuse, naming the tensor and `source`, a full state dict (name -> shape) whose names or
    shapes are not those of the model `config` describes (the refusals of `load_full_state_dict`,
    before the model exists)."""
    check_layer_count(config, len(state_shapes), source)
    wanted = full_state_shapes(config)
    for name, shape in wanted.items():
        if name not in state_shapes:
            raise CheckpointContentError(
                f"{source} has no tensor {name!r}, which the model needs ({len(set(wanted) - set(state_shapes))} "
                f"of the {len(wanted)} its config describes are missing); was it written for "
                "another architecture (see its config)?")
        if tuple(state_shapes[name]) != shape:
            raise CheckpointContentError(
                f"{source}: tensor {name!r} has shape {tuple(state_shapes[name])} but the model "
                f"expects {shape}; the weights and the config are of different models"
                + (" (another vocabulary?)" if name in VOCAB_TENSORS else ""))
    unexpected = sorted(set(state_shapes) - set(wanted))
    if unexpected:
        raise CheckpointContentError(
            f"{source} holds tensor(s) the model does not have: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; was it written for another architecture?")
