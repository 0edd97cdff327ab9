"""The model configuration as `lst-train` flags: one table from `LSTConfig` fields to flags.

Every field of `megatron_lst.models.config.LSTConfig` and its parts has exactly one flag here,
except `vocab_size`, which is the joint vocabulary's size (the tokenizer's pieces, the special
ids and `--num-units`), and `documents.eos_id`, the vocabulary's EOS. The table is the one place that names them: the parser's model groups,
the preset defaults, the flags a checkpoint's model is written back as, and the check of a
flag against a checkpoint's configuration are all derived from it. Names are Megatron-LM's where
Megatron has the field (`--num-layers`, `--ffn-hidden-size`, `--norm-epsilon`, `--rotary-base`,
...).

Every model flag defaults to None, meaning "not given": the value then comes from the
checkpoint being loaded (`--use-checkpoint-args`) or, for a new model, from the field's default
in the dataclass or the rule named in its help (`model_provider.lst_config_from_args`).

Kept free of torch: building the parser does not import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

from megatron_lst.models.config import POOLINGS


@dataclasses.dataclass(frozen=True)
class ModelFlag:
    field: str
    """Dotted path of the field in `LSTConfig`, e.g. "encoder.ffn_hidden_size"."""
    flag: str
    kind: type
    """int, float, str, or bool (a `--flag` / `--no-flag` pair)."""
    help: str
    choices: tuple[str, ...] | None = None
    none_means: str | None = None
    """The field whose value a None in this field stands for: the flag then shows that value."""
    fixed_by_checkpoint: bool = True
    """False for a field that changes no weight and no output of a trained model: a given value
    replaces a loaded checkpoint's instead of contradicting it."""

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def part(self) -> str | None:
        """The sub-config the field belongs to ("encoder", ...), None for an `LSTConfig` field."""
        return self.field.split(".")[0] if "." in self.field else None

    @property
    def name(self) -> str:
        """The field's name in its (sub-)config."""
        return self.field.rsplit(".", 1)[-1]


def _local_flags(side: str) -> tuple[ModelFlag, ...]:
    return (
        ModelFlag(f"{side}.num_layers", f"--local-{side}-layers", int,
                  f"Transformer layers of the local {side}."),
        ModelFlag(f"{side}.hidden_size", f"--local-{side}-hidden-size", int,
                  f"Width of the local {side} (the decoder's must equal the encoder's)."),
        ModelFlag(f"{side}.num_heads", f"--local-{side}-heads", int,
                  f"Self-attention heads of the local {side}; the head dimension must be even "
                  "(RoPE)."),
        ModelFlag(f"{side}.num_query_groups", f"--local-{side}-query-groups", int,
                  f"Key/value heads of the local {side} (grouped-query attention; they must "
                  "divide its heads); default: one per head.", none_means=f"{side}.num_heads"),
        ModelFlag(f"{side}.kv_channels", f"--local-{side}-kv-channels", int,
                  f"Size of one attention head of the local {side} (even, for RoPE); default: "
                  "hidden size / heads.", none_means=f"{side}.head_dim"),
        ModelFlag(f"{side}.ffn_hidden_size", f"--local-{side}-ffn-hidden-size", int,
                  f"SwiGLU hidden width of the local {side}. Default: the reference's rule, "
                  "256 * ceil(int(8 * hidden / 3) / 256)."),
        ModelFlag(f"{side}.window", f"--local-{side}-window", int,
                  f"Sliding self-attention window of the local {side}, in tokens "
                  "(default 512)."),
    )


BASE_DOCUMENT_FLAGS: tuple[ModelFlag, ...] = (
    ModelFlag("documents.reset_attention_mask", "--reset-attention-mask", bool,
              "Rows pack several documents, each ended by EOS: no attention crosses a document "
              "end (local windows, pooling and decoder cross-attention, the global transformer). "
              "On by default, for LST and the baseline alike, as the reference's GPU path masks "
              "its self-attention; --no-reset-attention-mask lets attention run over the whole "
              "row."),
    ModelFlag("documents.reset_position_ids", "--reset-position-ids", bool,
              "RoPE positions restart at 0 at every document start (LST only; off by default, "
              "as the reference trains)."),
)
"""The packed-document rule of LST and the baseline."""

LST_DOCUMENT_FLAGS: tuple[ModelFlag, ...] = (
    ModelFlag("documents.reset_cross_attention", "--reset-cross-attention-mask", bool,
              "With --reset-attention-mask, the patch cross-attention (encoder slots, decoder "
              "tokens) stops at document ends too (default); --no-reset-cross-attention-mask "
              "bounds it by the patch windows alone, as the reference's cross-attention."),
    ModelFlag("documents.reset_global_attention", "--reset-global-attention-mask", bool,
              "With --reset-attention-mask, the global transformer stops at document ends too "
              "(default); --no-reset-global-attention-mask makes it causal over the whole row, "
              "as the reference's global model with attn_bias_type causal."),
)
"""The LST model's exceptions to it (the baseline has neither cross-attention nor local
models)."""

DOCUMENT_FLAGS = BASE_DOCUMENT_FLAGS + LST_DOCUMENT_FLAGS
"""The packed-document rule: not a model size, so presets leave it at its default."""

GLOBAL_MODEL_FLAGS: tuple[ModelFlag, ...] = (
    ModelFlag("global_model.num_layers", "--num-layers", int,
              "Layers of the global transformer (the token baseline's whole model)."),
    ModelFlag("global_model.hidden_size", "--hidden-size", int,
              "Width of the global transformer."),
    ModelFlag("global_model.ffn_hidden_size", "--ffn-hidden-size", int,
              "SwiGLU hidden width of the global transformer. Default: 4 * hidden size, as in "
              "Megatron-LM."),
    ModelFlag("global_model.num_heads", "--num-attention-heads", int,
              "Attention heads of the global transformer."),
    ModelFlag("global_model.num_query_groups", "--num-query-groups", int,
              "Key/value heads for grouped-query attention; default: one per head.",
              none_means="global_model.num_heads"),
    ModelFlag("global_model.kv_channels", "--kv-channels", int,
              "Size of one attention head of the global transformer (even, for RoPE); default: "
              "hidden size / heads.", none_means="global_model.head_dim"),
    ModelFlag("max_sequence_length", "--max-position-embeddings", int,
              "Most global positions the model is built for (patches; tokens for the baseline). "
              "Default: --seq-length. May change when resuming.", fixed_by_checkpoint=False),
    ModelFlag("rope_theta", "--rotary-base", float,
              "RoPE base (theta) of every self-attention, local and global (default 10000)."),
    ModelFlag("norm_eps", "--norm-epsilon", float, "Epsilon of every RMSNorm (default 1e-5)."),
    ModelFlag("init_std", "--init-method-std", float,
              "Std of the normal initialisation of the weight matrices (default 0.02). May "
              "change when resuming.", fixed_by_checkpoint=False),
    *BASE_DOCUMENT_FLAGS,
)

LOCAL_MODEL_FLAGS: tuple[ModelFlag, ...] = (
    *LST_DOCUMENT_FLAGS,
    *_local_flags("encoder"),
    *_local_flags("decoder"),
    ModelFlag("cross_attention.slots_per_patch", "--cross-attn-k", int,
              "Slots per patch (k): a patch reaches the global model as k vectors of the local "
              "width (default 2)."),
    ModelFlag("cross_attention.num_heads", "--cross-attn-heads", int,
              "Cross-attention heads; default: --local-encoder-heads."),
    ModelFlag("cross_attention.encoder_window", "--cross-attn-window-encoder", int,
              "Encoder cross-attention window, in patches (default 512)."),
    ModelFlag("cross_attention.decoder_window", "--cross-attn-window-decoder", int,
              "Decoder cross-attention window, in patches (default 512)."),
    ModelFlag("cross_attention.all_encoder_layers", "--cross-attn-all-layers-encoder", bool,
              "Update the patch slots after every encoder layer (default); with the --no- form "
              "only after the last."),
    ModelFlag("cross_attention.all_decoder_layers", "--cross-attn-all-layers-decoder", bool,
              "Cross-attend to the patches before every decoder layer (default); with the --no- "
              "form only before the first."),
    ModelFlag("cross_attention.pooling", "--cross-attn-pooling", str,
              "How the slots start from their patch's tokens (default max).",
              choices=POOLINGS),
    ModelFlag("cross_attention.double_residual", "--cross-attn-double-residual", bool,
              "Reference quirk, on by default: the cross-attention update is x <- 2 * x + out, as "
              "the reference computes it (needed for its checkpoints). --no-cross-attn-double-"
              "residual gives the usual x + out."),
)

MODEL_FLAGS: tuple[ModelFlag, ...] = GLOBAL_MODEL_FLAGS + LOCAL_MODEL_FLAGS


def model_flags_of(baseline: bool) -> tuple[ModelFlag, ...]:
    """The flags a model reads: the token baseline builds no local models or cross-attention."""
    return GLOBAL_MODEL_FLAGS if baseline else MODEL_FLAGS


def add_model_flags(group, flags: tuple[ModelFlag, ...]) -> None:
    """Add `flags` to an argparse group, each defaulting to None ("not given")."""
    for flag in flags:
        if flag.kind is bool:
            group.add_argument(flag.flag, action=argparse.BooleanOptionalAction, default=None,
                               help=flag.help)
        else:
            group.add_argument(flag.flag, type=flag.kind, default=None, choices=flag.choices,
                               help=flag.help)


def flag_value(flag: ModelFlag, config) -> Any:
    """The value of `flag` that describes `config`'s field."""
    if flag.part is not None and getattr(config, flag.part) is None:
        return False  # an absent optional part (documents): its switches are off
    value = operator.attrgetter(flag.field)(config)
    if value is None and flag.none_means is not None:
        value = operator.attrgetter(flag.none_means)(config)
    return value


def flag_values(config, baseline: bool = False) -> dict[str, Any]:
    """Flag destination -> value of every field of an `LSTConfig` the model reads."""
    return {f.dest: flag_value(f, config) for f in model_flags_of(baseline)}


def config_to_argv(config, baseline: bool = False) -> list[str]:
    """The model flags that describe `config` on a command line."""
    argv: list[str] = []
    for flag in model_flags_of(baseline):
        value = flag_value(flag, config)
        if flag.kind is bool:
            argv.append(flag.flag if value else "--no-" + flag.flag[2:])
        else:
            argv += [flag.flag, repr(value) if flag.kind is float else str(value)]
    return argv


def config_to_yaml_mapping(config, baseline: bool = False) -> dict[str, Any]:
    """The model flags that describe `config` as `--config` YAML keys (flag names without the
    dashes) and values."""
    return {f.flag[2:]: flag_value(f, config) for f in model_flags_of(baseline)}


def given_fields(args: argparse.Namespace, baseline: bool = False) -> dict[str | None, dict[str, Any]]:
    """The given model flags of `args`, as field values per part (None: `LSTConfig` itself)."""
    parts: dict[str | None, dict[str, Any]] = {}
    for flag in model_flags_of(baseline):
        value = getattr(args, flag.dest, None)
        if value is not None:
            parts.setdefault(flag.part, {})[flag.name] = value
    return parts


class CheckpointArgsConflict(ValueError):
    """A model flag contradicts the configuration of the checkpoint being loaded."""


def adopt_checkpoint_model(args: argparse.Namespace, saved: Mapping[str, Any], source: str) -> None:
    """Fill the model flags not given in `args` from `saved` (`flag_values` of a checkpoint's
    configuration); a given flag must repeat the saved value unless the field is not
    `fixed_by_checkpoint`."""
    by_dest = {f.dest: f for f in MODEL_FLAGS}
    conflicts = []
    for dest, value in saved.items():
        given = getattr(args, dest, None)
        if given is None:
            setattr(args, dest, value)
        elif given != value and by_dest[dest].fixed_by_checkpoint:
            conflicts.append(f"{by_dest[dest].flag} {given} (checkpoint: {value})")
    if conflicts:
        raise CheckpointArgsConflict(
            f"model flag(s) contradict the configuration of {source}: {'; '.join(conflicts)}. "
            "The model is built from the checkpoint's configuration: drop these flags (from the "
            "command line, --config and --preset), or pass --no-use-checkpoint-args to build "
            "the model from the flags alone (its weights must still fit)")
