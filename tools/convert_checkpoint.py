"""Convert LST checkpoints: portable safetensors form, megatron dist checkpoints, and the
reference implementation's checkpoints. Same as the `lst-convert` command; see
`megatron_lst/checkpoint/cli.py` for the subcommands."""

import sys

from megatron_lst.checkpoint.cli import main

if __name__ == "__main__":  # dist-checkpoint saving spawns processes
    sys.exit(main())
