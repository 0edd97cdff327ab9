"""`lst-train` / `pretrain_lst.py`: parse the flags, validate them for this world, train.

Exit status: 0 when training reached --train-iters or stopped early after saving a checkpoint
(--exit-signal-handler, --exit-duration-in-mins, --exit-interval; Megatron-LM's behaviour: compare
the latest checkpoint with --train-iters to know which), 2 for bad flags or --eval-data items (as
lst-eval) or log writers (TensorBoard, W&B) that cannot be opened, 3 for a refused checkpoint: a
`--load` one that is damaged (found by the flag checks or while loading), unsafe or not resumable
with these flags, a --save directory without room for a checkpoint (or whose free space cannot
be measured) or that another run is writing, a save of diverged weights, or a save that failed
(a full disk), 4 for bad training data (a dataset that is missing, truncated, inconsistent with
its manifest, or of another vocabulary; with --task asr|tts, a text-only dataset, an utterance
without a transcript or units, or rows that --max-tokens and --seq-length do not hold), 5 for a
non-finite loss, a non-finite gradient norm under a finite loss, or --fp16 gradients that
overflow at the lowest loss scale update after update (the message names the checkpoint to
resume from), 130 for a SIGINT (Ctrl-C) that --exit-signal-handler does not watch
(the run stops without a save). Each prints one message that says what is wrong and what to do;
any other error exits 1 with its traceback.

Under a launcher, a message every rank prints alike is printed once (`stop_together`): a flag
refusal worked out from the flags alone, or a Ctrl-C during the flag checks, by rank 0; one from
a file, a directory or the machine that a rank sees by each rank that refuses, prefixed with its
rank (`[rank R] lst-train: ...`); and after the process group starts, each different message
once, the first as it is and each later one prefixed with the rank that printed it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.launch_environment import (
    LaunchEnvironmentError,
    launch_rank,
    launch_world_size,
)
from megatron_lst.training import stop_together
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.train_logging import (
    configure_console_logging,
    note_missing_fused_kernels,
)

# Nothing here imports megatron.core at import time: saving a dist checkpoint spawns a
# process that re-imports the entry module (this one, or pretrain_lst.py that imports it), and
# megatron.core's import-time warnings would be printed again at the first save.


EXIT_CHECKPOINT_REFUSED = 3
EXIT_BAD_DATA = 4
EXIT_NON_FINITE_LOSS = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def main(argv: Sequence[str] | None = None) -> int:
    try:
        rank, world_size = launch_rank(), launch_world_size()
    except LaunchEnvironmentError as error:
        print(f"lst-train: {error}", file=sys.stderr)
        return 2
    configure_console_logging(rank)
    try:
        args = validate_args(parse_args(argv), world_size)
    except ArgumentError as error:
        stop_together.say_why_before_arming(f"lst-train: {error}", error.same_on_every_rank)
        # A damaged --load checkpoint found by the flag checks (`DamagedCheckpointFlagError`).
        return EXIT_CHECKPOINT_REFUSED if isinstance(error, CheckpointError) else 2
    except KeyboardInterrupt:  # the checks read every dataset's index: they can take a while
        stop_together.say_why_of_the_launchers_signal(
            "lst-train: interrupted by SIGINT (Ctrl-C) during the flag checks: nothing was "
            "trained or saved")
        return EXIT_INTERRUPTED
    note_missing_fused_kernels()
    from megatron_lst.data.dataset import DatasetError
    from megatron_lst.data.documents import DocumentError
    from megatron_lst.evaluation.items import ItemError
    from megatron_lst.tokenizer.vocab import VocabularyError
    from megatron_lst.training.divergence import NonFiniteLossError
    from megatron_lst.training.loop import pretrain
    from megatron_lst.training.train_logging import LoggingSetupError

    try:
        pretrain(args)
    except CheckpointError as error:  # raised alike on every rank
        return _report(EXIT_CHECKPOINT_REFUSED, str(error))
    except ItemError as error:
        return _report(2, f"--eval-data: {error}")
    except LoggingSetupError as error:
        return _report(2, str(error))
    except (DocumentError, DatasetError, VocabularyError) as error:
        return _report(EXIT_BAD_DATA, f"bad training data: {error}")
    except NonFiniteLossError as error:
        return _report(EXIT_NON_FINITE_LOSS, str(error))
    except KeyboardInterrupt:  # SIGINT's default handler: --exit-signal SIGINT replaces it
        return _report(EXIT_INTERRUPTED, (
            "interrupted by SIGINT (Ctrl-C): stopped without saving the iteration it was in; "
            "the checkpoints saved before are kept. To save one before stopping on SIGINT, add "
            "--exit-signal-handler --exit-signal SIGINT"))
    except Exception:  # no message of ours: its traceback says what happened
        return _report(1, None)
    return 0


def _report(status: int, message: str | None) -> int:
    """Print `message` (None: the traceback of the exception being handled) unless another rank
    printed it (`stop_together.say_why_once`), and return `status` once every rank that stops
    has printed its own (at most `stop_together.STOP_WAIT_SECONDS` later): the launcher ends
    every rank once one has exited."""
    stop_together.say_why_once(traceback.format_exc().rstrip("\n") if message is None
                               else f"lst-train: {message}")
    stop_together.stop_with_the_others()
    return status


if __name__ == "__main__":
    sys.exit(main())
