"""A worker that writes its process id to the file named by `--pid-dir` and then hangs, never
reporting results: what a deadlocked collective looks like from the outside
(test_harness_timeout.py)."""

import argparse
import os
import time
from pathlib import Path

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid-dir", type=Path, required=True)
    parser.add_argument("--results")
    args = parser.parse_args()
    (args.pid_dir / f"{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(3600)
