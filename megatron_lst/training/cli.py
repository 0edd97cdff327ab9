"""`lst-train` / `pretrain_lst.py`: parse the flags, validate them for this world, train.

Exit status: 0 when training reached --train-iters or stopped early after saving a checkpoint
(--exit-signal-handler, --exit-duration-in-mins, --exit-interval; Megatron-LM's behaviour: compare
the latest checkpoint with --train-iters to know which), 2 for bad flags, 3 for a refused
checkpoint: a `--load` one that is damaged, unsafe or not resumable with these flags, or a save of
diverged weights (the message says which and what to do).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.train_logging import configure_console_logging

# Nothing here imports torch or megatron.core at import time: saving a dist checkpoint spawns a
# process that re-imports the entry module (this one, or pretrain_lst.py that imports it), and
# megatron.core's import-time warnings would be printed again at the first save.


EXIT_CHECKPOINT_REFUSED = 3


def main(argv: Sequence[str] | None = None) -> int:
    configure_console_logging(int(os.environ.get("RANK", 0)))
    try:
        args = validate_args(parse_args(argv), int(os.environ.get("WORLD_SIZE", 1)))
    except ArgumentError as error:
        print(f"lst-train: {error}", file=sys.stderr)
        return 2
    from megatron_lst.checkpoint.errors import CheckpointError
    from megatron_lst.training.loop import pretrain

    try:
        pretrain(args)
    except CheckpointError as error:  # raised alike on every rank
        print(f"lst-train: {error}", file=sys.stderr)
        return EXIT_CHECKPOINT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
