"""Whether an optional accelerator package (flash-attn, Transformer Engine) can be used here.

Being installed is not enough: a wheel built for another torch, CUDA or Python is found by
`importlib.util.find_spec` and then fails to import (an `ImportError` "undefined symbol", an
`OSError` on a missing shared library). The "auto" choices ask `import_failure`, which imports
the package once per process and says why it cannot be used, so that they fall back to PyTorch
(saying so) instead of failing when the model is built or first runs.
"""

from __future__ import annotations

import functools
import importlib
import logging

logger = logging.getLogger(__name__)


@functools.cache
def import_failure(module: str, *names: str) -> str | None:
    """None when `module` imports and has the attributes `names`; else why it cannot be used:
    "not installed", or "installed but does not import (<error>)". Cached per process."""
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (module + ".").startswith(err.name + "."):  # it is absent
            return "not installed"  # the usual case: nothing to warn about
        reason = f"installed but does not import ({type(err).__name__}: {err})"
    except Exception as err:  # noqa: BLE001 - a broken build fails in many ways (OSError, ...)
        reason = f"installed but does not import ({type(err).__name__}: {err})"
    else:
        missing = [name for name in names if not hasattr(imported, name)]
        if not missing:
            return None
        reason = f"installed but lacks {', '.join(missing)} (an incompatible version)"
    logger.warning("%s is %s", module, reason)
    return reason
