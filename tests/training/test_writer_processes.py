"""Checkpoint writer processes die with the training process (`writers_die_with_parent`).

A real process tree: a parent with the trainer's kind of SIGTERM handler forks one process inside
the save context (a writer) and one outside (a data-loader worker), and starts megatron's
results-queue manager through the context. After `kill -9` of the parent, the writer and the
manager must be gone; the process forked outside the context is left alone.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import multiprocessing, signal, time

    def sleep():
        time.sleep(600)

    if __name__ == "__main__":  # megatron's manager is spawned: it re-imports this file
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron_lst.training.writer_processes import writers_die_with_parent

        signal.signal(signal.SIGTERM, lambda *_: None)  # the training loop's stop handler
        fork = multiprocessing.get_context("fork")
        outside = fork.Process(target=sleep)
        outside.start()
        with writers_die_with_parent():
            writer = fork.Process(target=sleep)
            writer.start()
        manager = filesystem_async._results_queue._manager._process.pid
        print(writer.pid, outside.pid, manager, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has already died
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_writers_and_the_results_manager_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        writer, outside, manager = pids = [int(p) for p in parent.stdout.readline().split()]
        os.kill(writer, signal.SIGTERM)  # meant for the trainer: the writer carries on
        time.sleep(0.5)
        assert _alive(writer)
        parent.kill()
        parent.wait()
        assert _wait_gone([writer, manager], 20) == [], "a writer outlived its parent"
        assert _alive(outside), "a process forked outside a save was made to die with its parent"
    finally:
        parent.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
