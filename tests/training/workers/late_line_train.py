"""`lst-train` (`cli.main`) whose rank 1 takes 3 s longer to print its 'lst-train:' line:
where every rank stops on an error, the other ranks' exits must not let the launcher end rank 1
before its line, however late the machine's load makes it (test_save_directory.py,
test_cli_exit_status.py)."""

import os
import sys
import time


class LateLines:
    """`stream`, with a pause before each text that holds 'lst-train:'."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if "lst-train:" in text:
            time.sleep(3.0)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron_lst.training import cli

    if os.environ.get("RANK") == "1":
        sys.stderr = LateLines(sys.stderr)
    sys.exit(cli.main())
