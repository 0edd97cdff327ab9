"""examples/pretrain_lst_slurm.sbatch's decision after the step: finished, requeue, or give up;
and a job that cannot start stops before the step.

`srun` and `scontrol` are stand-ins on PATH: the step only sets the checkpoint tracker and exits
with a status, and `scontrol requeue` is recorded, so the test runs the script's own bash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain_lst_slurm.sbatch"
TRAIN_ITERS = 6


def _stand_ins(bin_dir: Path, step_saves: int | None, step_status: int) -> None:
    """`srun` that writes iteration `step_saves` to the tracker (None: saves nothing) and exits
    `step_status`; `scontrol` that names the head node and records requeues."""
    bin_dir.mkdir()
    save = (f'echo {step_saves} > "$CHECKPOINT_TRACKER"'
            if step_saves is not None else ":")
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{save}\nexit {step_status}\n")
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1" in\n  show) echo node0 ;;\n'
        '  requeue) echo "$2" >> "$REQUEUES" ;;\nesac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


def _run(tmp_path: Path, *, saved_before: int | None, step_saves: int | None, step_status: int
         ) -> tuple[subprocess.CompletedProcess, list[str]]:
    config_dir = tmp_path / "it's configs"  # a quote and a space in the --config path
    config_dir.mkdir()
    config = config_dir / "run.yaml"
    config.write_text(f"preset: tiny-cpu\ntrain-iters: {TRAIN_ITERS}\n")
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    tracker = checkpoints / "latest_checkpointed_iteration.txt"
    if saved_before is not None:
        tracker.write_text(f"{saved_before}\n")
    _stand_ins(tmp_path / "bin", step_saves, step_status)
    python_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{python_dir}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CONFIG": str(config), "CHECKPOINT_TRACKER": str(tracker),
           "REQUEUES": str(tmp_path / "requeues"), "SLURM_JOB_NODELIST": "node0",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO)}
    done = subprocess.run(["bash", str(SCRIPT), str(checkpoints), "spm.model", "text", "speech"],
                          env=env, capture_output=True, text=True, timeout=120)
    requeues = tmp_path / "requeues"
    return done, requeues.read_text().split() if requeues.exists() else []


pytestmark = [pytest.mark.slow,  # each runs the script, whose flag check imports megatron.core
              pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


def test_a_step_that_fails_without_saving_is_not_requeued(tmp_path):
    """Bad flags or data fail every requeue the same way: they were requeued MAX_REQUEUES times
    as 'stopped at iteration 0'."""
    done, requeues = _run(tmp_path, saved_before=2, step_saves=None, step_status=1)
    assert done.returncode == 1, done.stderr
    assert requeues == []
    assert ("the step failed (status 1) without saving a checkpoint past iteration 2: "
            "not requeueing") in done.stderr


@pytest.mark.parametrize("step_saves, step_status", [
    (4, 0),  # stopped by a signal: the workers saved and exited 0
    (4, 1),  # a node died after the step saved
], ids=["stopped", "failed-after-saving"])
def test_an_unfinished_step_that_saved_is_requeued(tmp_path, step_saves, step_status):
    done, requeues = _run(tmp_path, saved_before=2, step_saves=step_saves,
                          step_status=step_status)
    assert done.returncode == 0, done.stderr
    assert requeues == ["77"]
    assert f"stopped at iteration {step_saves} of {TRAIN_ITERS}: requeueing job 77" in done.stdout


def test_a_finished_run_ends_the_job(tmp_path):
    done, requeues = _run(tmp_path, saved_before=None, step_saves=TRAIN_ITERS, step_status=0)
    assert done.returncode == 0, done.stderr
    assert requeues == []
    assert f"training finished at iteration {TRAIN_ITERS}" in done.stdout


@pytest.mark.parametrize("submit_dir, config, error", [
    ("elsewhere", None, "no pretrain_lst.py in {submit_dir}: submit from the repository root"),
    (str(REPO), "missing.yaml", "CONFIG=missing.yaml: no such file"),
], ids=["submitted-outside-the-repository", "missing-config"])
def test_a_job_that_cannot_start_stops_before_the_step(tmp_path, submit_dir, config, error):
    """Submitted from another directory, every node's workers failed to open pretrain_lst.py
    and the script ended in a traceback about the default --config; a missing CONFIG also
    reached the step."""
    if submit_dir == "elsewhere":
        submit_dir = str(tmp_path)
    _stand_ins(tmp_path / "bin", step_saves=None, step_status=1)
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/bash\ntouch "{tmp_path}/step_ran"\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": submit_dir, "REQUEUES": str(tmp_path / "requeues")}
    env.pop("REPO_ROOT", None)
    if config is not None:
        env["CONFIG"] = config
    done = subprocess.run(["bash", str(SCRIPT), "ckpt", "spm.model", "text", "speech"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert error.format(submit_dir=submit_dir) in done.stderr
    assert not (tmp_path / "step_ran").exists()


@pytest.mark.parametrize("config_text, error", [
    ("preset: tiny-cpu\n", "sets no train-iters (got 'None')"),
    ("preset: tiny-cpu\ntrain-iters: [6\n", "cannot read --train-iters from CONFIG="),
], ids=["no-train-iters", "unreadable"])
def test_a_config_without_train_iters_stops_before_the_step(tmp_path, config_text, error):
    """The script read --train-iters only after the step, to decide on the requeue: a CONFIG it
    could not read it from ended the job after training, without a requeue."""
    config = tmp_path / "run.yaml"
    config.write_text(config_text)
    _stand_ins(tmp_path / "bin", step_saves=None, step_status=0)
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/bash\ntouch "{tmp_path}/step_ran"\n')
    python_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{python_dir}:{os.environ['PATH']}",
           "CONFIG": str(config), "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO),
           "REQUEUES": str(tmp_path / "requeues")}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "ckpt"), "spm.model", "text",
                           "speech"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert error in done.stderr
    assert not (tmp_path / "step_ran").exists()
