"""examples/pretrain_lst_torchrun.sh hands torchrun the caller's paths as the caller meant them,
and its exit status tells a clean stop on SIGTERM from a failure.

`torchrun` is a stand-in on PATH that records its working directory and arguments, so the test
runs the script's own bash and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain_lst_torchrun.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _launch(tmp_path: Path, cwd: Path, **environment: str) -> tuple[Path, list[str]]:
    """Run the script from `cwd` with relative paths and `environment` added; (torchrun's cwd,
    torchrun's arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "torchrun.log"
    (bin_dir / "torchrun").write_text(
        f'#!/bin/bash\npwd > "{record}"\nprintf "%s\\n" "$@" >> "{record}"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "TENSORBOARD_DIR": "", "GPUS_PER_NODE": "1",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           **environment}
    done = subprocess.run(["bash", str(SCRIPT), "ckpt/lst", "spm.model", "data/text",
                           "data/speech"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    workdir, *arguments = record.read_text().splitlines()
    return Path(workdir), arguments


def test_relative_paths_stay_relative_to_the_callers_directory(tmp_path):
    """The script used to `cd` to the repository first, so `data/text` run from a data
    directory was looked up under the repository ('data/text.json: manifest not found')."""
    data_dir = tmp_path / "experiment"
    data_dir.mkdir()
    workdir, arguments = _launch(tmp_path, data_dir)
    assert workdir.resolve() == data_dir.resolve()
    assert str(REPO / "pretrain_lst.py") in arguments
    for flag, value in (("--save", "ckpt/lst"), ("--tokenizer-model", "spm.model")):
        assert arguments[arguments.index(flag) + 1] == value


def _trainer_args(arguments: list[str]):
    """What lst-train makes of the arguments the script hands torchrun (after the script)."""
    from megatron_lst.training.arguments import parse_args

    return parse_args(arguments[arguments.index(str(REPO / "pretrain_lst.py")) + 1:])


def test_parallel_sizes_of_the_config_hold_unless_tp_or_pp_is_set(tmp_path):
    """TP and PP used to be passed as 1 when unset, overriding CONFIG: the 7B config's tensor
    parallelism 2 trained at 1 (and dropped its sequence parallelism with a warning)."""
    config = str(REPO / "examples" / "configs" / "7b_lst.yaml")
    _, arguments = _launch(tmp_path, tmp_path, CONFIG=config)
    args = _trainer_args(arguments)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    assert args.sequence_parallel
    (tmp_path / "set").mkdir()
    _, arguments = _launch(tmp_path / "set", tmp_path, CONFIG=config, TP="4", PP="2")
    args = _trainer_args(arguments)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (4, 2)


@pytest.mark.parametrize(("setting", "expected"), [("1", True), ("0", False)])
def test_distributed_optimizer_setting_wins_over_the_config(tmp_path, setting, expected):
    """The paper configs set use-distributed-optimizer: true, so DISTRIBUTED_OPTIMIZER=0 used
    to leave the distributed optimizer on."""
    _, arguments = _launch(tmp_path, tmp_path, DISTRIBUTED_OPTIMIZER=setting)
    assert _trainer_args(arguments).use_distributed_optimizer is expected


# A stand-in torchrun agent as torch.distributed.run behaves on signals: one worker in a session of
# its own; each signal of --signals-to-handle (all four by default) is passed on to the worker and
# then re-raised, so the agent exits 1 whatever the worker did; signals it does not handle keep
# their inherited disposition. The worker, like lst-train with --exit-signal-handler, saves on
# SIGTERM (writes the tracker) and exits with $WORKER_STATUS.
_AGENT = r'''#!PYTHON
import os, signal, subprocess, sys, time
def wait(process):  # polls: Popen.wait holds a lock a signal handler's wait would block on
    while process.poll() is None:
        time.sleep(0.05)
    return process.returncode
args = sys.argv[1:]
handled = (args[args.index("--signals-to-handle") + 1].split(",")
           if "--signals-to-handle" in args else ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"])
worker = subprocess.Popen([sys.executable, "-c", WORKER], start_new_session=True)
def shut_down(signum, frame):
    worker.send_signal(signum)
    wait(worker)
    sys.exit(1)
for name in handled:
    signal.signal(getattr(signal, name), shut_down)
sys.exit(0 if wait(worker) == 0 else 1)
'''
_WORKER = r'''
import os, signal, sys, time
def save(signum, frame):
    open(os.environ["TRACKER"], "w").write("5\n")
    sys.exit(int(os.environ["WORKER_STATUS"]))
signal.signal(signal.SIGTERM, save)
open(os.environ["READY"], "w").write("ready")
time.sleep(60)
sys.exit(9)
'''


@pytest.mark.parametrize(("worker_status", "script_status"), [(0, 0), (1, 1)])
def test_a_sigterm_stop_exits_0_after_a_clean_save_and_non_zero_when_a_worker_fails(
        tmp_path, worker_status, script_status):
    """torchrun's agent re-raises a SIGTERM it handles, so the script, which exec'd it, exited 1
    although the workers had saved and exited 0: a preempted run looked failed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    agent = _AGENT.replace("PYTHON", sys.executable).replace("WORKER", repr(_WORKER))
    (bin_dir / "torchrun").write_text(agent)
    (bin_dir / "torchrun").chmod(0o755)
    (tmp_path / "ckpt").mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "TENSORBOARD_DIR": "", "GPUS_PER_NODE": "1",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "TRACKER": str(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"),
           "READY": str(ready), "WORKER_STATUS": str(worker_status)}
    script = subprocess.Popen(["bash", str(SCRIPT), "ckpt", "spm.model", "text", "speech"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the worker is up (the script's `have_module` imports take a while)
            if ready.exists() or script.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), script.communicate(timeout=10)
        script.send_signal(signal.SIGTERM)
        _, stderr = script.communicate(timeout=60)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == script_status, stderr
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "5\n"
    if script_status == 0:
        assert "stopped by SIGTERM after saving: latest checkpoint in ckpt is iteration 5" in stderr
    else:
        assert "torchrun ended with status 1" in stderr


def test_a_sigterm_before_torchrun_starts_stops_the_script_without_starting_it(tmp_path):
    """The traps used to be set only after torchrun had been started in the background, so a
    SIGTERM before them killed the script and left the agent (and its training) running on with
    nobody to stop it. A stand-in `python` holds the script in its `have_module` check until the
    signal has been sent."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record, ready, go = tmp_path / "torchrun.log", tmp_path / "ready", tmp_path / "go"
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\necho started > "{record}"\n')
    (bin_dir / "python").write_text(
        f'#!/bin/bash\necho ready > "{ready}"\nwhile [ ! -e "{go}" ]; do sleep 0.05; done\n'
        "exit 1\n")
    for stand_in in ("torchrun", "python"):
        (bin_dir / stand_in).chmod(0o755)
    env = {**os.environ, "TENSORBOARD_DIR": "", "GPUS_PER_NODE": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = subprocess.Popen(["bash", str(SCRIPT), "ckpt", "spm.model", "text", "speech"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or script.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), script.communicate(timeout=10)
        script.send_signal(signal.SIGTERM)
        go.write_text("go")
        _, stderr = script.communicate(timeout=60)
    finally:
        go.write_text("go")
        if script.poll() is None:
            script.kill()
    assert script.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM before torchrun started: nothing ran" in stderr
    assert not record.exists()
