"""Scratch that a killed writer (SIGKILL: no cleanup ran) left behind is removed by the next run
of the same tool on the same output, with one log line: checkpoint conversion's scratch folders,
unit extraction's temporary unit files and the row-index builds' scratch files. A live writer's
scratch, another host's and anything that is not the tool's own scratch are left alone."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from megatron_lst.checkpoint.convert import staged_output
from megatron_lst.checkpoint.stale_scratch import this_host, writer_is_gone, writer_tag

HOST = this_host()


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert writer_is_gone(child.pid, HOST)
    return child.pid


@pytest.fixture
def live_pid():
    """The id of a process of this host that is running (a writer still at work)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _stale_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]


def test_writers_are_gone_only_when_they_ran_here_and_are_not_alive(dead_pid, live_pid):
    assert writer_is_gone(dead_pid, HOST) and writer_is_gone(dead_pid, None)
    assert not writer_is_gone(live_pid, HOST)
    assert not writer_is_gone(os.getpid(), HOST)
    assert not writer_is_gone(dead_pid, HOST + "-elsewhere")  # its ids mean nothing here
    assert writer_tag() == f"{os.getpid()}@{HOST}"
    assert HOST.startswith(socket.gethostname())
    if os.path.exists("/proc/self/ns/pid"):  # a container sharing the host's name is not here
        assert not writer_is_gone(dead_pid, socket.gethostname())


def test_a_conversion_removes_the_scratch_of_a_killed_one(tmp_path, dead_pid, live_pid, caplog):
    """A conversion killed by SIGKILL left its checkpoint-sized `.<out>.partial-*` folder, which
    no later conversion removed."""
    stale = tmp_path / f".out.partial-{dead_pid}@{HOST}-ab12_x9z"
    kept = [tmp_path / f".out.partial-{live_pid}@{HOST}-ab12_x9z",  # a live conversion's
            tmp_path / f".out.partial-{dead_pid}@{HOST}.other-ab12_x9z",  # another host's
            tmp_path / ".out.partial-ab12_x9z",  # no writer named: cannot be told
            tmp_path / f".other.partial-{dead_pid}@{HOST}-ab12_x9z"]  # another output's
    for folder in [stale, *kept]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    with caplog.at_level(logging.WARNING), staged_output(tmp_path / "out", ("a.json",)) as scratch:
        assert scratch.name.startswith(f".out.partial-{os.getpid()}@{HOST}-")
        (scratch / "a.json").write_text("{}")
    assert not stale.exists() and all(folder.is_dir() for folder in kept)
    assert (tmp_path / "out" / "a.json").read_text() == "{}"
    assert _stale_lines(caplog) == [
        f"removed 1 stale scratch folders of conversions to out of killed writers in {tmp_path}: "
        f"{stale.name}"]
    assert not list(tmp_path.glob(f".out.partial-{os.getpid()}@*"))  # its own, removed


def test_unit_extraction_removes_the_temporary_unit_files_of_killed_workers(tmp_path, dead_pid,
                                                                           live_pid, caplog):
    from megatron_lst.audio import extract

    units = tmp_path / "units"
    (units / "spk").mkdir(parents=True)
    stale = [units / f"a.npy.partial{dead_pid}@{HOST}",
             units / "spk" / f"b.npy.partial{dead_pid}"]  # written before hosts were named
    kept = [units / f"c.npy.partial{live_pid}@{HOST}", units / f"d.npy.partial{dead_pid}@elsewhere",
            units / "e.npy", units / f"notes.txt.partial{dead_pid}"]
    for path in stale + kept:
        path.write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        extract._remove_stale_unit_scratch(units)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    [line] = _stale_lines(caplog)
    assert line.startswith(f"removed 2 stale temporary unit files of killed writers in {units}: ")
    assert f"spk/b.npy.partial{dead_pid}" in line

    # The name write_units gives its temporary file is one the cleanup knows.
    seen = []

    def stop_after_writing(stream, array):
        seen.extend(path.name for path in units.iterdir() if ".partial" in path.name)
        raise OSError("stopped")

    write = extract.save_npy
    extract.save_npy = stop_after_writing
    try:
        with pytest.raises(OSError):
            extract.write_units(units / "f.npy", np.arange(3))
    finally:
        extract.save_npy = write
    assert f"f.npy.partial{os.getpid()}@{HOST}" in seen


def test_a_row_index_build_removes_the_scratch_of_killed_builds(tmp_path, dead_pid, live_pid,
                                                                caplog):
    from data.document_cases import aligned_store

    from megatron_lst.data.dataset import LSTDataset
    from megatron_lst.patching import Patcher, PatchingConfig

    cache = tmp_path / "cache"
    cache.mkdir()
    key, random = "0123456789abcdef" * 2, "fedcba9876543210"
    stale = cache / f"lst_rows_{key}.{dead_pid}@{HOST}.{random}.partial.npy"
    kept = [cache / f"lst_rows_{key}.{live_pid}@{HOST}.{random}.partial.npy",
            cache / f"lst_rows_{key}.{dead_pid}@elsewhere.{random}.partial.npy",
            cache / f"lst_rows_{key}.{random}.partial.npy",  # no writer named
            cache / f"lst_rows_{key}.npy"]
    for path in [stale, *kept]:
        path.write_bytes(b"x")
    store = aligned_store(6, 8)
    store.prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.json").write_text("{}")
    written = []
    replace = os.replace

    def record(source, target):
        written.append(os.path.basename(source))
        replace(source, target)

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", record)
        LSTDataset(store, 8, 8, 24, Patcher(PatchingConfig("static", patch_size=3)), seed=0,
                   index_cache_dir=cache)
    assert not stale.exists() and all(path.exists() for path in kept)
    assert _stale_lines(caplog) == [
        f"removed 1 stale row-index scratch files of killed writers in {cache}: {stale.name}"]
    [partial] = written
    assert partial.startswith("lst_rows_") and f".{os.getpid()}@{HOST}." in partial
