"""A 2-node job (two network namespaces joined by a veth pair, one torchrun agent and one worker
each, c10d rendezvous; loopback where namespaces cannot be made) survives a failure.

- A worker killed with SIGKILL mid-run (during a save where the timing allows): torchrun's next
  round resumes every rank from the latest complete checkpoint and finishes.
- SIGTERM to every process of the job, as SLURM sends it on preemption: the workers save the
  current iteration and every agent exits with status 0; a second launch resumes.

Both give per-iteration losses bitwise equal (fp32, gloo) to an uninterrupted 2-process run, each
iteration once in metrics.jsonl and once in the log after the resume point, and nothing of the job
left running (workers, checkpoint writers, the writers' results manager).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training.training_cases import tiny_flags, write_corpus

from distributed.two_nodes import (
    REPO_ROOT,
    launch_agent,
    processes_of,
    two_nodes,
    wait_until_gone,
    worker_of,
)
from megatron_lst.training.metrics import read_metrics

ITERATIONS = 12
SAVE_INTERVAL = 4
JOB_TIMEOUT = 240.0


def _flags(data_path: list[str], save: Path, *extra: str) -> list[str]:
    return tiny_flags(data_path) + [
        "--train-iters", str(ITERATIONS), "--lr-decay-iters", str(ITERATIONS),
        "--eval-interval", "1000", "--save", str(save), "--load", str(save), *extra]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> list[str]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_losses(data_path, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: 2 processes, the same data-parallel layout as the 2 nodes."""
    save = tmp_path_factory.mktemp("reference") / "ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO_ROOT / "pretrain_lst.py"), *_flags(data_path, save)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {r["iteration"]: r["loss"] for r in read_metrics(save)}


@pytest.fixture
def nodes():
    with two_nodes() as pair:
        if pair.loopback_reason is not None:
            print(f"two network namespaces could not be made ({pair.loopback_reason}): "
                  f"both nodes run on loopback", file=sys.stderr)
        yield pair


def test_two_network_namespaces_can_be_made():
    """Reports, as a skip, when the multi-node tests below fall back to loopback."""
    with two_nodes() as pair:
        if pair.loopback_reason is not None:
            pytest.skip(f"the 2-node tests run on loopback: {pair.loopback_reason}")
        shown = subprocess.run([*pair.nodes[1].command_prefix, "ip", "-brief", "address"],
                               capture_output=True, text=True, check=True).stdout
        assert pair.nodes[1].address in shown and pair.nodes[0].address not in shown


def _wait_for(condition, agents, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline or any(a.poll() is not None for a in agents):
            pytest.fail(f"never saw {what} (agents' status: {[a.poll() for a in agents]})")
        time.sleep(0.05)


def _metrics_iterations(save: Path) -> list[int]:
    path = save / "metrics.jsonl"
    if not path.is_file():
        return []
    iterations = []
    for line in path.read_text().splitlines():
        try:
            iterations.append(json.loads(line)["iteration"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line being written
    return iterations


def _finish(agents, logs: list[Path]) -> str:
    for agent in agents:
        try:
            agent.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not finish in time:\n" + _tails(logs))
    output = "".join(log.read_text() for log in logs)
    assert [a.returncode for a in agents] == [0, 0], _tails(logs)
    return output


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def _logged_iterations(logs: list[Path]) -> list[int]:
    """The iterations of the training log lines in `logs`, sorted."""
    return sorted(int(n) for log in logs
                  for n in re.findall(r"iteration +(\d+)/\d+ \|", log.read_text()))


def _assert_same_run(save: Path, reference: dict[int, float]) -> None:
    records = read_metrics(save)
    lines = (save / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(1, ITERATIONS + 1))
    assert {r["iteration"]: r["loss"] for r in records} == reference  # bitwise


def _assert_nothing_left(marker: str) -> None:
    left = wait_until_gone(marker, 15)
    assert left == [], f"processes of the job still running: {_describe(left)}"


def _describe(pids: list[int]) -> str:
    return "; ".join(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}"
                     for pid in pids if Path(f"/proc/{pid}").exists())


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_continues_bitwise(
        nodes, data_path, reference_losses, tmp_path):
    save = tmp_path / "ckpt"
    marker = nodes.new_job()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    flags = _flags(data_path, save, "--save-interval", str(SAVE_INTERVAL))
    agents = [launch_agent(nodes, i, marker, flags, logs[i], max_restarts=1) for i in range(2)]

    # Kill node 2's worker during the save of iteration 8, or right after it where the save was
    # too quick to catch.
    def in_second_save_or_after() -> bool:
        return any(save.glob("iter_0000008.tmp-*")) or 9 in _metrics_iterations(save)

    _wait_for(in_second_save_or_after, agents, JOB_TIMEOUT, "the save of iteration 8")
    victim = worker_of(agents[1])
    assert victim is not None
    subprocess.run(["kill", "-9", str(victim)], check=True)
    output = _finish(agents, logs)

    [resumed] = map(int, re.findall(r"resumed from \S+ at iteration (\d+)", output))
    assert resumed in (4, 8)
    # The killed round logged 1..K (K >= resumed, unknown), the restarted one resumed+1..end:
    # every iteration once, but those between the checkpoint and the kill twice.
    logged = _logged_iterations(logs)
    last_before_kill = len(logged) - ITERATIONS + resumed
    assert logged == sorted([*range(1, last_before_kill + 1),
                             *range(resumed + 1, ITERATIONS + 1)])
    _assert_same_run(save, reference_losses)
    _assert_nothing_left(marker)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_saves_the_current_iteration_exits_0_and_the_job_resumes(
        nodes, data_path, reference_losses, tmp_path):
    save = tmp_path / "ckpt"
    flags = _flags(data_path, save, "--save-interval", "1000", "--exit-signal-handler")
    marker = nodes.new_job()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [launch_agent(nodes, i, marker, flags, logs[i], ignore_sigterm=True)
              for i in range(2)]
    _wait_for(lambda: 5 in _metrics_iterations(save), agents, JOB_TIMEOUT, "iteration 5")
    subprocess.run(["kill", "-TERM", *map(str, processes_of(marker))], check=False)
    output = _finish(agents, logs)  # both agents exit with status 0

    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 5 <= stopped < ITERATIONS
    assert f"exiting after iteration {stopped}: received SIGTERM" in output
    assert _metrics_iterations(save)[-1] == stopped  # the checkpoint is the current iteration
    _assert_nothing_left(marker)

    marker = nodes.new_job()
    logs = [tmp_path / f"resume{i}.log" for i in range(2)]
    agents = [launch_agent(nodes, i, marker, flags, logs[i], ignore_sigterm=True)
              for i in range(2)]
    _finish(agents, logs)
    assert _logged_iterations(logs) == list(range(stopped + 1, ITERATIONS + 1))
    _assert_same_run(save, reference_losses)
    _assert_nothing_left(marker)
