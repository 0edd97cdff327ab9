"""Dist checkpoints in megatron.core 0.19's layout (common state inside the .distcp files, no
common.pt) load under megatron.core 0.16 as under 0.19 (`megatron_lst.checkpoint.mcore_load`).

Where 0.16 is installed the 0.19 layout is written by `checkpoint.mcore_layouts.mcore_019_save`;
where 0.19 is, by megatron.core itself. tests/checkpoint/test_megatron_core_versions.py runs the
real releases against each other.
"""

import json

import pytest
import torch
from distributed.harness import TESTS_DIR, run_distributed
from megatron.core import dist_checkpointing

from checkpoint.mcore_layouts import mcore_019_save, writes_common_pt
from megatron_lst.checkpoint import cli, mcore_load
from megatron_lst.checkpoint.dist import (
    load_dist_checkpoint,
    save_dist_checkpoint,
    training_args_for,
)
from megatron_lst.checkpoint.errors import CheckpointIntegrityError
from megatron_lst.checkpoint.integrity import MANIFEST_FILENAME
from megatron_lst.checkpoint.model_state import build_full_model
from megatron_lst.checkpoint.safe_pickle import read_dcp_metadata
from megatron_lst.models.config import preset
from megatron_lst.tokenizer.vocab import JointVocab

VOCAB = JointVocab(text_size=58)
WORKER = TESTS_DIR / "training" / "workers" / "checkpoint_worker.py"
TINY_RUN = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--hidden-dropout", "0.1",
    "--attention-dropout", "0.1", "--no-reset-attention-mask",
]


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return build_full_model(preset("tiny", VOCAB.size))


@pytest.fixture
def layout_019(single_rank, tmp_path, monkeypatch):
    """A save directory holding one weights-only checkpoint (model seed 1) in the 0.19 layout."""
    if writes_common_pt():
        monkeypatch.setattr(dist_checkpointing, "save", mcore_019_save(dist_checkpointing.save))
    root = tmp_path / "save"
    save_dist_checkpoint(root, tiny_model(1), training_args_for(preset("tiny", VOCAB.size)),
                         VOCAB, 1)
    monkeypatch.undo()
    return root


def test_the_019_layout_has_its_common_state_inside_the_distcp_files(layout_019):
    checkpoint = layout_019 / "iter_0000001"
    assert not (checkpoint / "common.pt").exists()
    assert "common_backend" not in json.loads((checkpoint / "metadata.json").read_text())
    keys = {index.fqn for index in read_dcp_metadata(checkpoint).storage_data}
    assert mcore_load.COMMON_STATE_ITEM in keys
    assert isinstance(mcore_load.read_common_state_item(checkpoint), dict)


def test_a_model_in_the_019_layout_loads_and_verifies(layout_019, capsys):
    """megatron.core 0.16 read only common.pt, and failed on this layout with `AttributeError:
    'str' object has no attribute 'iterdir'` inside its own error path."""
    model = tiny_model(99)
    load_dist_checkpoint(layout_019 / "iter_0000001", model, VOCAB)
    expected = tiny_model(1).state_dict()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, expected[name]), name
    assert cli.main(["verify", "--load", str(layout_019)]) == 0
    assert "OK" in capsys.readouterr().out


def test_a_checkpoint_without_any_common_state_is_named(single_rank, tmp_path):
    """No common.pt and no common-state item (a 0.16 checkpoint that lost its common.pt, its
    metadata.json rewritten too): named, instead of megatron's AttributeError."""
    if not writes_common_pt():
        pytest.skip("megatron.core 0.19 reads the common state itself")
    old_layout = tmp_path / "old"
    save_dist_checkpoint(old_layout, tiny_model(1), training_args_for(preset("tiny", VOCAB.size)),
                         VOCAB, 1)
    damaged = old_layout / "iter_0000001"
    (damaged / "common.pt").unlink()
    (damaged / MANIFEST_FILENAME).unlink()
    (damaged / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                       "sharded_backend_version": 1}))
    with pytest.raises(CheckpointIntegrityError, match=r"holds no common state: neither "
                       r"common\.pt \(megatron\.core 0\.16\) nor the item 'common_state/shard_0_1'"):
        load_dist_checkpoint(damaged, tiny_model(2), VOCAB)


def test_a_damaged_common_state_item_is_named(layout_019):
    checkpoint = layout_019 / "iter_0000001"
    metadata = read_dcp_metadata(checkpoint)
    [info] = [info for index, info in metadata.storage_data.items()
              if index.fqn == mcore_load.COMMON_STATE_ITEM]
    distcp = checkpoint / info.relative_path
    data = bytearray(distcp.read_bytes())
    data[info.offset:info.offset + info.length] = b"\0" * info.length
    distcp.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError,
                       match=r"\(object 'common_state/shard_0_1'\) is damaged"):
        mcore_load.read_common_state_item(checkpoint)


@pytest.mark.distributed
def test_a_training_checkpoint_in_the_019_layout_resumes_bit_for_bit(tmp_path):
    """Model, Adam moments and step, learning-rate schedule and RNG states come back from the
    0.19 layout exactly, and the resumed run follows the straight run's losses."""
    if not writes_common_pt():
        pytest.skip("megatron.core 0.19 writes this layout itself: every checkpoint test covers it")
    save = tmp_path / "ckpt"
    run = [*TINY_RUN, "--train-iters", "5", "--save", str(save)]
    [straight] = run_distributed(WORKER, 1, [*run, "--save-at", "3", "--verify-round-trip",
                                             "--mcore-019-layout"])
    assert straight["round_trip_mismatches"] == []
    assert not (save / "iter_0000003" / "common.pt").exists()
    [resumed] = run_distributed(WORKER, 1, [*run, "--load", str(save)])
    assert resumed["resumed_from"] == 3
    assert resumed["losses"] == {k: straight["losses"][k] for k in ("4", "5")}
