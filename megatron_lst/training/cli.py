"""`lst-train` / `pretrain_lst.py`: parse the flags, validate them for this world, train.

Exit status: 0 when training reached --train-iters or stopped early after saving a checkpoint
(--exit-signal-handler, --exit-duration-in-mins, --exit-interval; Megatron-LM's behaviour: compare
the latest checkpoint with --train-iters to know which), 2 for bad flags.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.loop import pretrain


def main(argv: Sequence[str] | None = None) -> int:
    # Every rank logs warnings; only rank 0 the informational messages.
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        args = validate_args(parse_args(argv), int(os.environ.get("WORLD_SIZE", 1)))
    except ArgumentError as error:
        print(f"lst-train: {error}", file=sys.stderr)
        return 2
    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
