"""A `--save` directory that cannot take this run's checkpoints is refused before any work: one
that cannot be written (read-only filesystem, no permission, full disk), one whose filesystem has
less room than a checkpoint, one another run is writing (docs/training.md#checkpointing). Each
used to surface only later: a traceback while the row-index cache was written there, a failed
save after training up to it, or two runs mixing their metrics and racing to the same
checkpoint names."""

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from distributed.harness import WORKERS_DIR, run_torchrun

from megatron_lst.training import cli, save_directory, train_logging
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpointing import TRACKER_FILENAME
from megatron_lst.training.save_directory import (
    LOCK_FILENAME,
    SaveDirectoryBusyError,
    SaveDirectoryLock,
    SaveDirectoryLockError,
)
from training.training_cases import tiny_flags, write_corpus

REPO = Path(__file__).resolve().parents[2]
VALID_FLAGS = ["--preset", "tiny-cpu", "--seq-length", "16", "--train-iters", "10", "--lr",
               "1e-3"]


@pytest.mark.parametrize("error, named", [
    (OSError(errno.EROFS, "Read-only file system"), "read-only filesystem"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
])
def test_a_save_directory_that_cannot_be_written_is_refused_by_the_flags(tmp_path, monkeypatch,
                                                                        error, named):
    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise error
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(save_directory, "open", failing_open, raising=False)
    save = tmp_path / "run"
    with pytest.raises(ArgumentError, match=rf"--save {save} cannot be written \({named}\): "
                                            r"checkpoints, metrics.jsonl .* Give a writable"):
        validate_args(parse_args([*VALID_FLAGS, "--save", str(save)]), 1)
    assert list(save.iterdir()) == []  # no probe file left behind


def test_a_tensorboard_directory_that_cannot_be_written_is_refused_by_the_flags(tmp_path,
                                                                              monkeypatch):
    """It failed on the logging rank alone, while the other ranks waited for it."""
    monkeypatch.setattr(train_logging, "require_optional_package", lambda name: None)

    def failing_open(path, mode="r", *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(save_directory, "open", failing_open, raising=False)
    events = tmp_path / "tb"
    with pytest.raises(ArgumentError, match=rf"--tensorboard-dir {events} cannot be written "
                                            r"\(read-only filesystem\): the TensorBoard events"):
        validate_args(parse_args([*VALID_FLAGS, "--tensorboard-dir", str(events)]), 1)


def test_a_writable_save_directory_is_created_and_left_empty(tmp_path):
    save = tmp_path / "new" / "run"
    validate_args(parse_args([*VALID_FLAGS, "--save", str(save)]), 1)
    assert save.is_dir() and list(save.iterdir()) == []


def test_refused_flags_create_no_save_directory(tmp_path):
    save = tmp_path / "run"
    with pytest.raises(ArgumentError, match="--lr must be positive"):
        validate_args(parse_args([*VALID_FLAGS, "--lr", "-1", "--save", str(save)]), 1)
    assert not save.exists()


HOLD_LOCK = """
import os, sys
from megatron_lst.training.save_directory import SaveDirectoryLock
lock = SaveDirectoryLock(sys.argv[1]).__enter__()
if len(sys.argv) > 2:  # pose as a run on another host (through the lock's own descriptor:
    os.ftruncate(lock._fd, 0)  # closing any other one would drop the POSIX lock)
    os.pwrite(lock._fd, f"pid 1 on host {sys.argv[2]}, started then".encode(), 0)
print("held", flush=True)
sys.stdin.read()
"""


def hold_lock(save: Path, *host: str) -> subprocess.Popen:
    """Another process that holds the lock of `save` until its stdin closes or it is killed
    (with `host`: recorded as a run on that host)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(save), *host], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_lock_names_its_holder_and_goes_with_it_even_on_sigkill(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(SaveDirectoryBusyError, match=rf"--save {tmp_path} is being written by "
                                                         rf"another run \(holder: pid "
                                                         rf"{holder.pid} on host .*Wait for"):
            SaveDirectoryLock(tmp_path).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with SaveDirectoryLock(tmp_path):  # the kernel dropped the killed holder's lock
        pass
    with SaveDirectoryLock(tmp_path):  # and leaving the block released ours
        pass


def test_a_lock_whose_holder_cannot_be_recorded_is_held_all_the_same(tmp_path, caplog,
                                                                      disk_full_at):
    """Writing who holds the lock raised OSError on a full disk, on rank 0 alone (the other
    ranks then waited for it), with the lock held and its descriptor left open."""
    with disk_full_at(0), SaveDirectoryLock(tmp_path) as lock:
        assert lock._fd is not None
        assert f"cannot record this run as the holder of {lock.path}" in caplog.text
    assert lock._fd is None


def test_a_lock_file_that_cannot_be_opened_is_refused_on_every_rank_naming_it(tmp_path):
    """A directory named lst_train.lock in --save made rank 0 stop with IsADirectoryError while
    the other ranks waited for its answer, which broke with a gloo traceback: the loop hands
    every rank rank 0's refusal (`checkpoint_save.on_rank0`)."""
    import torch

    from megatron_lst.parallel import free_local_port
    from megatron_lst.training.loop import _save_directory_lock

    (tmp_path / LOCK_FILENAME).mkdir()
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_local_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(SaveDirectoryLockError, match=(
                rf"--save {tmp_path}: its lock file {tmp_path / LOCK_FILENAME} cannot be opened "
                rf"\(Is a directory at .*\).*Remove what is in its place")):
            with _save_directory_lock(str(tmp_path)):
                pass
    finally:
        torch.distributed.destroy_process_group()


def test_a_lock_held_from_another_host_is_waited_for_then_refused(tmp_path):
    """A file server keeps a crashed node's lock until its lease runs out: a restarted job must
    not be refused by its dead predecessor, a live run elsewhere still refuses."""
    holder = hold_lock(tmp_path, "node-elsewhere")
    try:
        with pytest.raises(SaveDirectoryBusyError, match=r"holder: pid 1 on host node-elsewhere"):
            SaveDirectoryLock(tmp_path, remote_wait_seconds=0.5).__enter__()
        threading.Timer(1.0, holder.kill).start()  # the node's lease runs out while we wait
        with SaveDirectoryLock(tmp_path, remote_wait_seconds=600):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lst_train_on_a_save_directory_another_run_writes_exits_3_before_any_work(
        tmp_path, capsys):
    save = tmp_path / "run"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + ["--train-iters", "2", "--save",
                                                          str(save)]
    holder = hold_lock(save)
    try:
        assert cli.main(flags) == cli.EXIT_CHECKPOINT_REFUSED
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"lst-train: --save {save} is being written by another run "
                              f"(holder: pid {holder.pid} ")
    assert sorted(p.name for p in save.iterdir()) == [LOCK_FILENAME]  # no index, no metrics


@pytest.mark.slow
def test_a_save_filesystem_without_room_for_a_checkpoint_is_refused_before_training(
        tmp_path, monkeypatch, capsys):
    """The estimate is a lower bound of the checkpoint the run then writes, and close to it:
    a filesystem with less free space is refused, one with the real size is not."""
    data_path = write_corpus(tmp_path / "data")
    estimates = []
    measure = save_directory.check_room_for_checkpoint

    def recording(save_dir, needed_bytes):
        estimates.append(needed_bytes)
        measure(save_dir, needed_bytes)

    monkeypatch.setattr(save_directory, "check_room_for_checkpoint", recording)
    saved = tmp_path / "saved"
    assert cli.main(tiny_flags(data_path) + ["--train-iters", "2", "--save", str(saved)]) == 0
    checkpoint = saved / f"iter_{int((saved / TRACKER_FILENAME).read_text()):07d}"
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    [estimate] = estimates
    assert 0.8 * size <= estimate <= size

    class Usage:
        free = estimate - 1

    monkeypatch.setattr(save_directory.shutil, "disk_usage", lambda path: Usage)
    refused = tmp_path / "refused"
    assert cli.main(tiny_flags(data_path) + ["--train-iters", "2", "--save", str(refused)]) \
        == cli.EXIT_CHECKPOINT_REFUSED
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"lst-train: --save {refused} has {(estimate - 1) / 2**20:.1f} MiB "
                              f"free on its filesystem, less than one checkpoint")
    assert not list(refused.glob("iter_*")) and not (refused / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_refuses_a_save_directory_another_run_writes_with_one_line(tmp_path):
    """Each rank stops on the refusal. Rank 0's exit let torchrun end rank 1 before its line,
    when load made rank 1 the slower: here it is slower (it prints 3 s late). The line, the same
    on both ranks, reaches the shared log once (`stop_together.say_why_once`)."""
    save = tmp_path / "run"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + ["--train-iters", "2", "--save",
                                                          str(save)]
    holder = hold_lock(save)
    try:
        output = run_torchrun(2, [WORKERS_DIR / "late_line.py", "train", "--late", "3", *flags],
                              cwd=REPO).output
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert output.count(f"lst-train: --save {save} is being written by another run (holder: "
                        f"pid {holder.pid} ") == 1, output[-3000:]
    assert "[rank1]: Traceback" not in output and "[rank0]: Traceback" not in output
    assert sorted(p.name for p in save.iterdir()) == [LOCK_FILENAME]


def test_a_save_directory_whose_free_space_cannot_be_measured_exits_3_with_one_line(
        tmp_path, monkeypatch, capsys):
    """Measuring the free space (a --save on a mount that went away since the flags were
    checked) raised OSError on rank 0, which exited 1 with a traceback while the other ranks
    stopped with its message."""
    def vanished(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    save = tmp_path / "run"
    monkeypatch.setattr(save_directory.shutil, "disk_usage", vanished)
    assert cli.main(tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "2", "--save", str(save)]) == cli.EXIT_CHECKPOINT_REFUSED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lst-train: --save {save}: the free space of its filesystem cannot be measured (No such "
        f"file or directory at {save}), so a checkpoint could not be saved there either. Check "
        f"that the directory is still there and readable (a mount that went away, a permission "
        f"taken away), or give another --save")
    assert not list(save.glob("iter_*")) and not (save / "metrics.jsonl").exists()


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("in_the_way", ["directory", "fifo"])
def test_a_pointer_file_that_is_not_a_file_is_refused_before_any_work(tmp_path, capsys, resume,
                                                                      in_the_way):
    """A directory (or a pipe) named latest_checkpointed_iteration.txt was taken for no pointer
    at all: the run trained up to its first save, which failed to replace it."""
    save = tmp_path / "run"
    save.mkdir()
    pointer = save / TRACKER_FILENAME
    pointer.mkdir() if in_the_way == "directory" else os.mkfifo(pointer)
    flags = tiny_flags(write_corpus(tmp_path / "data")) + ["--train-iters", "2", "--save",
                                                          str(save)]
    flag = "--load" if resume else "--save"
    assert cli.main(flags + (["--load", str(save)] if resume else [])) == \
        cli.EXIT_CHECKPOINT_REFUSED
    what = "a directory" if in_the_way == "directory" else "not a regular file"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lst-train: {flag} {save}: {pointer} is {what}: lst-train writes the iteration of the "
        f"newest checkpoint into a file of that name, replacing it at each save. Move it out of "
        f"the way (without it, --load finds the newest complete iter_XXXXXXX directory by "
        f"itself)")
    assert sorted(p.name for p in save.iterdir()) == [TRACKER_FILENAME]  # no work done
