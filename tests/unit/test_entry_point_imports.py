"""The console scripts import without megatron.core: `--help`, bad-flag refusals and the
re-import by a dist checkpoint's save process need only configs (megatron.core's import takes
seconds and prints its own notices). The model classes load it on first use."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

ENTRY_MODULES = sorted({
    script.value.split(":")[0] for script in entry_points(group="console_scripts")
    if script.value.startswith("megatron_lst.")
} | {"pretrain_lst"})


def _megatron_modules_after_import(module: str) -> list[str]:
    probe = (f"import sys, {module}; "
             "print(*sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def test_every_console_script_is_checked():
    assert {"megatron_lst.training.cli", "megatron_lst.evaluation.eval_cli",
            "megatron_lst.evaluation.generate_cli",
            "megatron_lst.checkpoint.cli"} <= set(ENTRY_MODULES)


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_entry_module_imports_without_megatron_core(module):
    assert _megatron_modules_after_import(module) == []


def test_model_classes_load_on_first_use():
    import megatron_lst.models as models

    assert models.LSTModel.__name__ == "LSTModel"
    assert models.TokenBaselineModel.__module__ == "megatron_lst.models.baseline"
    with pytest.raises(AttributeError, match="no_such_model"):
        models.no_such_model  # noqa: B018
