"""Pretrain a Latent Speech-Text Transformer (or its token baseline) on megatron.core.

    python pretrain_lst.py --config examples/configs/tiny_cpu_lst.yaml \
        --data-path 0.67 data/text_train 0.33 data/speech_train --save ckpt --load ckpt
    torchrun --nproc-per-node 4 pretrain_lst.py ... --tensor-model-parallel-size 2 ...

Flags: `python pretrain_lst.py --help` (Megatron-LM's names). The same entry point is installed
as the `lst-train` console script.
"""

import sys

from megatron_lst.training.cli import main

# The guard matters: saving a dist checkpoint spawns processes that re-import this file.
if __name__ == "__main__":
    sys.exit(main())
