"""What `lst-eval` (`eval_cli.py`) and `lst-generate` (`generate_cli.py`) share as programs: the
`--ckpt-step` flag, and how they refuse: one line `program: error` and exit status 2, printed
once in a torchrun launch where every rank refuses for the same reason."""

from __future__ import annotations

import argparse

from megatron_lst.training import stop_together


def add_ckpt_step_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--ckpt-step`: a checkpoint of the `--load` save directory other than the latest."""
    parser.add_argument("--ckpt-step", type=int, default=None,
                        help="With --load DIR: the checkpoint of this iteration instead of the "
                             "latest one (what the checkpoint errors advise for a save "
                             "directory whose latest one is damaged).")


def refuse_before_arming(program: str, error: Exception, same_on_every_rank: bool) -> int:
    """Print `program: error` before the process group starts, once in a torchrun launch when
    it is `same_on_every_rank` (worked out from the flags alone), else naming this rank
    (`stop_together.say_why_before_arming`); exit status 2."""
    stop_together.say_why_before_arming(f"{program}: {error}", same_on_every_rank)
    return 2


def refuse_with_the_others(program: str, error: Exception) -> int:
    """Print `program: error` unless another rank printed it (`stop_together.say_why_once`) and
    return exit status 2, once every rank that stops has printed its own: the launcher ends
    every rank once one has exited."""
    stop_together.say_why_once(f"{program}: {error}")
    stop_together.stop_with_the_others()
    return 2
