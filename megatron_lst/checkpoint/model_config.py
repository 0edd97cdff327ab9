"""The model configuration a training checkpoint carries, written and read back exactly.

`lst_checkpoint.json` holds, under "model", the model's kind ("lst" or "baseline") and its
`LSTConfig` as a mapping of fields (`model_state.lst_config_to_dict`). Every tool that loads the
checkpoint builds the model from it (`lst-train --load` with `--use-checkpoint-args`, `lst-eval`,
`lst-generate`, `lst-convert`). Checkpoints written before the record existed are read through
their saved `lst-train` flags (`args`), as training built them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lst.models.config import LSTConfig

from .model_state import CheckpointContentError, lst_config_from_dict, lst_config_to_dict

MODEL_KEY = "model"


@dataclass(frozen=True)
class SavedModel:
    config: LSTConfig
    baseline: bool
    """The token baseline (trained with --patching-mode none) rather than an LST model."""
    patching_mode: str | None
    """The --patching-mode it was trained with, when recorded."""


def model_record(module) -> dict[str, Any] | None:
    """The "model" entry of a checkpoint of `module` (an unwrapped `LSTModel` or
    `TokenBaselineModel`); None for another megatron module, which has no `LSTConfig`."""
    from megatron_lst.models.baseline import TokenBaselineModel

    if not hasattr(module, "lst_config"):
        return None
    kind = "baseline" if isinstance(module, TokenBaselineModel) else "lst"
    return {"kind": kind, "config": lst_config_to_dict(module.lst_config)}


def read_model_config(metadata: dict[str, Any], path: str | Path) -> SavedModel | None:
    """The model of a checkpoint from its `lst_checkpoint.json` contents, or None for a
    checkpoint that records neither a model nor flags and a vocabulary (one of another megatron
    module). Raises `CheckpointContentError` naming `path` for a record or flags that do not
    describe a model, and a `CheckpointError` for an LST model whose checkpoint index cannot be
    read (`check_stored_weights`)."""
    args = metadata.get("args") or {}
    if not isinstance(args, dict):
        raise CheckpointContentError(f"{path}: the saved flags ('args') are a JSON "
                                     f"{type(args).__name__}, not an object; the checkpoint is "
                                     f"corrupt")
    patching_mode = args.get("patching_mode")
    record = metadata.get(MODEL_KEY)
    if record is not None:
        if not isinstance(record, dict) or set(record) != {"kind", "config"} \
                or record["kind"] not in ("lst", "baseline") or not isinstance(record["config"], dict):
            raise CheckpointContentError(
                f"{path}: the model record {record!r} is not {{'kind': 'lst' | 'baseline', "
                "'config': {...}}; the checkpoint is corrupt")
        try:
            config = lst_config_from_dict(record["config"])
        except CheckpointContentError as error:
            raise CheckpointContentError(f"{path}: the model record does not describe a model "
                                         f"({error}); the checkpoint is corrupt") from None
        vocab = _recorded_vocab(metadata, path)
        if vocab is not None and config.vocab_size != vocab.size:
            raise CheckpointContentError(
                f"{path}: the model record's vocab_size {config.vocab_size} differs from the "
                f"{vocab.size} ids of the recorded vocabulary; the checkpoint is corrupt")
        if record["kind"] == "lst":
            check_stored_weights(config, path)
        return SavedModel(config, record["kind"] == "baseline", patching_mode)
    if not args or metadata.get("vocab") is None:
        return None
    return _from_saved_args(metadata, args, path)


def _recorded_vocab(metadata: dict[str, Any], path: str | Path):
    """The checkpoint's `JointVocab`, or None when it records none."""
    from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

    if metadata.get("vocab") is None:
        return None
    try:
        return JointVocab.from_dict(metadata["vocab"])
    except VocabularyError as error:
        raise CheckpointContentError(f"{path}: the recorded vocabulary is damaged ({error}); "
                                     f"the checkpoint is corrupt") from None


def _from_saved_args(metadata: dict[str, Any], args: dict[str, Any], path: str | Path) -> SavedModel:
    from megatron_lst.models.config import ModelConfigError
    from megatron_lst.training.arguments import build_parser
    from megatron_lst.training.model_provider import lst_config_from_args

    # Older checkpoints saved flags this version may not have; parser defaults fill the rest.
    flags = vars(build_parser().parse_args([]))
    flags.update(args)
    legacy_window = flags.pop("local_attention_window", None)  # once one flag for both sides
    for side in ("encoder", "decoder"):
        if flags.get(f"local_{side}_window") is None:
            flags[f"local_{side}_window"] = legacy_window
    if flags.get("patching_mode") != "none" and flags.get("max_tokens") is not None:
        flags["max_position_embeddings"] = flags["max_tokens"]  # what training recorded then
    for dest in ("reset_attention_mask", "reset_position_ids"):
        if args.get(dest) is None:  # saved before document masking existed: trained without
            flags[dest] = False
    vocab = _recorded_vocab(metadata, path)
    try:
        config = lst_config_from_args(argparse.Namespace(**flags), vocab.size, vocab.eos_id)
    except (ModelConfigError, KeyError, TypeError) as error:
        raise CheckpointContentError(
            f"{path}: its saved flags do not describe a model ({error})") from None
    if flags["patching_mode"] != "none":
        check_stored_weights(config, path)
    return SavedModel(config, flags["patching_mode"] == "none", flags["patching_mode"])


def check_stored_weights(config: LSTConfig, path: str | Path) -> None:
    """Refuse an LST model record that describes more weights than the checkpoint's files hold
    (a damaged or crafted record: every tool builds the model it names before loading, and a
    record of billions of weights beside a small checkpoint allocated them first, failing in the
    allocator). Reads the checkpoint index alone, with the restricted unpickler. An index that
    cannot be read raises its own CheckpointError (CheckpointIntegrityError, or
    UnsafeCheckpointError for a crafted one): without it the record cannot be checked, and no
    loading could use the checkpoint anyway."""
    import math

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .dist import NON_MODEL_PREFIXES
    from .full_shapes import full_state_size
    from .safe_pickle import read_dcp_metadata

    index = read_dcp_metadata(path)
    stored = sum(math.prod(item.size) for key, item in index.state_dict_metadata.items()
                 if isinstance(item, TensorStorageMetadata) and not key.startswith(NON_MODEL_PREFIXES))
    described = full_state_size(config)  # counted, not listed: the record may name 10^9 layers
    if described > stored:
        raise CheckpointContentError(
            f"{path}: the model record describes {described} weights, but the checkpoint's "
            f"tensors hold {stored}; the record is damaged or of another model")
