"""Imports of the optional `data` extra, failing with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'megatron-lst[data]'"
# Import names whose PyPI package is named otherwise.
_PACKAGE_OF_MODULE = {"sklearn": "scikit-learn", "espeakng_loader": "espeakng-loader"}


class MissingDependencyError(ImportError):
    """An optional dependency of the demo corpus is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = _PACKAGE_OF_MODULE.get(top, top)
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{package}', which is not installed; "
            f"install the data extra: {INSTALL_HINT}"
        ) from error
