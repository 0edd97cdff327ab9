"""`lst-train` / `pretrain_lst.py`: parse the flags, validate them for this world, train.

Exit status: 0 when training reached --train-iters, `loop.EXIT_STOPPED` (75) when a SIGTERM or
SIGUSR1 stopped it after saving a checkpoint (requeue; torchrun does not pass it on), 2 for bad
flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.loop import EXIT_STOPPED, pretrain
from megatron_lst.training.train_logging import configure_console_logging


def main(argv: Sequence[str] | None = None) -> int:
    configure_console_logging(int(os.environ.get("RANK", 0)))
    try:
        args = validate_args(parse_args(argv), int(os.environ.get("WORLD_SIZE", 1)))
    except ArgumentError as error:
        print(f"lst-train: {error}", file=sys.stderr)
        return 2
    result = pretrain(args)
    return EXIT_STOPPED if result.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
