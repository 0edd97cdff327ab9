"""The full (unsharded) state of an `LSTModel` and the `LSTConfig` that describes it.

A full state dict holds every tensor of the model once, under the names of a TP=1/PP=1
`LSTModel` built with megatron's local spec (`megatron_lst.models.canonical_sharding` calls these
"canonical"): `token_encoder.*`, `patch_encoder.*`, `global_input_projection.weight` (only when
`k * De != Dg`), `global_transformer.block.layers.{i}.*` (global layer numbers), `local_decoder.*`
and `output_layer.weight`. The last pipeline stage's encoder replica has no names of its own: it
is filled from the same `token_encoder.*` tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

import torch

from megatron_lst.models.canonical_sharding import canonical_name, shard_tensor
from megatron_lst.models.config import (
    CrossAttentionConfig,
    DocumentMaskingConfig,
    GlobalModelConfig,
    LocalModelConfig,
    LSTConfig,
    ModelConfigError,
)


class CheckpointContentError(ValueError):
    """A checkpoint's tensors or config do not fit the model: the message names the tensor."""


def lst_config_to_dict(config: LSTConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# Fields a record may leave out, with the value that means: `documents` did not exist before
# document masking, and those models trained across EOS; the head shapes (`num_query_groups` of
# the local models, `kv_channels`) did not exist before grouped-query local attention and explicit
# head sizes, and those models had one key/value head per query head of `hidden / heads`; the
# cross-attention and global switches of `documents` did not exist before they could be turned
# off, and every attention was reset.
_FIELDS_OF_OLDER_RECORDS = {LSTConfig: {"documents": None},
                            DocumentMaskingConfig: {"reset_cross_attention": True,
                                                    "reset_global_attention": True},
                            LocalModelConfig: {"num_query_groups": None, "kv_channels": None},
                            GlobalModelConfig: {"kv_channels": None}}


def lst_config_from_dict(data: dict[str, Any]) -> LSTConfig:
    """Inverse of `lst_config_to_dict`. Unknown fields, missing fields (but those of
    `_FIELDS_OF_OLDER_RECORDS`, absent from records written before they existed) and values of
    another type are errors that name the field, never defaults."""
    if not isinstance(data, dict):
        raise CheckpointContentError(f"lst_config: a JSON {type(data).__name__}, not the fields "
                                     "of LSTConfig")
    parts = {"global_model": GlobalModelConfig, "encoder": LocalModelConfig,
             "decoder": LocalModelConfig, "cross_attention": CrossAttentionConfig,
             "documents": DocumentMaskingConfig}
    fields = {}
    for name, value in data.items():
        kind = parts.get(name)
        # documents: None for rows that are one sequence; every other part is required.
        fields[name] = value if kind is None or (value is None and name == "documents") \
            else _dataclass_from_dict(kind, value, name)
    return _dataclass_from_dict(LSTConfig, fields, "lst_config")


def _dataclass_from_dict(kind: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise CheckpointContentError(f"{where}: a JSON {type(data).__name__}, not the fields of "
                                     f"{kind.__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointContentError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    data = {**_FIELDS_OF_OLDER_RECORDS.get(kind, {}), **data}
    missing = sorted(names - set(data))
    if missing:
        raise CheckpointContentError(
            f"{where}: missing field(s) {missing}; a saved {kind.__name__} records every field "
            "(the config is damaged or was not written by this package)")
    hints = typing.get_type_hints(kind)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise CheckpointContentError(
                f"{where}: field {name!r} is {value!r} ({type(value).__name__}), not "
                f"{_describe(hints[name])}; the config is damaged")
    try:
        return kind(**data)
    except (TypeError, ModelConfigError) as error:  # ModelConfigError: sizes that do not fit
        raise CheckpointContentError(f"{where}: {error}") from None


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value is of a config field's type (a bool is no number here, an integer
    is a float)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if isinstance(value, bool):
        return annotation is bool
    if annotation is float:
        return isinstance(value, int | float)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(annotation))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


def build_full_model(config: LSTConfig):
    """A TP=1/PP=1 `LSTModel` on CPU in fp32 with the portable spec (megatron's local layers,
    SDPA local attention, PyTorch kernels). Call after `initialize_parallel()`."""
    from megatron_lst.models.lst_model import LSTModel

    return LSTModel(config, config.transformer_config(), transformer_impl="local",
                    local_attention_backend="sdpa", kernel_backend="torch")


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every tensor of a TP=1/PP=1 `LSTModel`, detached and contiguous, in canonical names."""
    if not (model.pre_process and model.post_process) or model.config.tensor_model_parallel_size != 1:
        raise ValueError("full_state_dict needs a TP=1/PP=1 model; build one with build_full_model")
    return {name: tensor.detach().contiguous()
            for name, tensor in _canonical_tensors(model, keep_vars=False).items()}


def _canonical_tensors(model, keep_vars: bool) -> dict[str, torch.Tensor]:
    """`model.state_dict(keep_vars=...)` in canonical names, without megatron's extra states."""
    return {canonical_name(model, key)[0]: tensor
            for key, tensor in model.state_dict(keep_vars=keep_vars).items()
            if not key.endswith("_extra_state")}


@contextlib.contextmanager
def weights_as(model, dtypes: dict[str, torch.dtype]) -> Iterator[None]:
    """Within the block, each tensor of a TP=1/PP=1 `model` in `dtypes[its canonical name]`
    (cast in place), and in its own dtype again after. Exact both ways for the weights of a
    checkpoint held in a narrower dtype (bf16 in an fp32 model): a save in the block writes
    them as that checkpoint held them."""
    tensors = _canonical_tensors(model, keep_vars=True)
    own = {name: tensor.dtype for name, tensor in tensors.items()}
    try:
        for name, tensor in tensors.items():
            tensor.data = tensor.data.to(dtypes[name])
        yield
    finally:
        for name, tensor in tensors.items():
            tensor.data = tensor.data.to(own[name])


def _full_shape(local_shape: torch.Size, partition: str, tp: int) -> tuple[int, ...]:
    if partition in ("rows", "gated_rows"):
        return (local_shape[0] * tp, *local_shape[1:])
    if partition == "columns":
        return (local_shape[0], local_shape[1] * tp)
    return tuple(local_shape)


def load_full_state_dict(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load full tensors into `model` (any tensor-parallel rank and pipeline stage).

    Refuses, naming the tensor and `source`, a missing tensor, a tensor of the wrong shape or
    of integers or booleans for a floating-point weight (any float dtype is cast) and,
    for a model holding every layer (PP=1), a tensor the model does not have.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sharded, expected = {}, set()
    for key, target in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        name, partition = canonical_name(model, key)
        expected.add(name)
        if name not in state:
            raise CheckpointContentError(
                f"{source} has no tensor {name!r}, which the model needs; was it written for "
                "another architecture (see its config)?")
        full = state[name]
        want = _full_shape(target.shape, partition, tp)
        if tuple(full.shape) != want:
            raise CheckpointContentError(
                f"{source}: tensor {name!r} has shape {tuple(full.shape)} but the model expects "
                f"{want}; build the model from the checkpoint's own config"
                + (" (another vocabulary?)" if name in VOCAB_TENSORS else ""))
        if full.is_floating_point() != target.is_floating_point():  # .to() would cast silently
            raise CheckpointContentError(
                f"{source}: tensor {name!r} holds {full.dtype} but the model's is "
                f"{target.dtype}; the file was not written from this model's weights")
        sharded[key] = shard_tensor(full, partition, tp_rank, tp).to(target.dtype)
    if model.pre_process and model.post_process:
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise CheckpointContentError(
                f"{source} holds tensor(s) the model does not have: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}; was it written for another architecture?")
    model.load_state_dict(sharded, strict=False)


VOCAB_TENSORS = ("token_encoder.embedding.weight", "output_layer.weight")


# The floating-point dtypes a checkpoint's weights may have: the model's (fp32), the narrower
# ones it trains in (bf16, fp16) and fp64, each cast exactly where it must be. torch neither
# compares nor checks for NaN the 8-bit floats (float8_e4m3fn, ...), a quantized form.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_weight_dtypes(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, naming `source` and the first such tensor, a full state dict holding a
    floating-point tensor of a dtype outside `WEIGHT_DTYPES` (the conversions failed on it with
    a traceback from torch). Integer tensors are refused by name when loaded."""
    for name, tensor in sorted(state.items()):
        if tensor.is_floating_point() and tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointContentError(
                f"{source}: tensor {name!r} holds {tensor.dtype}, which no conversion here "
                f"reads (weights are float32, bfloat16, float16 or float64); save the weights "
                f"in one of those, e.g. cast to bfloat16")


def check_finite_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, naming `source` and the tensor, a full state dict holding a NaN or inf: the run
    that wrote it had diverged (training never saves such weights), and every logit of a model
    built from it would be NaN, so a conversion's check could only fail, blaming the
    conversion."""
    for name, tensor in sorted(state.items()):
        if not tensor.is_floating_point():
            continue  # integer tensors are refused by name when loaded
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointContentError(
                f"{source}: tensor {name!r} holds {bad} NaN or inf value(s) of {tensor.numel()}; "
                "the run that wrote it had diverged: convert a checkpoint saved before that")

