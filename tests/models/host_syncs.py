"""Counting the places where the project's code reads a tensor back to the host.

On CUDA each of these waits for the GPU to finish everything queued before it: `item`,
`tolist`, `bool()` / `int()` / `float()` of a tensor, `nonzero`, `cpu`, `numpy`, `unique`,
`masked_select`, and `repeat_interleave` with tensor repeats but no `output_size`. On CPU they
cost nothing, which is why a test counts them: `record_host_syncs` patches them while its block
runs and records each call made from a file under `megatron_lst/` or `kernels/` (or the
`lst_kernels/` it is installed as; calls made inside torch, megatron or the tests are not the
project's hot path and are left out). `count_aten_ops` counts the aten operators a block
dispatches, for tests that a copy or a slow indexing path does not come back.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PROJECT_DIRS = ("megatron_lst", "kernels", "lst_kernels")
_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu",
                   "numpy", "unique", "masked_select")
_TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select")


def project_file(filename: str) -> str | None:
    """`filename` relative to its project directory, as sites are recorded (`kernels/ranges.py`
    in a checkout, `lst_kernels/ranges.py` where the kernels are installed under that name);
    None outside the project."""
    path = Path(filename)
    for i, part in enumerate(path.parts[:-1]):
        if part in PROJECT_DIRS:
            return "/".join(path.parts[i:])
    return None


def _caller_site() -> tuple[str, int] | None:
    """(file relative to its project directory, line) of the first frame outside this module,
    when that frame is the project's code; else None."""
    frame = sys._getframe(2)
    file = project_file(frame.f_code.co_filename)
    return None if file is None else (file, frame.f_lineno)


@contextlib.contextmanager
def record_host_syncs():
    """Yields a Counter of `(file, line, operation)` -> calls, filled while the block runs."""
    counts: Counter = Counter()
    patched = []

    def counting(owner, name, original, label):
        def wrapper(*args, **kwargs):
            site = _caller_site()
            if site is not None:
                counts[(*site, label)] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in _TENSOR_METHODS:
        original = getattr(torch.Tensor, name)
        patched.append((torch.Tensor, name, original))
        setattr(torch.Tensor, name, counting(torch.Tensor, name, original, f"Tensor.{name}"))
    for name in _TORCH_FUNCTIONS:
        original = getattr(torch, name)
        patched.append((torch, name, original))
        setattr(torch, name, counting(torch, name, original, f"torch.{name}"))
    repeat_interleave = torch.Tensor.repeat_interleave
    patched.append((torch.Tensor, "repeat_interleave", repeat_interleave))

    def counting_repeat_interleave(self, repeats, *args, **kwargs):
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            site = _caller_site()
            if site is not None:
                counts[(*site, "repeat_interleave")] += 1
        return repeat_interleave(self, repeats, *args, **kwargs)

    torch.Tensor.repeat_interleave = counting_repeat_interleave
    try:
        yield counts
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def syncs_in(counts: Counter, *files: str) -> int:
    """How many recorded reads came from `files` (paths as recorded, e.g.
    "megatron_lst/models/local_attention.py")."""
    return sum(n for (file, _, _), n in counts.items() if file in files)


class _CountAtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_aten_ops():
    """Yields a Counter of aten operator (`torch.ops.aten.<op>.<overload>`) -> calls, filled
    while the block runs."""
    with _CountAtenOps() as mode:
        yield mode.ops
