"""The reference implementation's state dict (`neillu23/lst`, a BLT fork) <-> `LSTModel` tensors.

Two steps:
1. `canonical_state_dict`: reference names and layouts -> this package's names for an unsharded
   model (TP=1, PP=1, megatron's local spec), e.g. `wq/wk/wv` -> a fused `linear_qkv`. The one
   table `reference_tensor_map` states this mapping; the export
   (`megatron_lst.checkpoint.reference.export_reference`) splits by the same table.
2. `shard_for_model` (in `canonical_sharding`): canonical tensors -> the state dict of one
   rank's `LSTModel`, whatever its tensor-parallel rank, pipeline stage or global-block spec
   (local or Transformer Engine names).

Layouts (reference -> ours):
- local attention `wq, wk, wv` -> `linear_qkv = [wq; wk; wv]` (`H`, `G` and `G` heads of
  `head_dim` rows: the reference's `n_kv_heads` key/value heads and `head_dim` head size); `wo`
  -> `linear_proj`;
- global attention -> megatron's grouped `linear_qkv`: for each KV group g, the rows of its query
  heads, then its key head, then its value head (reference GQA repeats each KV head for
  consecutive query heads, which is megatron's grouping);
- SwiGLU `w1, w3` -> `linear_fc1 = [w1; w3]` (gate first, megatron's `glu` chunk order); `w2` ->
  `linear_fc2`. Under TP each rank holds `[w1_r; w3_r]`, so fc1 is sharded per half;
- cross-attention `wk, wv` -> `linear_kv = [wk; wv]`; `cross_attn_norm_q/kv` -> `norm_q/kv`;
- `attention_norm` / `ffn_norm` -> `input_norm` / `pre_mlp_norm` (local) or megatron's
  `input_layernorm` / `pre_mlp_layernorm`;
- the decoder's patch projection: the reference builds it only when `dim_global` differs from
  `dim_local_decoder`; without it (then `cross_attn_k` is 1) its cross-attention reads the global
  output itself, which our `local_decoder.patch_projection` computes as the identity matrix
  (`reference_identity_tensors`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .canonical_sharding import shard_for_model
from .config import GlobalModelConfig, LocalModelConfig, LSTConfig
from .reference_config import ReferenceImportError


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One of our unsharded tensors and the reference tensors it is made of.

    One reference tensor is copied. Several are stacked by rows: their rows are cut into `groups`
    equal blocks and, for each group in turn, that block of every part in order is emitted. With
    one group this is plain concatenation `[a; b; c]`; the global block's grouped-query QKV uses
    one group per KV head (its query heads, then its key head, then its value head).
    `row_shares` are the parts' relative row counts within a group (equal when empty); `split`
    needs them to cut the stacked tensor back into the parts.
    """

    ours: str
    reference: tuple[str, ...]
    groups: int = 1
    row_shares: tuple[int, ...] = ()

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our tensor from the reference tensors, given in the order of `reference`."""
        if len(parts) == 1:
            return parts[0]
        blocks = [part.unflatten(0, (self.groups, -1)) for part in parts]  # [G, rows/G, ...]
        return torch.cat(blocks, dim=1).flatten(0, 1)

    def split(self, ours: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference tensors, in the order of `reference`, from ours (inverse of `combine`)."""
        if len(self.reference) == 1:
            return (ours,)
        shares = self.row_shares or (1,) * len(self.reference)
        grouped = ours.unflatten(0, (self.groups, -1))  # [G, rows/G, ...]
        unit = grouped.shape[1] // sum(shares)
        parts = grouped.split([share * unit for share in shares], dim=1)
        return tuple(part.flatten(0, 1) for part in parts)


def _transformer_layer(ours: str, ref: str, norms: tuple[str, str], qkv_groups: int = 1,
                       row_shares: tuple[int, int, int] = (1, 1, 1)) -> list[TensorMapping]:
    """A self-attention + SwiGLU layer. `ours`/`ref`: the layer's name prefixes, trailing dot
    included; `norms`: our names of its attention and FFN pre-norms; the fused QKV stacks
    `qkv_groups` groups, each of `row_shares` (query, key, value) heads (one group: plain
    `[wq; wk; wv]`). Head sizes come from the tensors' rows."""
    return [
        TensorMapping(f"{ours}self_attention.linear_qkv.weight",
                      tuple(f"{ref}attention.{w}.weight" for w in ("wq", "wk", "wv")),
                      qkv_groups, row_shares),
        TensorMapping(f"{ours}self_attention.linear_proj.weight", (f"{ref}attention.wo.weight",)),
        TensorMapping(f"{ours}mlp.linear_fc1.weight",
                      (f"{ref}feed_forward.w1.weight", f"{ref}feed_forward.w3.weight")),
        TensorMapping(f"{ours}mlp.linear_fc2.weight", (f"{ref}feed_forward.w2.weight",)),
        TensorMapping(f"{ours}{norms[0]}.weight", (f"{ref}attention_norm.weight",)),
        TensorMapping(f"{ours}{norms[1]}.weight", (f"{ref}ffn_norm.weight",)),
    ]


_GLOBAL_NORMS = ("input_layernorm", "pre_mlp_layernorm")  # megatron's local-spec names


def _global_layer(ours: str, ref: str, g: GlobalModelConfig) -> list[TensorMapping]:
    groups = g.num_query_groups or g.num_heads
    return _transformer_layer(ours, ref, _GLOBAL_NORMS, groups, (g.num_heads // groups, 1, 1))


def _local_layers(ours: str, ref: str, local: LocalModelConfig) -> list[TensorMapping]:
    """A local model's layers: its fused QKV is plain `[wq; wk; wv]`, of `H`, `G` and `G` heads."""
    return [mapping for i in range(local.num_layers) for mapping in
            _transformer_layer(f"{ours}.layers.{i}.", f"{ref}.layers.{i}.", ("input_norm", "pre_mlp_norm"),
                               row_shares=(local.num_heads, local.kv_groups, local.kv_groups))]


def _cross_attention_layers(ours: str, ref: str, count: int) -> list[TensorMapping]:
    mappings = []
    for i in range(count):
        o, r = f"{ours}.cross_attn_layers.{i}", f"{ref}.cross_attn_layers.{i}"
        mappings += [
            TensorMapping(f"{o}.norm_q.weight", (f"{r}.cross_attn_norm_q.weight",)),
            TensorMapping(f"{o}.norm_kv.weight", (f"{r}.cross_attn_norm_kv.weight",)),
            TensorMapping(f"{o}.linear_q.weight", (f"{r}.wq.weight",)),
            TensorMapping(f"{o}.linear_kv.weight", (f"{r}.wk.weight", f"{r}.wv.weight")),
            TensorMapping(f"{o}.linear_proj.weight", (f"{r}.wo.weight",)),
        ]
    return mappings


DECODER_PROJECTION = "local_decoder.patch_projection.weight"


def reference_tensor_map(config: LSTConfig) -> list[TensorMapping]:
    """Every tensor of an unsharded `LSTModel` (TP=1, PP=1, local spec) with the reference tensors
    it is made of, in the reference's module order. Import combines, export splits."""
    xattn, g = config.cross_attention, config.global_model
    mappings = [TensorMapping("token_encoder.embedding.weight", ("local_encoder.tok_embeddings.weight",))]
    mappings += _local_layers("token_encoder", "local_encoder", config.encoder)
    mappings.append(TensorMapping("patch_encoder.patch_projection.weight",
                                  ("local_encoder.patch_embedding_projection.weight",)))
    mappings += _cross_attention_layers("patch_encoder", "local_encoder",
                                        config.encoder.num_layers if xattn.all_encoder_layers else 1)
    if config.patch_width != g.hidden_size:
        mappings.append(TensorMapping("global_input_projection.weight",
                                      ("global_transformer.token_embedding_projection.weight",)))
    for i in range(g.num_layers):
        mappings += _global_layer(f"global_transformer.block.layers.{i}.", f"global_transformer.layers.{i}.", g)
    if _reference_has_decoder_projection(config):
        mappings.append(TensorMapping(DECODER_PROJECTION,
                                      ("local_decoder.patch_embedding_projection.weight",)))
    mappings += _cross_attention_layers("local_decoder", "local_decoder",
                                        config.decoder.num_layers if xattn.all_decoder_layers else 1)
    mappings += _local_layers("local_decoder", "local_decoder", config.decoder)
    mappings += [
        TensorMapping("local_decoder.final_norm.weight", ("local_decoder.norm.weight",)),
        TensorMapping("output_layer.weight", ("local_decoder.output.weight",)),
    ]
    return mappings


def _reference_has_decoder_projection(config: LSTConfig) -> bool:
    """Whether the reference stores the decoder's patch projection (`_check_decoder_projection`):
    it builds one only when `dim_global != dim_local_decoder`, and runs without one only with one
    slot per patch, where ours is the identity."""
    g, dec, k = config.global_model, config.decoder, config.cross_attention.slots_per_patch
    if g.hidden_size != dec.hidden_size:
        return True
    if k != 1:
        raise ReferenceImportError(
            f"a model with global hidden_size {g.hidden_size} == decoder hidden_size "
            f"{dec.hidden_size} and {k} slots per patch has no reference checkpoint: the reference "
            "builds no decoder patch projection for equal widths and then runs only with "
            "cross_attn_k 1")
    return False


def reference_identity_tensors(config: LSTConfig) -> dict[str, int]:
    """Our tensors the reference does not store because it applies no layer there, with the size
    of the identity matrix that computes the same: `{DECODER_PROJECTION: Dg}` when the reference
    has no decoder patch projection, else empty."""
    if _reference_has_decoder_projection(config):
        return {}
    return {DECODER_PROJECTION: config.global_model.hidden_size}


# Reference names of one global layer's tensors, relative to `global_transformer.layers.{i}.`.
GLOBAL_LAYER_TENSORS = tuple(
    name for mapping in _transformer_layer("", "", _GLOBAL_NORMS) for name in mapping.reference
)


def global_layer_to_megatron(layer: dict[str, torch.Tensor], g: GlobalModelConfig) -> dict[str, torch.Tensor]:
    """One reference global layer (keys `GLOBAL_LAYER_TENSORS`) -> megatron layer tensors (keys
    relative to `layers.{i}.`, local-spec names, unsharded)."""
    return {mapping.ours: mapping.combine([layer[name] for name in mapping.reference])
            for mapping in _global_layer("", "", g)}


def canonical_state_dict(reference: dict[str, torch.Tensor], config: LSTConfig) -> dict[str, torch.Tensor]:
    """Reference state dict -> unsharded `LSTModel` names and layouts (`reference_tensor_map`)."""
    mappings = reference_tensor_map(config)
    _check_reference_names(reference, {name for m in mappings for name in m.reference})
    ref = dict(reference)
    out: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        parts = [ref.pop(name) for name in mapping.reference]
        try:
            out[mapping.ours] = mapping.combine(parts)
        except RuntimeError:
            shapes = {name: tuple(part.shape) for name, part in zip(mapping.reference, parts,
                                                                     strict=True)}
            raise ReferenceImportError(
                f"reference tensors {shapes} do not combine into {mapping.ours!r}: their shapes "
                "do not fit the model args") from None
    dtype = reference["local_decoder.output.weight"].dtype
    for name, size in reference_identity_tensors(config).items():
        out[name] = torch.eye(size, dtype=dtype)
    return out


# Reference modules the import does not support, by name prefix, with the args field that builds them.
_UNSUPPORTED_REFERENCE_MODULES = {"encoder_hash_tok_embedding.": "encoder_hash_byte_group_size",
                                  "encoder_ngram_embedding.": "encoder_ngram_to_size_str"}


def _check_reference_names(reference: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Refuse a reference state dict whose tensor names are not those the model args give, naming
    the missing and the unmapped ones (up to 5 of each) and the count of each."""
    missing = sorted(expected - set(reference))
    unmapped = sorted(set(reference) - expected)
    if not missing and not unmapped:
        return

    def some(names: list[str]) -> str:
        return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

    parts = []
    if missing:
        parts.append(f"reference checkpoint has no tensor {missing[0]!r} ({len(missing)} the model "
                     f"args describe are missing: {some(missing)})")
    if unmapped:
        parts.append(f"reference tensors left unmapped ({len(unmapped)} the model args do not "
                     f"describe): {some(unmapped)}")
    modules = sorted({field for name in unmapped
                      for prefix, field in _UNSUPPORTED_REFERENCE_MODULES.items()
                      if name.startswith(prefix)})
    advice = (f"the checkpoint holds modules built by {modules}, which this import does not "
              "support" if modules else
              "the checkpoint and the model args are of different models: pass the params.json "
              "saved with this checkpoint")
    raise ReferenceImportError(f"{'; '.join(parts)}; {advice}")


def load_reference_state_dict(model, reference: dict[str, torch.Tensor]) -> None:
    """Load a reference state dict into `model` (any TP rank / pipeline stage), strictly."""
    sharded = shard_for_model(canonical_state_dict(reference, model.lst_config), model)
    missing, unexpected = model.load_state_dict(sharded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ReferenceImportError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def load_reference_checkpoint(model, path: str | Path) -> None:
    """Load a reference `.safetensors` state dict file into `model`."""
    from safetensors.torch import load_file

    load_reference_state_dict(model, load_file(str(path)))
