"""Megatron dist checkpoints (`training/checkpointing.py` layout) <-> full state dicts.

megatron.core stores every tensor in model space (global shape, this rank's slice), so a dist
checkpoint has no layout of its own: one written by a TP=1/PP=1 model in one process loads under
TP=c/PP=d, and one written under TP=a/PP=b loads into a TP=1/PP=1 model, resharded on load.
Conversions here therefore run in a single process; the training loop's `--load` reshards to the
run's layout (optimizer state included); `LSTModel.sharded_state_dict` keeps the vocab-parallel
token embedding and the pipeline encoder replica right under TP>1 and PP>1.

The model's shape is read back from the checkpoint's saved `lst-train` flags (`args` in its
`lst_checkpoint.json`) and vocabulary, exactly as training built it (`lst_config_from_args`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from megatron_lst.models.config import LSTConfig
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

from .model_state import CheckpointContentError

# Keys of a training checkpoint that are not model tensors.
_NON_MODEL_PREFIXES = ("optimizer.", "rng_state")


def resolve_checkpoint(path: str | Path) -> Path:
    """An `iter_XXXXXXX` directory, or the newest complete one under a `--save` directory."""
    from megatron_lst.training.checkpointing import METADATA_FILENAME, find_latest_checkpoint

    path = Path(path)
    if (path / METADATA_FILENAME).is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointContentError(f"{path} holds no complete dist checkpoint")
    return latest


def checkpoint_model(path: Path) -> tuple[LSTConfig, JointVocab, dict[str, Any]]:
    """`(LSTConfig, vocabulary, saved lst-train flags)` of the dist checkpoint at `path`."""
    from megatron_lst.training.checkpointing import read_checkpoint_metadata
    from megatron_lst.training.model_provider import lst_config_from_args

    metadata = read_checkpoint_metadata(path)
    args = metadata.get("args") or {}
    if args.get("patching_mode", "none") == "none":
        raise CheckpointContentError(
            f"{path} holds a token-baseline model (--patching-mode none); only LST models convert")
    if metadata.get("vocab") is None:
        raise CheckpointContentError(
            f"{path} records no vocabulary, so its embedding size is unknown; it was not written "
            "by lst-train or lst-convert")
    vocab = JointVocab.from_dict(metadata["vocab"])
    return lst_config_from_args(argparse.Namespace(**args), vocab.size, vocab.eos_id), vocab, args


def training_args_for(config: LSTConfig, base_args: dict[str, Any] | None = None,
                      patching_mode: str = "static") -> dict[str, Any]:
    """`lst-train` flags (as saved in a checkpoint) that build `config`.

    `base_args` (the flags of the run that trained it) are kept and their model flags checked;
    without them, the model flags are derived and `patching_mode` fills the one data flag the
    model builder reads. Raises when the flags cannot express `config`.
    """
    from megatron_lst.training.model_provider import lst_config_from_args

    g, enc, dec, xattn = config.global_model, config.encoder, config.decoder, config.cross_attention
    args = dict(base_args or {"patching_mode": patching_mode})
    if base_args is None:
        args.update(
            num_layers=g.num_layers, hidden_size=g.hidden_size, num_attention_heads=g.num_heads,
            ffn_hidden_size=g.ffn_hidden_size, num_query_groups=g.num_query_groups,
            local_encoder_hidden_size=enc.hidden_size, local_encoder_layers=enc.num_layers,
            local_encoder_heads=enc.num_heads,
            local_decoder_hidden_size=dec.hidden_size, local_decoder_layers=dec.num_layers,
            local_decoder_heads=dec.num_heads,
            local_attention_window=enc.window,
            cross_attn_k=xattn.slots_per_patch, cross_attn_heads=xattn.num_heads,
            cross_attn_window_encoder=xattn.encoder_window,
            cross_attn_window_decoder=xattn.decoder_window,
            norm_epsilon=config.norm_eps, rotary_base=int(config.rope_theta),
            max_tokens=config.max_sequence_length, init_method_std=config.init_std,
            reset_attention_mask=config.documents is not None and config.documents.reset_attention_mask,
            reset_position_ids=config.documents is not None and config.documents.reset_position_ids,
        )
    eos_id = None if config.documents is None else config.documents.eos_id
    described = lst_config_from_args(argparse.Namespace(**args), config.vocab_size, eos_id)
    if described != config:
        raise CheckpointContentError(
            f"lst-train flags cannot describe this model (they give {described}, the model is "
            f"{config}); it can be shared in the portable form but not trained by lst-train")
    return args


def load_dist_checkpoint(path: Path, model, vocab: JointVocab | None = None) -> None:
    """Collective: load the model tensors of the dist checkpoint at `path` into `model`
    (any layout; resharded on load). Refuses, naming the tensor, a tensor missing from the
    checkpoint, one of another shape, or (for a model holding every layer) a checkpoint tensor
    the model does not have; and another vocabulary (`VocabularyError`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_lst.training.checkpointing import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(path)
    if vocab is not None and metadata.get("vocab") is not None:
        vocab.check_matches(metadata["vocab"]["size"], f"dist checkpoint {path}")
    saved = dist_checkpointing.load_tensors_metadata(str(path))
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
        unexpected = sorted(k for k in saved if k not in expected and not k.startswith(_NON_MODEL_PREFIXES))
        if unexpected:
            raise CheckpointContentError(
                f"dist checkpoint {path} holds tensor(s) the model does not have: {unexpected[:5]}")
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"], strict=True)


def save_dist_checkpoint(save_dir: Path, model, training_args: dict[str, Any],
                         vocab: JointVocab | None, iteration: int = 0) -> Path:
    """Collective: write `model` as checkpoint `iteration` under `save_dir` in the training
    layout (weights only: no optimizer, scheduler or data position). Resume training from it
    with `--load save_dir --finetune` (or `--no-load-optim --no-load-rng`)."""
    from megatron_lst.training.checkpointing import save_checkpoint

    if vocab is not None and vocab.size != model.lst_config.vocab_size:
        raise VocabularyError(
            f"vocabulary of {vocab.size} ids does not fit the model's {model.lst_config.vocab_size} "
            "(token_encoder.embedding.weight, output_layer.weight)")
    return save_checkpoint(iteration, [model], None, None, argparse.Namespace(**training_args),
                           {}, save_dir, vocab)
