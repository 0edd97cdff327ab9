"""The start both checkpoint-layout workers (`dist_checkpoint_worker`, `reshard_worker`) share:
their command line, the parallel groups of one TP/PP layout, and the portable checkpoint."""

import argparse

from megatron_lst.checkpoint.portable import PortableCheckpoint, load_portable
from megatron_lst.parallel import initialize_parallel


def start_layout_worker(description: str) -> tuple[argparse.Namespace, PortableCheckpoint]:
    """Parse `--tp`, `--pp`, `--portable DIR`, `--save DIR` / `--load DIR` and `--results`,
    initialise the TP/PP groups, and load the portable checkpoint: `(arguments, checkpoint)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--portable", required=True)
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    initialize_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    return args, load_portable(args.portable)
