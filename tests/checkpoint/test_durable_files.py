"""`replace_file_durably`: the old content or the new, whole; never a part of the new."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.checkpoint.durable_files import replace_file_durably, save_npy


def test_a_write_that_fills_the_disk_leaves_the_old_file_and_no_temporary(tmp_path, disk_full_at):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}\n')
    with disk_full_at(64), pytest.raises(OSError):
        replace_file_durably(path, '{"new": "' + "x" * 1000 + '"}\n')
    assert path.read_text() == '{"old": 1}\n'
    assert os.listdir(tmp_path) == ["results.json"]


def test_text_and_bytes_are_written_whole(tmp_path):
    replace_file_durably(tmp_path / "a.txt", "naïve\n")
    replace_file_durably(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == "naïve\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]


def test_a_symbolic_link_keeps_naming_the_file_it_names(tmp_path):
    """The link is not replaced by a file: the file it names gets the content."""
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "items.jsonl"
    target.write_text("old\n")
    link = tmp_path / "items.jsonl"
    link.symlink_to(target)
    replace_file_durably(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "gone" / "x.jsonl")
    with pytest.raises(FileNotFoundError):
        replace_file_durably(dangling, "new\n")


@pytest.mark.parametrize("as_stream", [False, True], ids=["path", "stream"])
def test_an_array_cut_short_by_a_full_disk_is_an_error_naming_the_file(tmp_path, disk_full_at,
                                                                        as_stream):
    """np.save wrote a small array into a C buffer whose failed flush it ignored: the file was
    cut short and the save returned as if it were whole."""
    path = tmp_path / "units.npy"
    array = np.arange(1000, dtype=np.int32)
    with (disk_full_at(300),
          pytest.raises(OSError, match="the disk took 300 of the array's 4128 bytes") as raised):
        if as_stream:
            with open(path, "wb") as stream:
                save_npy(stream, array)
        else:
            save_npy(path, array)
    assert raised.value.filename == str(path)


def test_a_whole_array_reads_back(tmp_path):
    array = np.arange(12, dtype=np.int64).reshape(4, 3)
    save_npy(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)


def test_a_device_or_a_pipe_is_written_not_replaced(tmp_path):
    """`--output /dev/stdout` (or a pipe) would have become a temporary file beside the device,
    renamed over it."""
    replace_file_durably("/dev/null", "results\n")
    assert not Path("/dev/null").is_file()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    replace_file_durably(fifo, "results\n")
    reader.join(timeout=60)
    assert received == ["results\n"] and not fifo.is_file()
    assert os.listdir(tmp_path) == ["pipe"]


def test_dev_stdout_that_is_a_pipe_is_written():
    """`--out /dev/stdout | jq`: the real path of a pipe, /proc/<pid>/fd/pipe:[N], names no
    file, and the temporary file beside it could not be made (FileNotFoundError)."""
    run = subprocess.run(
        [sys.executable, "-c", "from megatron_lst.checkpoint.durable_files import "
         "replace_file_durably; replace_file_durably('/dev/stdout', 'results\\n')"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == "results\n"
