"""The flags of a run as JSON: what a checkpoint (`args` of lst_checkpoint.json), W&B's run
config and the resume check (`resume_check`) record of them."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """`args` as a JSON-ready dict (for checkpoints and logs)."""
    return {k: _jsonable(v) for k, v in sorted(vars(args).items())}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
