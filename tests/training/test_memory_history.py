"""--record-memory-history (`megatron_lst.training.memory_history`): when the CUDA allocator's
snapshot is written, on which rank, after a failure, and the checks of its flags. The allocator
is a stand-in here (CPU): what is checked is when the loop records and writes."""

import pickle
from pathlib import Path

import pytest
import torch

from megatron_lst.training import loop, memory_history
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.memory_history import MemoryHistory
from training.training_cases import tiny_flags, write_corpus

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3"]


class FakeAllocator:
    """torch.cuda.memory's recorder: its calls, and snapshots that say which iteration took them
    (`iterations` counts the training steps that ran)."""

    def __init__(self):
        self.calls, self.iterations = [], 0

    def record_memory_history(self, enabled="all", **kwargs):
        self.calls.append(("record", enabled, kwargs.get("max_entries")))

    def snapshot(self):
        self.calls.append(("snapshot", self.iterations))
        return {"segments": [], "device_traces": [], "iterations": self.iterations}


@pytest.fixture
def allocator(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", fake.record_memory_history)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", fake.snapshot)
    monkeypatch.setattr(memory_history, "check_cuda_memory_history", lambda args: None)
    train_step = loop.train_step

    def counting_train_step(*args, **kwargs):
        result = train_step(*args, **kwargs)
        fake.iterations += 1
        return result

    monkeypatch.setattr(loop, "train_step", counting_train_step)
    return fake


def _train(tmp_path: Path, *flags: str) -> loop.TrainingResult:
    args = validate_args(parse_args([*tiny_flags(write_corpus(tmp_path)), *flags]), 1)
    return loop.pretrain(args, index_cache_dir=tmp_path / "rows")


def test_a_snapshot_is_written_every_log_interval_and_when_training_ends(tmp_path, allocator,
                                                                         capsys):
    path = tmp_path / "snapshots" / "memory.pickle"  # a directory that does not exist yet
    _train(tmp_path, "--train-iters", "5", "--log-interval", "2", "--record-memory-history",
           "--memory-snapshot-path", str(path))

    assert allocator.calls == [
        ("record", "all", memory_history.MAX_ENTRIES),  # before the first iteration
        ("snapshot", 2), ("snapshot", 4),  # every --log-interval
        ("snapshot", 5),  # the end of training
        ("record", None, None)]  # recording stopped
    assert pickle.loads(path.read_bytes())["iterations"] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["memory.pickle"]  # no partial file
    out = capsys.readouterr().out
    assert f"rank 0: memory snapshot after iteration 2 written to {path}" in out
    assert out.count("memory snapshot") == 2  # the first write and the last, not every one
    assert (f"rank 0: last memory snapshot, at the end of training, after iteration 5, written "
            f"to {path}") in out


def test_the_last_snapshot_is_written_when_training_fails(tmp_path, allocator, monkeypatch):
    """An out-of-memory error is when the snapshot matters most."""
    train_step = loop.train_step

    def out_of_memory_at_3(*args, **kwargs):
        if allocator.iterations == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", out_of_memory_at_3)
    with pytest.raises(torch.OutOfMemoryError):
        _train(tmp_path, "--train-iters", "5", "--log-interval", "10",
               "--record-memory-history", "--save", str(tmp_path / "ckpt"))
    snapshot = tmp_path / "ckpt" / "memory_snapshot.pickle"  # the default path
    assert pickle.loads(snapshot.read_bytes())["iterations"] == 2
    assert allocator.calls[-2:] == [("snapshot", 2), ("record", None, None)]


def test_a_snapshot_that_cannot_be_written_is_dropped_and_training_goes_on(tmp_path, allocator,
                                                                          monkeypatch, capsys):
    path = tmp_path / "memory.pickle"
    path.write_bytes(pickle.dumps({"iterations": "an earlier run's"}))

    def full_disk(obj, file):
        file.write(b"half a snapshot")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory_history.pickle, "dump", full_disk)
    result = _train(tmp_path, "--train-iters", "3", "--log-interval", "1",
                    "--record-memory-history", "--memory-snapshot-path", str(path))
    assert result.iteration == 3
    out = capsys.readouterr().out
    assert (f"rank 0: the memory snapshot after iteration 1 could not be written to {path} "
            f"([Errno 28] No space left on device); training goes on without it") in out
    # the file there is whole (the last one written), and no partial file is left behind
    assert pickle.loads(path.read_bytes()) == {"iterations": "an earlier run's"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("memory")) == [
        "memory.pickle"]


@pytest.mark.parametrize("rank, world_size, records", [(0, 1, True), (3, 4, True),
                                                       (0, 4, False), (2, 4, False)])
def test_only_the_last_rank_records(rank, world_size, records):
    args = parse_args([*BASE, "--record-memory-history", "--memory-snapshot-path", "m.pickle"])
    history = MemoryHistory.from_args(args, 0, rank, world_size)
    assert (history.path is not None) == records


def test_a_rank_that_records_nothing_touches_no_allocator(allocator):
    history = MemoryHistory(None, log_interval=1, first_iteration=0, rank=0)
    history.start()
    history.after_iteration(1)
    history.close(1)
    assert allocator.calls == []


@pytest.mark.parametrize("flags, message", [
    (["--memory-snapshot-path", "m.pickle"],
     r"--memory-snapshot-path only takes effect with --record-memory-history: add "
     r"--record-memory-history or drop it"),
    (["--record-memory-history"],
     r"--record-memory-history writes the allocator's snapshot to --memory-snapshot-path "
     r"\(default: <--save>/memory_snapshot.pickle\): give one of them"),
])
def test_bad_memory_history_flags_are_refused_with_the_fix(flags, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(parse_args([*BASE, *flags]), 1)


def test_a_directory_is_refused_as_the_snapshot_path(tmp_path):
    with pytest.raises(ArgumentError, match=rf"--memory-snapshot-path {tmp_path} is a directory; "
                                            rf"name the snapshot file, e.g. "
                                            rf"{tmp_path}/memory_snapshot.pickle"):
        validate_args(parse_args([*BASE, "--record-memory-history", "--memory-snapshot-path",
                                  str(tmp_path)]), 1)


def test_the_snapshot_path_defaults_under_save(tmp_path):
    args = parse_args([*BASE, "--record-memory-history", "--save", str(tmp_path / "s")])
    memory_history.validate_memory_history(args)
    assert args.memory_snapshot_path == str(tmp_path / "s" / "memory_snapshot.pickle")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_memory_history_is_refused_without_a_gpu(tmp_path):
    with pytest.raises(ArgumentError, match=r"--record-memory-history records the CUDA caching "
                                            r"allocator, and this machine has no CUDA device"):
        validate_args(parse_args([*BASE, "--record-memory-history", "--save",
                                  str(tmp_path)]), 1)


def test_an_unwritable_snapshot_directory_is_refused_before_training(tmp_path, allocator):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ArgumentError, match=r"--memory-snapshot-path's directory .*file/d cannot "
                                            r"be written .*: the memory snapshots go there"):
        validate_args(parse_args([*BASE, "--record-memory-history", "--memory-snapshot-path",
                                  str(blocker / "d" / "m.pickle")]), 1)
