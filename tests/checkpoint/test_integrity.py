"""Loading checkpoints safely: file digests recorded at save time, crafted pickles refused before
anything of them runs, truncated files named with the way back to an older checkpoint, diverged
weights never saved, and `lst-convert verify`."""

import argparse
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from checkpoint.mcore_layouts import writes_common_pt
from megatron_lst.checkpoint import cli, durable_files, integrity
from megatron_lst.checkpoint.dist import (
    load_dist_checkpoint,
    save_dist_checkpoint,
    training_args_for,
)
from megatron_lst.checkpoint.errors import CheckpointError, CheckpointIntegrityError
from megatron_lst.checkpoint.integrity import (
    MANIFEST_FILENAME,
    inspect_checkpoint,
    record_checkpoint_files,
    write_manifest,
)
from megatron_lst.checkpoint.model_state import build_full_model
from megatron_lst.checkpoint.safe_pickle import read_dcp_metadata
from megatron_lst.models.config import preset
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpoint_load import load_checkpoint
from megatron_lst.training.checkpoint_save import CheckpointSaveError, NonFiniteWeightsError
from megatron_lst.training.checkpointing import METADATA_FILENAME, TRACKER_FILENAME
from megatron_lst.training.resume_check import ResumeConfigError

VOCAB = JointVocab(text_size=58)
# What lst-eval's loader passes: weights only, no optimizer.
# The smallest lst-train command line, for the flag checks of a resumed run.
TRAINING_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                  "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3",
                  "--patching-mode", "static", "--max-tokens", "64"]
WEIGHTS_ONLY = argparse.Namespace(finetune=False, no_load_optim=True, no_load_rng=True,
                                  ckpt_step=None)


class RunsAShellCommand:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_crafted_payload_runs_when_unpickled_plainly(tmp_path):
    """The control for the refusals below: a plain unpickler runs it."""
    pickle.loads(pickle.dumps(RunsAShellCommand(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_full_model(preset("tiny", VOCAB.size))


@pytest.fixture(scope="module")
def saved(single_rank, tmp_path_factory):
    """A save directory with checkpoints of iterations 1 and 2 (different weights)."""
    root = tmp_path_factory.mktemp("saved")
    config = preset("tiny", VOCAB.size)
    for iteration in (1, 2):
        save_dist_checkpoint(root, tiny_model(iteration), training_args_for(config), VOCAB, iteration)
    return root


@pytest.fixture
def save_dir(saved, tmp_path):
    """A private copy of `saved` for a test to damage."""
    copy = tmp_path / "save"
    shutil.copytree(saved, copy)
    return copy


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_weights_of(model, seed: int) -> None:
    expected = weights(tiny_model(seed))
    for name, tensor in weights(model).items():
        assert torch.equal(tensor, expected[name]), name


# megatron.core 0.16 saves a checkpoint's common state in common.pt; 0.19 inside the .distcp files.
WRITES_COMMON_PT = writes_common_pt()


def test_save_records_every_file_and_verify_passes(saved, capsys):
    checkpoint = saved / "iter_0000002"
    manifest = json.loads((checkpoint / MANIFEST_FILENAME).read_text())
    listed = set(manifest["files"])
    assert {".metadata", "metadata.json"} <= listed
    assert ("common.pt" in listed) == WRITES_COMMON_PT
    assert any(name.endswith(".distcp") for name in listed)
    assert listed == {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILENAME, "lst_checkpoint.json"}
    assert cli.main(["verify", "--load", str(saved)]) == 0
    assert f"{checkpoint}: OK ({len(listed)} files" in capsys.readouterr().out


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_manifest_version_that_only_equals_1_is_refused(tmp_path, version):
    """JSON true and 1.0 equal 1 in Python, yet no save writes them."""
    (tmp_path / MANIFEST_FILENAME).write_text(json.dumps(
        {"format_version": version, "algorithm": "sha256", "files": {}}))
    with pytest.raises(CheckpointIntegrityError, match=f"format {version!r}, algorithm 'sha256'"):
        integrity.read_manifest(tmp_path)


@pytest.mark.parametrize("forger_rewrites_manifest", [False, True])
def test_crafted_metadata_is_refused_without_running_it(save_dir, tmp_path, forger_rewrites_manifest):
    checkpoint = save_dir / "iter_0000002"
    marker = tmp_path / "pwned"
    index = checkpoint / ".metadata"
    crafted = pickle.dumps(RunsAShellCommand(marker))  # padded: pickle stops at its STOP opcode
    index.write_bytes(crafted + b"\0" * (index.stat().st_size - len(crafted)))
    if forger_rewrites_manifest:  # digests catch damage, not a forger: the unpickler must hold
        write_manifest(checkpoint, record_checkpoint_files(checkpoint))
    expected = ("refused" if forger_rewrites_manifest else
                r"\.metadata has changed since it was saved")

    # The loader of lst-eval / lst-generate (training's load_checkpoint) and of lst-convert.
    with pytest.raises(CheckpointIntegrityError, match=expected):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)
    with pytest.raises(CheckpointIntegrityError, match=expected):
        load_dist_checkpoint(checkpoint, tiny_model(), VOCAB)
    assert cli.main(["verify", "--load", str(save_dir)]) == 1
    assert not marker.exists(), "the crafted pickle ran"
    if forger_rewrites_manifest:
        with pytest.raises(CheckpointIntegrityError, match=r"posix\.system|os\.system"):
            load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)


def test_crafted_object_in_a_distcp_file_is_refused_without_running_it(single_rank, tmp_path):
    """ShardedObjects (RNG states, _extra_state) come back through torch.load(weights_only=False)
    inside torch's planner: the check reads them with weights_only=True first."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "crafted"
    checkpoint.mkdir()
    dist_checkpointing.save({"rng_state": ShardedObject("rng_state", RunsAShellCommand(marker),
                                                        (1,), (0,), replica_id=0)}, str(checkpoint))
    write_manifest(checkpoint, record_checkpoint_files(checkpoint))
    report = inspect_checkpoint(checkpoint)
    assert len(report.problems) == 1
    assert "object 'rng_state/shard_0_1'" in report.problems[0]
    assert "beyond tensors and plain data" in report.problems[0]
    assert "GLOBAL posix.system" in report.problems[0]
    assert not marker.exists()


def test_an_index_pointing_outside_the_checkpoint_is_refused(save_dir):
    checkpoint = save_dir / "iter_0000002"
    index = read_dcp_metadata(checkpoint)
    for info in index.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(index))
    write_manifest(checkpoint, record_checkpoint_files(checkpoint))
    [problem] = inspect_checkpoint(checkpoint).problems
    assert "points outside the checkpoint directory ('../../outside.distcp')" in problem


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_manifest_naming_files_outside_the_checkpoint_is_refused(save_dir, monkeypatch, kind):
    """A crafted manifest whose records match files beyond the checkpoint directory: those
    files are named as the problem and never read (hashing them would leak whether they hold
    what the forger guessed)."""
    checkpoint = save_dir / "iter_0000002"
    outside = save_dir / "outside.bin"
    outside.write_bytes(b"not part of the checkpoint")
    name = "../outside.bin" if kind == "relative" else str(outside)
    manifest = json.loads((checkpoint / MANIFEST_FILENAME).read_text())
    record = integrity.digest_file(outside)
    manifest["files"][name] = {"size": record.size, "sha256": record.sha256}
    (checkpoint / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    hashed = []
    real_digest = integrity.digest_file
    monkeypatch.setattr(integrity, "digest_file", lambda p: hashed.append(p) or real_digest(p))

    [problem] = inspect_checkpoint(checkpoint).problems
    assert f"lists names outside the checkpoint directory [{name!r}]" in problem
    assert str(checkpoint / MANIFEST_FILENAME) in problem
    assert hashed == []
    with pytest.raises(CheckpointIntegrityError, match="outside the checkpoint directory"):
        load_dist_checkpoint(checkpoint, tiny_model(), VOCAB)


@pytest.mark.parametrize("name", ["metadata.json", ".metadata"])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_file_replaced_by_a_link_to_a_file_outside_is_refused(save_dir, name, with_manifest):
    """A listed name that is a symbolic link (here to an identical copy outside, so size and
    digest match) would be read wherever it points. Without a manifest (a checkpoint saved
    before manifests) the link was followed: the checkpoint verified and loaded."""
    checkpoint = save_dir / "iter_0000002"
    listed = checkpoint / name
    outside = save_dir / "elsewhere"
    shutil.copy(listed, outside)
    listed.unlink()
    listed.symlink_to(outside)
    if not with_manifest:
        (checkpoint / MANIFEST_FILENAME).unlink()
    report = inspect_checkpoint(checkpoint)
    assert report.has_manifest == with_manifest
    assert report.problems == (f"{listed} is a symbolic link (to {outside}); a save writes only "
                               f"plain files, so it was not read",)
    with pytest.raises(CheckpointIntegrityError, match=rf"{re.escape(str(listed))} is a "
                                                       rf"symbolic link"):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)


def largest_distcp(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncated_file_is_named_and_an_older_checkpoint_loads(save_dir, capsys, with_manifest):
    newest = save_dir / "iter_0000002"
    broken = largest_distcp(newest)
    broken.write_bytes(broken.read_bytes()[:1000])
    if not with_manifest:  # saved before manifests: the checkpoint index still names the file
        (newest / MANIFEST_FILENAME).unlink()

    with pytest.raises(CheckpointIntegrityError) as refused:
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)
    message = str(refused.value)
    assert f"{broken} is truncated: 1000 bytes" in message
    assert f"Load another one with --load {save_dir} --ckpt-step 1" in message
    assert cli.main(["verify", "--load", str(save_dir)]) == 1
    assert f"FAILED {broken} is truncated" in capsys.readouterr().out

    # Megatron-LM's --ckpt-step, and --load naming the iteration directory, pick the older one.
    for load, step in ((save_dir, 1), (save_dir / "iter_0000001", None)):
        model = tiny_model(seed=99)
        args = argparse.Namespace(**{**vars(WEIGHTS_ONLY), "ckpt_step": step})
        loaded = load_checkpoint(load, [model], None, None, args, VOCAB)
        assert loaded.path == save_dir / "iter_0000001"
        assert_weights_of(model, seed=1)
    assert cli.main(["verify", "--load", str(save_dir), "--ckpt-step", "1"]) == 0


@pytest.mark.parametrize(("damage", "expected"), [
    pytest.param(lambda c: (c / "common.pt").unlink(), r"common\.pt is missing; megatron stores",
                 marks=pytest.mark.skipif(not WRITES_COMMON_PT, reason="this megatron.core "
                                          "keeps the common state in the .distcp files")),
    (lambda c: (c / "metadata.json").write_text("{bad"), r"metadata\.json is missing or damaged"),
    (lambda c: (c / "metadata.json").write_text("[]"), r"metadata\.json holds a JSON list"),
])
def test_megatron_files_a_manifest_would_catch_are_named_without_one(save_dir, damage, expected):
    """A checkpoint saved before manifests: megatron's own config and common state are checked
    too, not left to fail inside megatron with a traceback."""
    newest = save_dir / "iter_0000002"
    (newest / MANIFEST_FILENAME).unlink()
    damage(newest)
    with pytest.raises(CheckpointIntegrityError, match=expected):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)


def test_changed_byte_is_caught_by_the_digest(save_dir):
    broken = largest_distcp(save_dir / "iter_0000002")
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=f"{broken} has changed since it was saved"):
        load_dist_checkpoint(save_dir / "iter_0000002", tiny_model(), VOCAB)


def test_a_file_added_after_the_save_is_named(save_dir):
    checkpoint = save_dir / "iter_0000002"
    shutil.copy(largest_distcp(checkpoint), checkpoint / "__7_0.distcp")
    with pytest.raises(CheckpointIntegrityError, match=r"does not list.*\['__7_0\.distcp'\]"):
        load_dist_checkpoint(checkpoint, tiny_model(), VOCAB)


def test_diverged_weights_are_not_saved(saved, tmp_path):
    save_dir = tmp_path / "save"
    shutil.copytree(saved, save_dir)
    model = tiny_model()
    with torch.no_grad():
        model.output_layer.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as refused:
        save_dist_checkpoint(save_dir, model, training_args_for(model.lst_config), VOCAB, 3)
    message = str(refused.value)
    assert "iteration 3: weight output_layer.weight holds NaN or infinity" in message
    assert f"The newest checkpoint, {save_dir / 'iter_0000002'} (iteration 2)" in message
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "iter_0000001", "iter_0000002", TRACKER_FILENAME]


@pytest.mark.parametrize("iteration", [2, 0])
def test_a_save_at_or_behind_an_existing_checkpoint_is_refused(save_dir, iteration):
    """Iteration 2 would overwrite a checkpoint; iteration 0 would move the pointer behind
    iteration 2, which resuming loads instead."""
    model = tiny_model()
    with pytest.raises(CheckpointError, match=rf"already holds .*'iter_0000002'\]; refusing "
                                              rf"to save iteration {iteration}"):
        save_dist_checkpoint(save_dir, model, training_args_for(model.lst_config), VOCAB,
                             iteration)
    assert (save_dir / TRACKER_FILENAME).read_text() == "2"
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "iter_0000001", "iter_0000002", TRACKER_FILENAME]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _writers_failed(*args, **kwargs):
    raise CheckpointException("write", {0: (OSError(errno.ENOSPC, "No space left on device"),
                                            None)})


@pytest.mark.parametrize(("where", "name", "failure"), [
    (integrity, "write_manifest", _disk_full),
    (dist_checkpointing, "save", _writers_failed),
])
def test_a_failed_save_is_explained_and_the_previous_checkpoint_stays(save_dir, monkeypatch,
                                                                      where, name, failure):
    monkeypatch.setattr(where, name, failure)
    model = tiny_model()
    with pytest.raises(CheckpointSaveError) as failed:
        save_dist_checkpoint(save_dir, model, training_args_for(model.lst_config), VOCAB, 3)
    message = str(failed.value)
    assert f"saving the checkpoint of iteration 3 into {save_dir} failed (" in message
    assert "No space left on device" in message and "MiB free on the filesystem" in message
    assert "Checkpoints saved before are untouched" in message
    assert (save_dir / TRACKER_FILENAME).read_text() == "2"
    [interrupted] = save_dir.glob("iter_0000003.tmp-*")
    assert f"Remove the interrupted save {interrupted.name}" in message
    monkeypatch.undo()
    loaded = load_checkpoint(save_dir, [model], None, None, WEIGHTS_ONLY, VOCAB)
    assert loaded.path == save_dir / "iter_0000002"
    assert_weights_of(model, seed=2)


def test_a_failed_pointer_update_says_the_checkpoint_is_complete_and_how_to_load_it(
        save_dir, monkeypatch, caplog):
    """Only the pointer file failed, after the rename: the message said to remove the
    interrupted save, yet the checkpoint was complete under its final name."""
    monkeypatch.setattr(durable_files, "replace_file_durably", _disk_full)
    model = tiny_model(seed=3)
    with pytest.raises(CheckpointSaveError) as failed:
        save_dist_checkpoint(save_dir, model, training_args_for(model.lst_config), VOCAB, 3)
    tracker = save_dir / TRACKER_FILENAME
    assert str(failed.value).startswith(
        f"the checkpoint of iteration 3 is complete at {save_dir / 'iter_0000003'}, but "
        f"updating {tracker} failed (OSError: [Errno 28] No space left on device; ")
    assert str(failed.value).endswith(
        f"): {TRACKER_FILENAME} still names iteration 2. --load {save_dir} finds the newest "
        f"complete checkpoint by itself (warning that the pointer names an older one), or "
        f"write 3 into {tracker}")
    monkeypatch.undo()
    assert tracker.read_text() == "2"
    loaded = load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)
    assert loaded.path == save_dir / "iter_0000003"
    assert "names iteration 2 but the complete checkpoint iter_0000003 is newer" in caplog.text


def test_a_rank_whose_writers_did_not_fail_says_another_ranks_did(save_dir, monkeypatch):
    """torch.distributed.checkpoint tells only the failing ranks why: the others' message read
    'failed ()'."""
    def others_failed(*args, **kwargs):
        raise CheckpointException("write", {})

    monkeypatch.setattr(dist_checkpointing, "save", others_failed)
    model = tiny_model()
    with pytest.raises(CheckpointSaveError, match=r"into .* failed \(another rank's checkpoint "
                                                  r"writers failed; its message says why\); "):
        save_dist_checkpoint(save_dir, model, training_args_for(model.lst_config), VOCAB, 3)
    assert (save_dir / TRACKER_FILENAME).read_text() == "2"


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m.pop("args"), "'args' (missing)"),
    (lambda m: m.update(extra_state=None), "'extra_state' (NoneType)"),
    (lambda m: m.update(iteration="2"), "'iteration' (str)"),
    (lambda m: m["vocab"].update(num_units="16"),
     "'vocab' (vocabulary field(s) 'num_units' (str) are not integers)"),
    (lambda m: m.update(model=[]), "'model' (list)"),
])
def test_checkpoint_metadata_with_a_field_missing_or_mistyped_is_named(save_dir, edit, named,
                                                                      capsys):
    """lst_checkpoint.json is written after the manifest: no digest catches its damage."""
    checkpoint = save_dir / "iter_0000002"
    metadata = json.loads((checkpoint / METADATA_FILENAME).read_text())
    edit(metadata)
    (checkpoint / METADATA_FILENAME).write_text(json.dumps(metadata))
    expected = (rf"{METADATA_FILENAME} is damaged: field\(s\) {re.escape(named)} are not what a "
                rf"save writes.* \(complete ones: \[1\]\)")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)
    assert cli.main(["verify", "--load", str(save_dir)]) == 1
    assert re.search(f"FAILED .*{expected}", capsys.readouterr().out)


def test_a_resume_that_breaks_the_data_position_is_refused_before_loading(save_dir):
    checkpoint = save_dir / "iter_0000002"
    metadata = json.loads((checkpoint / METADATA_FILENAME).read_text())
    metadata["args"].update(global_batch_size=8, train_iters=10)
    metadata["extra_state"] = {"consumed_samples": 16}
    (checkpoint / METADATA_FILENAME).write_text(json.dumps(metadata))
    training = argparse.Namespace(**{**metadata["args"], "global_batch_size": 4,
                                     "finetune": False, "no_load_optim": False,
                                     "no_load_rng": False, "ckpt_step": None})
    with pytest.raises(ResumeConfigError, match="consumed 16 samples in 2 iterations of 8"):
        # A placeholder optimizer: the flags are refused before it (or any file) is read.
        load_checkpoint(save_dir, [tiny_model()], object(), None, training, VOCAB)


def test_help_says_which_checkpoints_are_safe_to_accept_from_others():
    text = cli.build_parser().format_help()
    assert "portable (model.safetensors + lst_config.json)  safe to accept from anyone" in text
    assert "dist checkpoints (lst-train --save)             hold pickles" in text


def test_data_of_another_vocabulary_of_the_same_size_is_refused(save_dir):
    """Only the sizes were compared: data with 1 more text piece and 1 unit fewer (every unit id
    one off) or made with another tokenizer of the same size loaded the checkpoint silently."""
    checkpoint = save_dir / "iter_0000002"
    metadata = json.loads((checkpoint / METADATA_FILENAME).read_text())
    metadata["vocab"]["tokenizer_sha256"] = "a" * 64
    (checkpoint / METADATA_FILENAME).write_text(json.dumps(metadata))
    shifted = JointVocab(VOCAB.text_size + 1, VOCAB.num_units - 1, tokenizer_sha256="a" * 64)
    assert shifted.size == VOCAB.size
    with pytest.raises(VocabularyError, match=rf"iter_0000002 was made with 58 text pieces and "
                                              rf"502 speech units \({VOCAB.size} ids\) but this "
                                              rf"run's data has 59 and 501"):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, shifted)
    other_tokenizer = JointVocab(VOCAB.text_size, tokenizer_sha256="b" * 64)
    with pytest.raises(VocabularyError, match=r"tokenizer of sha256 aaaaaaaaaaaa... but this run's "
                                              r"data with the one of sha256 bbbbbbbbbbbb..."):
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, other_tokenizer)
    model = tiny_model()
    # The same tokenizer, and data that records no digest, load.
    for same in (JointVocab(VOCAB.text_size, tokenizer_sha256="a" * 64), VOCAB):
        assert load_checkpoint(save_dir, [model], None, None, WEIGHTS_ONLY, same).iteration == 2
    assert_weights_of(model, seed=2)


def test_advice_for_a_damaged_newest_checkpoint_leads_to_a_run_that_saves_there_again(save_dir):
    """`--ckpt-step` alone is refused with the same --save while the damaged checkpoint is newer
    than where the run starts; the error says to move it aside, and after that move the run's
    flags pass."""
    newest = save_dir / "iter_0000002"
    broken = largest_distcp(newest)
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(CheckpointIntegrityError) as refused:
        load_checkpoint(save_dir, [tiny_model()], None, None, WEIGHTS_ONLY, VOCAB)
    aside = save_dir / "damaged_iter_0000002"
    assert f"mv {newest} {aside}" in str(refused.value)

    resume = [*TRAINING_FLAGS, "--load", str(save_dir), "--ckpt-step", "1", "--save", str(save_dir)]
    with pytest.raises(ArgumentError, match=r"already holds \['iter_0000002'\]"):
        validate_args(parse_args(resume), 1)
    newest.rename(aside)
    assert validate_args(parse_args(resume), 1).resume_from == str(save_dir / "iter_0000001")
    assert aside.is_dir()  # kept


def test_a_damaged_older_checkpoint_gets_no_advice_to_move_it(save_dir):
    older = save_dir / "iter_0000001"
    broken = largest_distcp(older)
    broken.write_bytes(broken.read_bytes()[:1000])
    args = argparse.Namespace(**{**vars(WEIGHTS_ONLY), "ckpt_step": 1})
    with pytest.raises(CheckpointIntegrityError) as refused:
        load_checkpoint(save_dir, [tiny_model()], None, None, args, VOCAB)
    message = str(refused.value)
    assert f"--load {save_dir} --ckpt-step 2" in message
    assert "mv " not in message


def _checkpoint_with_manifest(directory: Path) -> Path:
    """A directory of two files and their manifest: enough for the digest check."""
    directory.mkdir()
    for name in ("a.distcp", "b.distcp"):
        (directory / name).write_bytes(name.encode())
    write_manifest(directory, record_checkpoint_files(directory))
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("unreadable, error", [
    ("files", "its files (CheckpointIntegrityError: cannot read {checkpoint}/b.distcp (OSError: "
              "[Errno 5] Input/output error))"),
    ("manifest", "its manifest (CheckpointIntegrityError: {checkpoint}/lst_manifest.json: cannot "
                 "read the checkpoint file manifest (Input/output error); make it readable by "
                 "the user running the job (and check its storage), or give another)"),
])
def test_a_file_one_rank_cannot_read_stops_every_rank_naming_it(tmp_path, unreadable, error):
    """At load, a rank that could not hash its share of the files, or read the manifest (EIO,
    a permission), stopped alone, leaving the other ranks waiting for it in the gather of the
    digests' problems."""
    from distributed.harness import TESTS_DIR, run_distributed

    checkpoint = _checkpoint_with_manifest(tmp_path / "iter_0000002")
    ranks = run_distributed(TESTS_DIR / "checkpoint" / "verify_share_worker.py", 2,
                            ["--checkpoint", str(checkpoint), "--unreadable", unreadable],
                            timeout=300)
    expected = ["CheckpointUnreadableError",
                f"checkpoint {checkpoint} could not be checked and is not loaded: rank 1 could "
                f"not read {error.format(checkpoint=checkpoint)}"]
    assert ranks == [expected, expected]


_EIO = "OSError: [Errno 5] Input/output error"
_INDEX_AND_STATE = "read its index, common state and config"


@pytest.mark.distributed
@pytest.mark.parametrize("unreadable, failing_rank, error", [
    ("listing", 0, f"list its files ({_EIO}: '{{checkpoint}}')"),
    ("index", 0, f"{_INDEX_AND_STATE} ({_EIO}: '{{checkpoint}}/.metadata')"),
    ("bounds", 0, f"{_INDEX_AND_STATE} ({_EIO}: '{{checkpoint}}/__0_0.distcp')"),
    ("common", 0, f"{_INDEX_AND_STATE} ({_EIO}: '{{checkpoint}}/common.pt')"),
    ("config", 0, f"{_INDEX_AND_STATE} ({_EIO}: '{{checkpoint}}/metadata.json')"),
    # each rank reads the index it shares the byte items of
    ("index", 1, f"read its objects ({_EIO}: '{{checkpoint}}/.metadata')"),
    ("stale-index", 1, "read its objects (CheckpointIntegrityError: {checkpoint}/.metadata "
                       "lists other objects here than rank 0 read in it (the file changed during "
                       "the check, or this node sees a stale copy of it): check again once every "
                       "node sees the same file)"),
    # what rank 0 alone reads and shares: rank 1 does not take the step
    ("listing", 1, None),
    ("bounds", 1, None),
    ("common", 1, None),
    ("config", 1, None),
])
def test_a_check_one_rank_fails_alone_ends_alike_on_every_rank(save_dir, unreadable,
                                                               failing_rank, error):
    """Listing the directory, reading the index, common.pt and metadata.json were steps each
    rank took alone: one rank failing one (EIO) stopped alone or returned problems while the
    others waited for it in the gather of the byte items' problems. A rank reading an index
    other than rank 0's (a stale copy) checked other byte items than the ones it was given."""
    from distributed.harness import TESTS_DIR, run_distributed

    checkpoint = save_dir / "iter_0000002"
    ranks = run_distributed(TESTS_DIR / "checkpoint" / "verify_share_worker.py", 2,
                            ["--checkpoint", str(checkpoint), "--unreadable", unreadable,
                             "--failing-rank", str(failing_rank)], timeout=300)
    expected = None if error is None else [
        "CheckpointUnreadableError",
        f"checkpoint {checkpoint} could not be checked and is not loaded: rank {failing_rank} "
        f"could not {error.format(checkpoint=checkpoint)}"]
    assert ranks == [expected, expected]


def test_a_file_that_cannot_be_read_is_named_in_one_line(tmp_path, monkeypatch):
    checkpoint = _checkpoint_with_manifest(tmp_path / "iter_0000002")

    def unreadable(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(integrity, "digest_file", unreadable)
    with pytest.raises(CheckpointIntegrityError, match=re.escape(
            f"rank 0 could not read its files (CheckpointIntegrityError: cannot read "
            f"{checkpoint / 'a.distcp'} (OSError: [Errno 5] Input/output error))")):
        integrity.verify_checkpoint(checkpoint)
