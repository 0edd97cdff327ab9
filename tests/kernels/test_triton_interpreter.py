"""Runs the Triton kernel checks on CPU under the Triton interpreter, in a fresh process: the
interpreter must be switched on before `triton` is first imported."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lst_kernels.backend import interpret_requested

pytest.importorskip("triton")


@pytest.mark.slow
@pytest.mark.skipif(
    interpret_requested(),
    reason="this process already runs test_triton_kernels.py interpreted",
)
def test_triton_kernels_under_interpreter():
    from lst_kernels.backend import interpreter_incompatibility

    if interpreter_incompatibility():
        pytest.skip(interpreter_incompatibility())
    checks = Path(__file__).with_name("test_triton_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(checks)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # Every check ran: none skipped for want of the interpreter.
    assert re.search(r"\d+ passed", result.stdout) and not re.search(r"\d+ skipped", result.stdout)
