"""Launch a worker on N local processes and bring its numbers back to the test.

Parent side: `run_distributed(worker, nprocs, args, timeout)` runs
`python -m torch.distributed.run --standalone --nproc-per-node N worker ... --results FILE`
and returns what the workers wrote to FILE; any non-zero exit or timeout fails the test
with the end of the workers' output. `run_torchrun(nprocs, args, timeout)` launches any command
line under torchrun and returns its exit status and output (a test of how it stops), failing
the test only on a timeout.

Worker side: `init_gloo()` starts the process group; `report_results(path, record)` gathers
one JSON-able record per rank and has rank 0 write them, in rank order, to `path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
WORKERS_DIR = Path(__file__).resolve().parent / "workers"

_OUTPUT_TAIL_CHARS = 8000


def run_distributed(
    script_or_module: str | os.PathLike,
    nprocs: int,
    args: Sequence[str] = (),
    timeout: float = 300.0,
) -> list[Any]:
    """Run a worker under torch.distributed.run; returns the per-rank records it reported.

    `script_or_module` is a path to a .py file, or a dotted module name (launched with
    `--module`). The worker gets `--results FILE` appended to `args` and must call
    `report_results(FILE, record)` on every rank. `--standalone` has torchrun pick a
    free rendezvous port, so tests can run side by side. OMP_NUM_THREADS=1 keeps N
    processes from oversubscribing the cores. `timeout` only guards against a hang: four
    ranks of a tiny training run took 45 s on a loaded 2-core machine, so keep it generous.
    """
    script = Path(script_or_module)
    is_script = script.suffix == ".py"
    if is_script and not script.is_file():
        raise FileNotFoundError(f"worker script {script} does not exist")
    target = ([str(script)] if is_script else ["--module", str(script_or_module)])

    with tempfile.TemporaryDirectory(prefix="lst_dist_") as scratch:
        results_path = Path(scratch) / "results.json"
        launched = run_torchrun(nprocs, [*target, *args, "--results", results_path], timeout)
        if launched.returncode != 0:
            pytest.fail(f"{launched.command} exited with {launched.returncode}; "
                        f"output tail:\n{launched.output[-_OUTPUT_TAIL_CHARS:]}")
        if not results_path.is_file():
            pytest.fail(f"{launched.command} exited cleanly but reported no results (call "
                        f"report_results); output tail:\n{launched.output[-_OUTPUT_TAIL_CHARS:]}")
        return json.loads(results_path.read_text())


@dataclass(frozen=True)
class Launch:
    """What a torchrun launch did."""

    command: str
    """The launcher's arguments, as a line for messages."""
    returncode: int
    output: str
    """The launcher's and every rank's stdout and stderr, in the order they were written."""


def run_torchrun(nprocs: int, args: Sequence[str | os.PathLike], timeout: float = 300.0,
                 cwd: str | os.PathLike | None = None) -> Launch:
    """Run `torchrun --standalone --nproc-per-node=nprocs ARGS` (torch.distributed.run of this
    interpreter) to its end, whatever its exit status, with this process's `sys.path` as
    PYTHONPATH and OMP_NUM_THREADS=1 (N processes would oversubscribe the cores). After
    `timeout` s it is killed with every process it started (`kill_process_tree`) and the test
    fails with the end of its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nprocs}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    launcher = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(launcher.pid)
        output, _ = launcher.communicate()
        pytest.fail(f"{_describe(command)} timed out after {timeout:.0f} s; "
                    f"output tail:\n{output[-_OUTPUT_TAIL_CHARS:]}")
    return Launch(_describe(command), launcher.returncode, output)


def kill_process_tree(pid: int) -> None:
    """SIGKILL process `pid` (started with `start_new_session=True`: the leader of its own
    process group), that group, and every process below it. torchrun starts each worker in a
    session of its own, so killing the launcher's group alone leaves the workers running, holding
    the output pipe: reading it to the end after a timeout would then wait for them for ever."""
    try:
        below = psutil.Process(pid).children(recursive=True)  # found before they are orphaned
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for process in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def init_gloo() -> None:
    """Worker side: start the default gloo process group from torchrun's environment, with
    `torch._dynamo` imported first. Imported once the group exists (as `torch.distributed.
    checkpoint` imports it on a worker's first checkpoint read), it holds the group past
    `destroy_process_group`, whose gloo threads then die with the interpreter, which now and
    then aborts the rank ("terminate called without an active exception", exit -6: a failed
    test). `megatron_lst.parallel.initialize_parallel` imports it first as well (megatron)."""
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist

    dist.init_process_group("gloo")


def report_results(path: str | os.PathLike, record: Any) -> None:
    """Collective: gather every rank's JSON-able `record`; rank 0 writes the list to `path`."""
    import torch.distributed as dist

    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(records))


def _describe(command: Sequence[str]) -> str:
    return " ".join(command[2:])
