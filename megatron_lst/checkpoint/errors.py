"""Errors of checkpoint loading and saving, shared by the trainer and the conversion tools."""

from collections.abc import Mapping
from typing import Any


class CheckpointError(RuntimeError):
    """A checkpoint directory that is corrupt, or that does not fit the model being trained."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's files are missing, truncated or changed since they were saved."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code, or build objects a checkpoint never holds, when
    unpickled; it was not written by this code (or was altered afterwards)."""


def mistyped_fields(record: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]]
                    ) -> list[str]:
    """`"'name' (missing)"` or `"'name' (<type>)"` for each of `fields` (name -> JSON types)
    that `record` (a checkpoint's JSON file) lacks or holds with another type."""
    return [f"{name!r} ({type(record[name]).__name__ if name in record else 'missing'})"
            for name, kinds in fields.items()
            if name not in record or not isinstance(record[name], kinds)]
