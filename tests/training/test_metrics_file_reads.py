"""`read_metrics` reads metrics.jsonl by the rule of a user's input file (docs/data.md#input-files):
a regular file, line by line, no line longer than any document's; `MetricsFile` appends to no
FIFO."""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest
from data.input_cases import fifo_with_writer

from megatron_lst.data.input_files import MAX_LINE_CHARACTERS
from megatron_lst.training.metrics import METRICS_FILENAME, MetricsFile, read_metrics


def test_a_metrics_file_that_is_a_fifo_is_refused_naming_it(tmp_path):
    """Opening it waited for a writer: a comparison or plot of the run hung, silently."""
    with fifo_with_writer(tmp_path / METRICS_FILENAME, b'{"iteration": 1}\n') as fifo:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(fifo))}: is a FIFO \(named pipe\)"):
            read_metrics(tmp_path)


def test_a_metrics_line_longer_than_any_document_is_refused_unread(tmp_path):
    """A file of no line ends (a binary file in its place) was read whole, then its last line
    taken for a torn write and left out without a word."""
    (tmp_path / METRICS_FILENAME).write_text('{"iteration": 1}\n' + "x" * (MAX_LINE_CHARACTERS + 1))
    with pytest.raises(ValueError, match=rf"^{tmp_path / METRICS_FILENAME}:2: a line longer than"):
        read_metrics(tmp_path)


def test_a_metrics_file_that_is_a_fifo_is_left_alone_not_waited_on(tmp_path, caplog):
    """Opening it to append waited for a reader: the run hung at its start on the logging rank
    alone, silently. It is one error in the log and no metrics lines, as a full disk is."""
    path = tmp_path / METRICS_FILENAME
    os.mkfifo(path)
    opened = threading.Thread(target=lambda: MetricsFile(path).close(), daemon=True)
    opened.start()
    opened.join(timeout=30)
    if opened.is_alive():  # let the blocked open go, so that the thread ends
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    assert not opened.is_alive(), "opening the metrics file waited for a reader of the FIFO"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"cannot append to {path}: it is a FIFO (named pipe), not a file; no "
                      f"metrics lines this run (the log keeps them); remove it, then resume"]
