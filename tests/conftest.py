"""Shared pytest set-up: `tests/` on sys.path for helper imports, and the `gpu` skip.

The markers (registered in pyproject.toml):
  gpu          needs CUDA; skipped here where torch sees no GPU.
  distributed  launches several processes through torch.distributed.run
               (tests/distributed/harness.py).
  slow         takes more than a few seconds; deselect with `-m "not slow"`.
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def disk_full_at():
    """`with disk_full_at(n):` inside the block, a write that would take any file of this process
    past `n` bytes writes what fits and fails (EFBIG, as a full disk fails with ENOSPC): what a
    writer leaves when the disk fills part way through a file. Keep the block to the write under
    test: the limit holds for every file of the process, pytest's own output and captures too."""
    return _disk_full_at


@contextlib.contextmanager
def _disk_full_at(n: int):
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
