"""`lst-train` or `lst-eval` (first argument: train or eval; the others are its flags) whose
rank 1 prints each line naming its program `--late` seconds late. Where every rank stops on an
error, the other ranks' exits must not let the launcher end rank 1 before its line, however late
the machine's load makes it (test_save_directory.py, test_cli_exit_status.py,
test_eval_cli_ranks.py)."""

import os
import sys
import time


class LateLines:
    """`stream`, with a pause of `seconds` before each text that holds `program`."""

    def __init__(self, stream, program: str, seconds: float):
        self._stream, self._program, self._seconds = stream, program, seconds

    def write(self, text):
        if self._program in text:
            time.sleep(self._seconds)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":  # the checkpoint writers re-import this file
    entry, late, seconds, *flags = sys.argv[1:]
    assert late == "--late", "usage: late_line.py train|eval --late SECONDS FLAGS..."
    if entry == "train":
        from megatron_lst.training.cli import main
        program = "lst-train:"
    else:
        from megatron_lst.evaluation.eval_cli import eval_main as main
        program = "lst-eval:"
    if os.environ.get("RANK") == "1":
        sys.stderr = LateLines(sys.stderr, program, float(seconds))
    sys.exit(main(flags))
