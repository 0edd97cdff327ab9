"""`read_metrics` reads metrics.jsonl by the rule of a user's input file (docs/data.md#input-files):
a regular file, line by line, no line longer than any document's."""

from __future__ import annotations

import re

import pytest
from data.input_cases import fifo_with_writer

from megatron_lst.data.input_files import MAX_LINE_CHARACTERS
from megatron_lst.training.metrics import METRICS_FILENAME, read_metrics


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
