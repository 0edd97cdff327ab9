"""`replace_file_durably`: the old content or the new, whole; never a part of the new."""

import os

import pytest

from megatron_lst.checkpoint.durable_files import replace_file_durably


def test_a_write_that_fills_the_disk_leaves_the_old_file_and_no_temporary(tmp_path, disk_full_at):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}\n')
    disk_full_at(64)
    with pytest.raises(OSError):
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
