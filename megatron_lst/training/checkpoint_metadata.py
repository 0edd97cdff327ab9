"""Reading a checkpoint's `lst_checkpoint.json` (`checkpointing.METADATA_FILENAME`), refusing,
naming the field, one that is not what a save writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megatron_lst.checkpoint.errors import CheckpointError, mistyped_fields
from megatron_lst.checkpoint.record_files import read_record_file
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training.checkpoint_discovery import other_complete_checkpoints
from megatron_lst.training.checkpointing import FORMAT_VERSION, METADATA_FILENAME
from megatron_lst.training.flops import FlopBreakdown

# The fields of lst_checkpoint.json that loading reads, and their JSON types.
_TRAINING_METADATA_FIELDS = {
    "iteration": int, "extra_state": dict, "scheduler": (dict, type(None)),
    "sharded_state_metadata": dict, "parallel_layout": dict, "vocab": (dict, type(None)),
    "args": dict,
}


def read_checkpoint_metadata(path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """The `lst_checkpoint.json` of one checkpoint directory: a regular file of at most
    `MAX_RECORD_FILE_BYTES` (`record_files.read_record_file`) holding a JSON object of this
    format version and, when `strict`, with every field a save writes
    (`check_training_metadata`)."""
    metadata_path = Path(path) / METADATA_FILENAME
    data = read_record_file(metadata_path, CheckpointError, "checkpoint metadata file")
    try:
        metadata = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # ValueError: JSON, UTF-8
        raise CheckpointError(f"cannot read {metadata_path}: {err}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{metadata_path} holds a JSON {type(metadata).__name__}, not the "
                              f"checkpoint's metadata object; the checkpoint is corrupt")
    version = metadata.get("format_version")  # true and 1.0 equal 1, yet no save writes them
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{metadata_path} has format version {version!r}; this "
            f"code reads version {FORMAT_VERSION}"
        )
    if strict:
        check_training_metadata(metadata, Path(path))
    return metadata


def check_training_metadata(metadata: dict[str, Any], path: Path) -> None:
    """Refuse, naming the field, a `lst_checkpoint.json` without a field `save_checkpoint`
    writes, or with one of another type, a vocabulary that is not a joint vocabulary layout, or
    a model record that is not an object (the file is written after the manifest, so no digest
    covers it)."""
    from megatron_lst.checkpoint.model_config import MODEL_KEY

    wrong = mistyped_fields(metadata, _TRAINING_METADATA_FIELDS) + _mistyped_position(metadata)
    if isinstance(metadata.get("vocab"), dict):
        try:
            JointVocab.from_dict(metadata["vocab"])
        except VocabularyError as error:
            wrong.append(f"'vocab' ({error})")
    if metadata.get(MODEL_KEY) is not None and not isinstance(metadata[MODEL_KEY], dict):
        wrong.append(f"{MODEL_KEY!r} ({type(metadata[MODEL_KEY]).__name__})")
    if wrong:
        others = other_complete_checkpoints(path)
        raise CheckpointError(
            f"{path / METADATA_FILENAME} is damaged: field(s) {', '.join(wrong)} are not what a "
            f"save writes. Restore the file from a copy, or load another checkpoint of "
            f"{path.parent} (complete ones: {others or 'none'}) with --ckpt-step N")


# The training position in `extra_state` that a resume reads as numbers (`loop._restore`): the
# counts, and the model FLOPs by part (`FlopBreakdown.as_dict`'s names).
_EXTRA_STATE_COUNTS = ("consumed_samples", "tokens")
_FLOP_PARTS = tuple(name for name in FlopBreakdown().as_dict() if name != "total")


def _mistyped_position(metadata: dict[str, Any]) -> list[str]:
    """`"'name' (value)"` for each number of the training position that is not what a save
    writes: an iteration or a count of `extra_state` that is no non-negative integer ("abc"
    was a ValueError in the resume, Infinity an OverflowError, 2.5 and true read as 2 and 1),
    and `extra_state.flops` that is no object of a finite number per model part (a part
    missing was a KeyError). Fields absent from older checkpoints may be absent."""
    def count(value: Any) -> bool:
        return type(value) is int and value >= 0

    wrong = []
    if "iteration" in metadata and isinstance(metadata["iteration"], int) \
            and not count(metadata["iteration"]):
        wrong.append(f"'iteration' ({metadata['iteration']!r})")
    extra = metadata.get("extra_state")
    if not isinstance(extra, dict):
        return wrong  # named by mistyped_fields
    wrong += [f"'extra_state.{name}' ({extra[name]!r})" for name in _EXTRA_STATE_COUNTS
              if name in extra and not count(extra[name])]
    flops = extra.get("flops", {part: 0 for part in _FLOP_PARTS})
    if not (isinstance(flops, dict) and all(
            type(flops.get(part)) in (int, float) and math.isfinite(flops[part])
            for part in _FLOP_PARTS)):
        wrong.append(f"'extra_state.flops' ({flops!r:.80})")
    return wrong


def holds_weights_only(metadata: dict[str, Any]) -> bool:
    """Whether the checkpoint of `metadata` (its `lst_checkpoint.json`) was saved without an
    optimizer, as `lst-convert portable-to-dist` saves: no schedule and no training position.
    A training run saves both with every checkpoint."""
    return metadata["scheduler"] is None and "consumed_samples" not in metadata["extra_state"]
