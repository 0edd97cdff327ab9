"""`lst-generate` (its flags: the arguments) under torchrun (test_generate_prompts_file.py)."""

import sys

from megatron_lst.evaluation.generate_cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
