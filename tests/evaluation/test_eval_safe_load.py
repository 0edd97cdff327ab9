"""`lst-eval --load` on a checkpoint whose `.metadata` was crafted to run a shell command when
unpickled: refused, naming the file, and the command never runs."""

import json
import os
import pickle

import pytest
from eval_cases import random_records, save_tiny_checkpoint

from megatron_lst.checkpoint.integrity import record_checkpoint_files, write_manifest
from megatron_lst.evaluation.eval_cli import eval_main
from megatron_lst.parallel import destroy_parallel, initialize_parallel


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted_checkpoint(tmp_path):
    initialize_parallel(seed=3)
    try:
        checkpoint, _, _ = save_tiny_checkpoint(tmp_path / "save")
    finally:
        destroy_parallel()
    marker = tmp_path / "pwned"
    index = checkpoint / ".metadata"
    crafted = pickle.dumps(RunsAShellCommand(marker))
    index.write_bytes(crafted + b"\0" * (index.stat().st_size - len(crafted)))
    write_manifest(checkpoint, record_checkpoint_files(checkpoint))  # a forger updates digests
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f"{json.dumps(r)}\n" for r in random_records(5, 2)))
    return tmp_path / "save", items, marker


def test_lst_eval_refuses_a_crafted_metadata_without_running_it(crafted_checkpoint, capsys):
    save, items, marker = crafted_checkpoint
    assert eval_main(["--load", str(save), "--items", str(items)]) == 2
    error = capsys.readouterr().err
    assert "iter_0000003/.metadata asks to build posix.system" in error
    assert "unpickling it could run code, so it is refused" in error
    assert not marker.exists(), "the crafted pickle ran"
