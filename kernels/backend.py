"""Choosing between the Triton kernels and the PyTorch references.

`backend="auto"` picks Triton when the tensors live on CUDA and Triton is installed, else the
PyTorch reference. `"triton"` on CPU works only under the Triton interpreter
(`TRITON_INTERPRET=1`, set before Triton is first imported). The environment variable
`LST_KERNEL_BACKEND` overrides "auto" (never an explicit choice), which helps A/B runs without
code changes.
"""

import functools
import importlib.util
import os
import re
import sys

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "LST_KERNEL_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package is installed: found on the path, not imported here (a
    broken install fails at the first kernel call, with its own import error)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when the Triton kernels run in the CPU interpreter.

    Triton picks the interpreter when a kernel is defined, if TRITON_INTERPRET is true then (as
    Triton reads it: 1, y, yes, on, true). Once the kernels are defined, their choice holds: setting
    the variable later changes nothing (their compiled launch then fails on CPU tensors).
    """
    defined = sys.modules.get(f"{__package__}._triton_utils")
    if defined is not None:
        return defined.INTERPRETED
    return interpret_requested()


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "y", "yes", "on", "true")


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.4rc1" or "2.13.0+cpu"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a release number from version {version!r}")
    return int(match[1]), int(match[2])


@functools.cache
def interpreter_incompatibility() -> str | None:
    """Why the installed Triton interpreter cannot run these kernels, or None.

    Triton before 3.7 turns a loaded scalar into a Python int with `int()` on a one-element
    array, which NumPy 2.4 made an error: every kernel whose loop bounds are loaded from memory
    fails with "only 0-dimensional arrays can be converted to Python scalars". Compiled
    (CUDA) launches do not go through that code.
    """
    import numpy
    import triton

    triton_version, numpy_version = triton.__version__, numpy.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"the Triton {triton_version} interpreter cannot run these kernels with NumPy "
            f"{numpy_version} (it calls int() on one-element arrays, an error since NumPy 2.4; "
            "Triton 3.7 fixed it): install 'numpy<2.4' or 'triton>=3.7', or use backend='torch'"
        )
    return None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for a call on `tensors`; raise if the choice cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    chosen_by = f"backend={backend!r}"
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV_VAR}={backend!r} is not one of {BACKENDS}; unset it or fix it"
            )
        chosen_by = f"{BACKEND_ENV_VAR}={backend}"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{chosen_by} needs the `triton` package; install it or use backend='torch'"
            )
        if not on_cuda and not triton_interpreted():
            raise RuntimeError(
                f"{chosen_by} on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported; move the tensors to CUDA or use backend='torch'"
            )
        if not on_cuda and (why := interpreter_incompatibility()):
            raise RuntimeError(why)
    return backend
