"""`destroy_parallel` releases every process group it made: a group left referenced keeps its
gloo threads running past `destroy_process_group` and is destroyed during interpreter
shutdown, which now and then aborts the process (exit -6 instead of the run's status)."""

import sys

import pytest

from distributed.harness import WORKERS_DIR, run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task"),
]


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_destroy_parallel_stops_every_gloo_thread(tensor_parallel):
    assert run_distributed(WORKERS_DIR / "group_release_worker.py", 2,
                           ["--tensor-model-parallel-size", str(tensor_parallel)],
                           timeout=300) == [None, None]
