"""examples/pretrain_lst_torchrun.sh hands torchrun the caller's paths as the caller meant them.

`torchrun` is a stand-in on PATH that records its working directory and arguments, so the test
runs the script's own bash and nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain_lst_torchrun.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _launch(tmp_path: Path, cwd: Path) -> tuple[Path, list[str]]:
    """Run the script from `cwd` with relative paths; (torchrun's cwd, torchrun's arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "torchrun.log"
    (bin_dir / "torchrun").write_text(
        f'#!/bin/bash\npwd > "{record}"\nprintf "%s\\n" "$@" >> "{record}"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "TENSORBOARD_DIR": "", "GPUS_PER_NODE": "1",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
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
