"""The layout of a save directory of training checkpoints (megatron.core dist_checkpointing,
docs/architecture.md#checkpoint-formats) and the names in it.

Layout of a save directory (`--save`), Megatron-LM's names where Megatron has them:

    latest_checkpointed_iteration.txt    "<iteration>": the newest complete checkpoint
    iter_0000100/                        one complete checkpoint
        <dist_checkpointing files>       model, optimizer, per-rank RNG states (sharded)
        lst_manifest.json                size and SHA-256 of each of those files
        lst_checkpoint.json              iteration, scheduler, extra state (consumed samples,
                                         curriculum step, ...), parallel layout, args, vocabulary,
                                         the model's kind and full configuration
    iter_0000200.tmp-<nonce>/            a save that was interrupted: never loaded, never deleted
    lst_train.lock                       held by the run writing here (`save_directory`)

Finding checkpoints in it: `checkpoint_discovery`; reading their `lst_checkpoint.json`:
`checkpoint_metadata`; saving one: `checkpoint_save`; loading one: `checkpoint_load`; which one to
resume from after a divergence or a damaged checkpoint: `checkpoint_advice`.
"""

from __future__ import annotations

import re

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "lst_checkpoint.json"
FORMAT_VERSION = 1
COMPLETE_NAME = re.compile(r"^iter_(\d{7,})$")
TEMPORARY_NAME = re.compile(r"^iter_(\d{7,})\.tmp-[0-9a-f]+$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"
