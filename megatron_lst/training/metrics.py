"""`<save>/metrics.jsonl`: the training loop's metrics, one JSON line per iteration.

The logging rank appends a line per iteration (`MetricsFile`; the loop decides what a line holds,
see `loop`); a resumed run first drops the lines a crashed run wrote after the checkpoint it
resumes from; `read_metrics` reads the file back for comparisons and plots.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.data.input_files import bounded_lines, checked_file_size

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"


class MetricsFile:
    """`<save>/metrics.jsonl`: one JSON line per iteration, appended by the logging rank, for
    comparisons and plots (see `read_metrics`). A run resumed from the checkpoint of iteration
    `start_iteration` first drops the lines of later iterations (trained after that checkpoint by
    a run that crashed, and trained again now) and a line torn by the crash, so that the file
    holds every iteration once. A run `resumed_elsewhere` (from a checkpoint of another
    directory) drops them too, but keeps the file as it was aside: they are another run's."""

    def __init__(self, path: Path | None, start_iteration: int = 0,
                 resumed_elsewhere: bool = False):
        self._file = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_fifo():  # opening it waited for a reader: the run hung at its start
                logger.error("cannot append to %s: it is a FIFO (named pipe), not a file; no "
                             "metrics lines this run (the log keeps them); remove it, then "
                             "resume", path)
                return
            if path.is_file():
                _drop_records_after(path, start_iteration, resumed_elsewhere)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as err:  # as in `write`: only the logging rank is here
            logger.error("cannot append to %s (%s): no metrics lines this run (the log keeps "
                         "them), the file is as it was; free space or fix the file system, then "
                         "resume", path, err)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record`, one iteration's metrics with its "iteration", as one line.

        A write that fails (a full disk, a file system gone read-only) stops the metrics file
        with one error and leaves training running: only the logging rank writes it, and raising
        there would leave the other ranks waiting in their next collective. The log lines keep
        the metrics; the next checkpoint save, which every rank makes, stops the run cleanly if
        the disk still cannot take it."""
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            logger.error("cannot append to %s (%s): no more metrics lines this run (the log "
                         "keeps them); free space or fix the file system, then resume",
                         self._file.name, err)
            with contextlib.suppress(OSError):  # flushing what the failed write left fails again
                self.close()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


def _drop_records_after(path: Path, iteration: int, resumed_elsewhere: bool = False) -> None:
    """Rewrite `path` (atomically) without the records of iterations after `iteration`, without
    a torn last line and without any other line that is no metrics record (two writers, a
    damaged copy: `read_metrics` could not read the file back, and the run used to stop with a
    traceback on the logging rank alone, the other ranks waiting for it). Such a file is first
    copied to `<name>.damaged` (`.damaged.1`, ... when an earlier copy is there), so nothing
    is lost; and so is the file of a run that starts from no checkpoint (`iteration` 0), whose
    records are an earlier run's (its checkpoints moved away, or a crash before the first), to
    `<name>.earlier`, as is that of a run `resumed_elsewhere`, from a checkpoint of another
    directory: the records after it are another run's, not this one's trained again. Says what
    it dropped."""
    raw = path.read_bytes()
    lines = raw.decode("utf-8", errors="replace").splitlines(keepends=True)
    kept, dropped, torn, damaged = [], [], False, []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record_iteration = _record(line)["iteration"]
        except ValueError:
            if number == len(lines) - 1 and not line.endswith("\n"):  # a crash's torn write
                torn = True
            else:
                damaged.append(number + 1)
            continue
        if record_iteration > iteration:
            dropped.append(record_iteration)
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if not dropped and not torn and not damaged:
        return
    earlier = (iteration == 0 or resumed_elsewhere) and bool(dropped)
    suffix = ".damaged" if damaged else ".earlier" if earlier else None
    kept_aside = _unused_name(path.with_name(path.name + suffix)) if suffix else None
    if kept_aside is not None:
        replace_file_durably(kept_aside, raw)  # a failed copy leaves none
    replace_file_durably(path, "".join(kept))  # a full disk leaves the file as it was
    what = [f"{len(dropped)} record(s) of iterations {min(dropped)}-{max(dropped)}"] if dropped \
        else []
    what += ["a torn last line"] if torn else []
    if earlier:
        start = (f"resumes from iteration {iteration} of another directory's checkpoint"
                 if iteration else "starts from no checkpoint")
        logger.warning("%s: this run %s, so the %s there are an earlier run's; the file as it "
                       "was is kept as %s", path, start, " and ".join(what), kept_aside)
    elif dropped or torn:
        logger.warning("%s: dropped %s, written after the checkpoint of iteration %d that this "
                       "run resumes from", path, " and ".join(what), iteration)
    if damaged:
        logger.warning("%s: dropped line(s) %s, which are no metrics records; the file as it was "
                       "is kept as %s", path, ", ".join(map(str, damaged)), kept_aside)


def _unused_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... when taken: a copy kept aside earlier stays."""
    number = 0
    candidate = path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def read_metrics(save_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<save_dir>/metrics.jsonl` by iteration (the last line of a repeated
    iteration wins). A last line cut short without its newline (the run was killed as it wrote
    it; resuming drops it) is left out; any other line that is no metrics record is a
    ValueError naming the file and the line. The file is read line by line (a long run's is
    large); a FIFO (which blocked the read forever), a folder or a line longer than
    `MAX_LINE_CHARACTERS` (a binary file: read whole) is a ValueError naming the file."""
    path = Path(save_dir) / METRICS_FILENAME
    checked_file_size(path, ValueError, "metrics file")
    records: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(bounded_lines(stream, path, ValueError), start=1):
            record = _metrics_line(line, number, path)
            if record is not None:
                records[record["iteration"]] = record
    return [records[i] for i in sorted(records)]


def _metrics_line(line: str, number: int, path: Path) -> dict[str, Any] | None:
    """The record of line `number` of the metrics file `path`; None for a blank line and for a
    torn last line (the one line read without a line end is the file's last)."""
    if not line.strip():
        return None
    try:
        return _record(line)
    except ValueError:
        if not line.endswith("\n"):  # a crash's torn write
            return None
        raise ValueError(f"{path}:{number}: not a metrics record ({line.strip()[:80]!r}); "
                         f"resuming the run sets such lines aside in "
                         f"{path.name}.damaged, or delete the line") from None


def _record(line: str) -> dict[str, Any]:
    """The metrics record of the JSON `line`: an object whose "iteration" is a non-negative
    integer, as `MetricsFile.write` writes it. ValueError for any other line: an iteration of
    Infinity or 1e400 (whose `int()` was an OverflowError), of 2.5, "7" or true (once read as
    iteration 2, 7 and 1), or JSON nested too deeply to parse (a RecursionError)."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    iteration = record.get("iteration") if isinstance(record, dict) else None
    if type(iteration) is not int or iteration < 0:
        raise ValueError(f"no iteration number: {iteration!r}")
    return record
