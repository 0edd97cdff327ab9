"""Worker processes for the data path that stop without killing anything.

`multiprocessing.Pool.terminate()` called while tasks are in flight can hang for ever: it sends
SIGTERM to the workers while its task-handler thread is still feeding them, and then waits for
that thread, which waits on the workers' queue (CPython gh-96995, gh-78178). Seen here under load:
`tools/preprocess_data.py` stopping on a bad line, and the row-index pass of `LSTDataset`
dropping the block it had planned ahead. Both need to stop early, so both use `worker_pool`: a
`ProcessPoolExecutor` that, on the way out, cancels the tasks no worker has started and lets each
worker finish the one in hand (a bounded wait: callers submit small tasks), with no signal sent.
A worker that dies surfaces as `BrokenProcessPool` from the result that needed it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


def fork_start_method() -> str:
    """"fork" where the platform has it (workers inherit the parent's state without pickling),
    else "spawn"."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


@contextlib.contextmanager
def worker_pool(num_workers: int, start_method: str | None = None
                ) -> Iterator[ProcessPoolExecutor]:
    """`num_workers` processes for the block; on exit, also by an exception, tasks not started
    are cancelled and the running ones finish. With "fork" the workers start at the first
    `submit`, before the executor's own thread exists."""
    context = multiprocessing.get_context(start_method or fork_start_method())
    executor = ProcessPoolExecutor(num_workers, mp_context=context)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
