"""The scripts in tools/ (and examples/) as modules, for the tests that call their functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str, directory: Path = TOOLS) -> ModuleType:
    """`<directory>/<name>.py` (a script of tools/ by default) imported afresh as module `name`,
    registered in `sys.modules` (the dataclasses a script defines look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
