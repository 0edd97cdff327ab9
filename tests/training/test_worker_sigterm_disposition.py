"""A trainer started with SIGTERM ignored takes SIGTERM's default action back.

examples/pretrain_lst_torchrun.sh and examples/pretrain_lst_slurm.sbatch start torchrun with
SIGTERM ignored, so that the agent outlives it and leaves it to the workers; an ignored signal is
inherited through exec, so every worker ignored the SIGTERM with which the agent ends the others
when one fails. Until `--exit-signal-handler` took it over in the training loop they ran on: a
flag refused by every rank was printed by each of them after its 10 s wait, and a worker in data
or checkpoint loading ran on until the agent killed it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs pretrain_lst.py as __main__ with the trainer replaced by a report of SIGTERM's handler.
_PROBE = f"""
import runpy, signal
import megatron_lst.training.cli as cli
cli.main = lambda: print(signal.getsignal(signal.SIGTERM)) or 0
runpy.run_path({str(REPO / "pretrain_lst.py")!r}, run_name="__main__")
"""


def _sigterm_handler_of_a_trainer_started_with(disposition) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGTERM, disposition))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_inherited_ignored_sigterm_is_restored_to_its_default():
    assert _sigterm_handler_of_a_trainer_started_with(signal.SIG_IGN) == str(signal.SIG_DFL)


def test_a_default_sigterm_stays_default():
    assert _sigterm_handler_of_a_trainer_started_with(signal.SIG_DFL) == str(signal.SIG_DFL)
