"""The parts of the reference's `params.json` beyond its model args that its loader reads.

The reference loads a consolidated checkpoint directory (`lst/generate.py`,
`load_consolidated_model_and_tokenizer`) by validating the whole `params.json` as its `TrainArgs`,
whose unset sections take defaults, and then:

- builds the tokenizer from `data.tokenizer_args` (`{"name": ..., "init_kwargs": {...}}`; unset:
  the byte tokenizer "bytes", which does not read LST ids). LST's is "lst": SentencePiece text
  pieces (`bpe_tokenizer_path`), then 4 reserved ids, the text and speech markers and
  `speech_vocab_size_unit` units (default 502): our `JointVocab` layout;
- casts every weight to `distributed.model_dtype` ("fp32", "bf16" or "fp16"; unset: "bf16").

The export writes both (`export_sections`); the import reads the tokenizer back
(`imported_tokenizer`), so the SentencePiece model and the unit count survive a round trip.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_lst.models.reference_config import ReferenceImportError
from megatron_lst.tokenizer.vocab import JointVocab

REFERENCE_TOKENIZER = "lst"
# OmegaConf's "value still to be given", as the reference's template configs spell the path.
MISSING_VALUE = "???"
REFERENCE_MODEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def reference_model_dtype(state: dict[str, torch.Tensor]) -> str:
    """The reference's `distributed.model_dtype` for a state dict: the dtype its tensors are
    stored in, so the reference runs the weights as written. Refuses a dtype it has no name for,
    or several dtypes."""
    dtypes = sorted({str(tensor.dtype) for tensor in state.values()})
    dtype = next(iter(state.values())).dtype
    if len(dtypes) != 1 or dtype not in REFERENCE_MODEL_DTYPES:
        raise ReferenceImportError(
            f"the checkpoint's tensors are {', '.join(dtypes)}; the reference runs one dtype of "
            f"{', '.join(REFERENCE_MODEL_DTYPES.values())} (its distributed.model_dtype): "
            "convert the weights to one of float32, bfloat16 or float16 first")
    return REFERENCE_MODEL_DTYPES[dtype]


def reference_tokenizer_args(tokenizer_model: str | None, vocab: JointVocab | None) -> dict[str, Any]:
    """The reference's `data.tokenizer_args` for our vocabulary: its "lst" tokenizer with the
    SentencePiece model `tokenizer_model` (left out when unknown: the reference then refuses to
    build the tokenizer, naming `bpe_tokenizer_path`) and the vocabulary's speech units."""
    init_kwargs: dict[str, Any] = {}
    if tokenizer_model is not None:
        init_kwargs["bpe_tokenizer_path"] = str(tokenizer_model)
    if vocab is not None:
        init_kwargs["speech_vocab_size_unit"] = vocab.num_units
    return {"name": REFERENCE_TOKENIZER, "init_kwargs": init_kwargs}


def export_sections(state: dict[str, torch.Tensor], tokenizer_model: str | None,
                    vocab: JointVocab | None) -> dict[str, dict[str, Any]]:
    """`{"data": {"tokenizer_args": ...}, "distributed": {"model_dtype": ...}}` for the exported
    reference state dict `state`."""
    return {"data": {"tokenizer_args": reference_tokenizer_args(tokenizer_model, vocab)},
            "distributed": {"model_dtype": reference_model_dtype(state)}}


def check_lst_tokenizer(tokenizer_args: dict[str, Any] | None, source: object) -> None:
    """Refuse a reference run's `data.tokenizer_args` (in the file `source`) naming another
    tokenizer than "lst" (left out: the reference's default, "bytes"): its token ids are bytes,
    BPE or SentencePiece pieces of no joint vocabulary, so no vocabulary here reads them. None
    (the file gives no tokenizer args) is left to the default speech units."""
    if tokenizer_args is None or tokenizer_args.get("name", "bytes") == REFERENCE_TOKENIZER:
        return
    name = tokenizer_args.get("name", "bytes")
    given = "" if "name" in tokenizer_args else " (the reference default, left out)"
    raise ReferenceImportError(
        f"{source}: data.tokenizer_args name {name!r}{given} is not the reference's LST "
        f"tokenizer {REFERENCE_TOKENIZER!r} (SentencePiece text pieces, reserved ids, the text "
        f"and speech markers, then the speech units): the model's token ids mean other tokens "
        f"than any vocabulary here reads, so it is not imported (if the run did tokenize with "
        f"the LST tokenizer, give its name {REFERENCE_TOKENIZER!r} in a copy of the file)")


def imported_tokenizer(tokenizer_args: dict[str, Any] | None) -> tuple[str | None, int | None]:
    """`(SentencePiece model path, speech units)` of a reference run's `data.tokenizer_args`,
    each None where it gives none: another tokenizer than "lst", a path still to be given
    ("???") or a value of another type."""
    if not tokenizer_args or tokenizer_args.get("name") != REFERENCE_TOKENIZER:
        return None, None
    kwargs = tokenizer_args.get("init_kwargs")
    if not isinstance(kwargs, dict):
        return None, None
    path = kwargs.get("bpe_tokenizer_path")
    units = kwargs.get("speech_vocab_size_unit")
    if not isinstance(path, str) or not path or path == MISSING_VALUE:
        path = None
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        units = None
    return path, units
