"""Megatron dist checkpoints (`training/checkpointing.py` layout) <-> full state dicts.

megatron.core stores every tensor in model space (global shape, this rank's slice), so a dist
checkpoint has no layout of its own: one written by a TP=1/PP=1 model in one process loads under
TP=c/PP=d, and one written under TP=a/PP=b loads into a TP=1/PP=1 model, resharded on load.
Conversions here therefore run in a single process; the training loop's `--load` reshards to the
run's layout (optimizer state included); `LSTModel.sharded_state_dict` keeps the vocab-parallel
token embedding and the pipeline encoder replica right under TP>1 and PP>1.

The model is read back from the configuration the checkpoint records (`model_config.py`), and its
vocabulary from the same `lst_checkpoint.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_lst.models.config import LSTConfig
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

from . import mcore_load
from .model_state import CheckpointContentError
from .safe_pickle import saved_tensors_metadata

# Keys of a training checkpoint that are not model tensors.
NON_MODEL_PREFIXES = ("optimizer.", "rng_state")


def resolve_checkpoint(path: str | Path) -> Path:
    """An `iter_XXXXXXX` directory, or the newest complete one under a `--save` directory."""
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpointing import METADATA_FILENAME

    path = Path(path)
    if (path / METADATA_FILENAME).is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointContentError(f"{path} holds no complete dist checkpoint")
    return latest


def checkpoint_model(path: Path) -> tuple[LSTConfig, JointVocab, dict[str, Any]]:
    """`(LSTConfig, vocabulary, saved lst-train flags)` of the dist checkpoint at `path`."""
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    from .model_config import read_model_config

    metadata = read_checkpoint_metadata(path)
    if metadata.get("vocab") is None:
        raise CheckpointContentError(
            f"{path} records no vocabulary, so its embedding size is unknown; it was not written "
            "by lst-train or lst-convert")
    saved = read_model_config(metadata, path)
    if saved is None:
        raise CheckpointContentError(
            f"{path} records no LST model; it was not written by lst-train or lst-convert")
    if saved.baseline:
        raise CheckpointContentError(
            f"{path} holds a token-baseline model (--patching-mode none); only LST models convert")
    return saved.config, JointVocab.from_dict(metadata["vocab"]), metadata.get("args") or {}


def training_args_for(config: LSTConfig, base_args: dict[str, Any] | None = None,
                      patching: dict[str, Any] | None = None) -> dict[str, Any]:
    """`lst-train` flags (as saved in a checkpoint) for an LST model `config`.

    `base_args` (the flags of the run that trained it) are kept with their model flags set to
    `config`'s; without them, the `patching` flags (default: static) fill the data flags the
    model builder and the evaluation tools' patcher read.
    """
    from megatron_lst.training.model_flags import flag_values

    args = dict(base_args or patching or {"patching_mode": "static"})
    args.update(flag_values(config))
    return args


def load_dist_checkpoint(path: Path, model, vocab: JointVocab | None = None) -> None:
    """Collective: load the model tensors of the dist checkpoint at `path` into `model`
    (any layout; resharded on load). Refuses a damaged or crafted checkpoint before reading
    it (`integrity.verify_checkpoint`); refuses, naming the tensor, a tensor missing from the
    checkpoint, one of another shape, or (for a model holding every layer) a checkpoint tensor
    the model does not have; and another vocabulary (`VocabularyError`)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_lst.training.checkpoint_load import verify_or_point_elsewhere
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(path)
    if vocab is not None and metadata.get("vocab") is not None:
        vocab.check_same(JointVocab.from_dict(metadata["vocab"]), f"dist checkpoint {path}")
    verify_or_point_elsewhere(Path(path))
    saved = saved_tensors_metadata(path)
    # Checked on a copy with factories built (fused SwiGLU fc1 is saved as its halves);
    # `load` builds and merges the factories of its own copy.
    built = model.sharded_state_dict()
    apply_factories(built)
    expected = set()
    for tensor in nested_values(built):
        if not isinstance(tensor, ShardedTensor):
            continue
        expected.add(tensor.key)
        if tensor.key not in saved:
            raise CheckpointContentError(
                f"dist checkpoint {path} has no tensor {tensor.key!r}, which the model needs")
        if tuple(saved[tensor.key].global_shape) != tuple(tensor.global_shape):
            raise CheckpointContentError(
                f"dist checkpoint {path}: tensor {tensor.key!r} has shape "
                f"{tuple(saved[tensor.key].global_shape)} but the model expects "
                f"{tuple(tensor.global_shape)}; build the model from the checkpoint's own flags")
    if model.pre_process and model.post_process:
        unexpected = sorted(k for k in saved if k not in expected and not k.startswith(NON_MODEL_PREFIXES))
        if unexpected:
            raise CheckpointContentError(
                f"dist checkpoint {path} holds tensor(s) the model does not have: {unexpected[:5]}")
    loaded = mcore_load.load_sharded({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)


def saved_dtypes(path: Path, model) -> dict[str, torch.dtype]:
    """The dtype in which the dist checkpoint at `path` holds each tensor of the TP=1/PP=1
    `model` (canonical names, `model_state.full_state_dict`'s); call after
    `load_dist_checkpoint` found every tensor of the model there."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_lst.models.canonical_sharding import canonical_name

    saved = saved_tensors_metadata(path)
    built = model.sharded_state_dict()
    apply_factories(built)  # fused SwiGLU fc1: its halves, saved under one key
    dtypes = {}
    for key, value in built.items():
        parts = [t for t in nested_values([value]) if isinstance(t, ShardedTensor)]
        if parts:
            dtypes[canonical_name(model, key)[0]] = saved[parts[0].key].dtype
    return dtypes


def save_dist_checkpoint(save_dir: Path, model, training_args: dict[str, Any],
                         vocab: JointVocab | None, iteration: int = 0) -> Path:
    """Collective: write `model` as checkpoint `iteration` under `save_dir` in the training
    layout (weights only: no optimizer, scheduler or data position). Resume training from it
    with `--load save_dir --finetune` (or `--no-load-optim --no-load-rng`)."""
    from megatron_lst.training.checkpoint_save import save_checkpoint

    if vocab is not None and vocab.size != model.lst_config.vocab_size:
        raise VocabularyError(
            f"vocabulary of {vocab.size} ids does not fit the model's {model.lst_config.vocab_size} "
            "(token_encoder.embedding.weight, output_layer.weight)")
    return save_checkpoint(iteration, [model], None, None, argparse.Namespace(**training_args),
                           {}, save_dir, vocab)
