"""Launch a worker on N local processes and bring its numbers back to the test.

Parent side: `run_distributed(worker, nprocs, args, timeout)` runs
`python -m torch.distributed.run --standalone --nproc-per-node N worker ... --results FILE`
and returns what the workers wrote to FILE; any non-zero exit or timeout fails the test
with the end of the workers' output.

Worker side: `report_results(path, record)` gathers one JSON-able record per rank and has
rank 0 write them, in rank order, to `path`.
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
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc-per-node={nprocs}",
            *target, *map(str, args), "--results", str(results_path),
        ]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
        launcher = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        try:
            output, _ = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(launcher.pid)
            output, _ = launcher.communicate()
            pytest.fail(f"{_describe(command)} timed out after {timeout:.0f} s; "
                        f"output tail:\n{output[-_OUTPUT_TAIL_CHARS:]}")
        if launcher.returncode != 0:
            pytest.fail(f"{_describe(command)} exited with {launcher.returncode}; "
                        f"output tail:\n{output[-_OUTPUT_TAIL_CHARS:]}")
        if not results_path.is_file():
            pytest.fail(f"{_describe(command)} exited cleanly but reported no results "
                        f"(call report_results); output tail:\n{output[-_OUTPUT_TAIL_CHARS:]}")
        return json.loads(results_path.read_text())


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


def report_results(path: str | os.PathLike, record: Any) -> None:
    """Collective: gather every rank's JSON-able `record`; rank 0 writes the list to `path`."""
    import torch.distributed as dist

    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(records))


def _describe(command: Sequence[str]) -> str:
    return " ".join(command[2:])
