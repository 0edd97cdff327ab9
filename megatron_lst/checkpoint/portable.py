"""The portable checkpoint users share: one safetensors file plus a config JSON, in a directory.

    <dir>/model.safetensors   every tensor once, unsharded, under full-state-dict names
                              (`model_state.py`), each in the dtype of the checkpoint
                              it was converted from (bf16 stays bf16)
    <dir>/lst_config.json     {"format": "lst-portable", "format_version": 1,
                               "lst_config": LSTConfig fields, "vocab": JointVocab layout or null,
                               "training_args": the lst-train flags of the run or null,
                               "reference_model_args": the reference's model args or null,
                               "source": where the weights came from}

Independent of any parallel layout: load it under TP=c/PP=d with `load_full_state_dict`, or
convert it to a megatron dist checkpoint (`dist.py`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lst.models.config import LSTConfig
from megatron_lst.tokenizer.vocab import JointVocab

from .errors import mistyped_fields
from .model_state import CheckpointContentError, lst_config_from_dict, lst_config_to_dict
from .record_files import read_record_file

WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "lst_config.json"
FORMAT = "lst-portable"
FORMAT_VERSION = 1


@dataclass
class PortableCheckpoint:
    config: LSTConfig
    state: dict[str, torch.Tensor]
    """Full state dict (`model_state.full_state_dict` names)."""
    vocab: JointVocab | None = None
    training_args: dict[str, Any] | None = None
    """The `lst-train` flags of the run that trained it (from a dist checkpoint), if known; for
    an imported reference model, the patching flags of its data (`convert.reference_patching`)."""
    reference_model_args: dict[str, Any] | None = None
    """The reference's model arguments, when imported from the reference implementation."""
    source: str = ""

    def __post_init__(self):
        if self.vocab is not None and self.vocab.size != self.config.vocab_size:
            raise CheckpointContentError(
                f"vocabulary of {self.vocab.size} ids does not fit the model's vocab_size "
                f"{self.config.vocab_size} (tensors token_encoder.embedding.weight, "
                "output_layer.weight)")


def save_portable(directory: str | Path, checkpoint: PortableCheckpoint) -> Path:
    """Write `checkpoint` into `directory` (created; existing files there are replaced)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in checkpoint.state.items()},
              str(directory / WEIGHTS_FILENAME), metadata={"format": FORMAT})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lst_config": lst_config_to_dict(checkpoint.config),
        "vocab": checkpoint.vocab.to_dict() if checkpoint.vocab is not None else None,
        "training_args": checkpoint.training_args,
        "reference_model_args": checkpoint.reference_model_args,
        "source": checkpoint.source,
    }
    (directory / CONFIG_FILENAME).write_text(json.dumps(metadata, indent=1) + "\n")
    # safetensors writes through a private temporary file (mode 0600): the weights take the
    # mode any new file gets here (the config's), so whoever may read one may read the other.
    shutil.copymode(directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME)
    return directory


def load_portable(directory: str | Path, vocab: JointVocab | None = None) -> PortableCheckpoint:
    """Read a portable checkpoint. With `vocab`, refuse one made with another vocabulary
    (`VocabularyError`). Tensors are checked against the model when loaded into one."""
    from safetensors import safe_open

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
    metadata = _read_config(config_path)
    try:
        config = lst_config_from_dict(metadata["lst_config"])
    except CheckpointContentError as error:  # it names the field, not the file
        raise CheckpointContentError(
            f"{config_path}: 'lst_config' does not describe a model ({error}); the config is "
            f"damaged or was not written by lst-convert: convert the checkpoint again") from None
    try:
        stored_vocab = JointVocab.from_dict(metadata["vocab"]) if metadata["vocab"] else None
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointContentError(
            f"{config_path}: 'vocab' is not a joint vocabulary layout ({error!r})") from None
    if stored_vocab is not None and stored_vocab.size != config.vocab_size:
        raise CheckpointContentError(
            f"{config_path}: 'vocab' has {stored_vocab.size} ids but 'lst_config' a vocab_size "
            f"of {config.vocab_size} (tensors token_encoder.embedding.weight, "
            f"output_layer.weight); the config is damaged or was edited: convert the checkpoint "
            f"again")
    if vocab is not None:
        vocab.check_matches(config.vocab_size, f"portable checkpoint {directory}")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            state = {name: weights.get_tensor(name) for name in weights.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError for a corrupt file
        raise CheckpointContentError(f"cannot read {weights_path}: {error}") from None
    return PortableCheckpoint(
        config=config, state=state, vocab=stored_vocab,
        training_args=metadata.get("training_args"),
        reference_model_args=metadata.get("reference_model_args"),
        source=metadata.get("source", ""),
    )


# The fields of lst_config.json that loading reads, and their JSON types.
_CONFIG_FIELDS = {"lst_config": dict, "vocab": (dict, type(None)),
                  "training_args": (dict, type(None)), "reference_model_args": (dict, type(None)),
                  "source": str}


def _read_config(config_path: Path) -> dict[str, Any]:
    """The `lst_config.json` at `config_path`, refused naming the fault when it is not one (nor
    a regular file of at most `MAX_RECORD_FILE_BYTES`: `record_files.read_record_file`)."""
    data = read_record_file(config_path, CheckpointContentError, "portable checkpoint config")
    try:
        metadata = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: JSON and UTF-8
        # decoding; RecursionError: nested deeper than the parser recurses (a crafted file)
        raise CheckpointContentError(f"cannot read {config_path}: {error}") from None
    if not isinstance(metadata, dict):
        raise CheckpointContentError(f"{config_path} holds a JSON {type(metadata).__name__}, not "
                                     f"an {FORMAT} config object")
    version = metadata.get("format_version")  # true and 1.0 equal 1, yet no writer wrote them
    if metadata.get("format") != FORMAT or type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointContentError(
            f"{config_path} is not an {FORMAT} v{FORMAT_VERSION} config (format "
            f"{metadata.get('format')!r} v{metadata.get('format_version')!r})")
    unknown = sorted(set(metadata) - {"format", "format_version", *_CONFIG_FIELDS})
    if unknown:  # a misspelt field would otherwise read as absent
        raise CheckpointContentError(
            f"{config_path}: unknown field(s) {unknown}; {FORMAT} v{FORMAT_VERSION} holds "
            f"{sorted(_CONFIG_FIELDS)} besides format and format_version")
    metadata.setdefault("vocab", None)  # optional fields: absent means unknown
    metadata.setdefault("training_args", None)
    metadata.setdefault("reference_model_args", None)
    metadata.setdefault("source", "")
    wrong = mistyped_fields(metadata, _CONFIG_FIELDS)
    if wrong:
        raise CheckpointContentError(
            f"{config_path}: field(s) {', '.join(wrong)} are not what {FORMAT} v{FORMAT_VERSION} "
            f"holds; the config is damaged or was not written by lst-convert")
    _check_training_args(metadata["training_args"], config_path)
    return metadata


def _check_training_args(training_args: dict[str, Any] | None, config_path: Path) -> None:
    """Refuse flags of a value their `lst-train` flag cannot give: a dist checkpoint written from
    the portable one keeps them, and `lst-eval` refused that checkpoint as damaged."""
    from megatron_lst.training.arguments import build_parser

    from .saved_flags import saved_flags_problem

    problem = saved_flags_problem(training_args or {}, build_parser())
    if problem is not None:
        raise CheckpointContentError(
            f"{config_path}: 'training_args': {problem}; the config is damaged or was edited: "
            f"correct that flag, or remove it to take lst-train's default")
