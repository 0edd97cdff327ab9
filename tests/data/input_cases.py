"""Input files for the tests of the input-file rule: a FIFO with a writer that never blocks a test."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fifo_with_writer(path: Path, payload: bytes) -> Iterator[Path]:
    """A FIFO at `path` whose writer (a thread) writes `payload` and closes once a reader opens
    it: a reader that opens it reads `payload`, where without the writer it would block. The
    writer still waiting on leaving is let go by opening the read end without blocking."""
    os.mkfifo(path)

    def write():
        with open(path, "wb") as stream:
            stream.write(payload)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield path
    finally:
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            writer.join()
        finally:
            os.close(reader)
