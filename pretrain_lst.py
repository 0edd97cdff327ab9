"""Pretrain a Latent Speech-Text Transformer (or its token baseline) on megatron.core.

    python pretrain_lst.py --config examples/configs/tiny_cpu_lst.yaml \
        --data-path 0.67 data/text_train 0.33 data/speech_train --save ckpt --load ckpt
    torchrun --nproc-per-node 4 pretrain_lst.py ... --tensor-model-parallel-size 2 ...

Flags: `python pretrain_lst.py --help` (Megatron-LM's names). The same entry point is installed
as the `lst-train` console script.
"""

import signal
import sys

# The guard matters: saving a dist checkpoint spawns a process (megatron's results-queue manager)
# that re-imports this file; importing the trainer only under it keeps that process small and
# quick to start.
if __name__ == "__main__":
    # The launch scripts (examples/) start torchrun with SIGTERM ignored so that the agent
    # outlives it, and an ignored signal is inherited: restored here, the SIGTERM with which the
    # agent ends the other workers when one fails ends this one too (--exit-signal-handler takes
    # SIGTERM over in the training loop, to save first).
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from megatron_lst.training.cli import main

    sys.exit(main())
