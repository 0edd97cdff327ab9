"""A resume on training data rewritten under the same prefix is refused; the same data, copied
elsewhere with other file times, resumes (megatron_lst/training/data_fingerprint.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training import cli
from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
from megatron_lst.training.checkpointing import METADATA_FILENAME
from megatron_lst.training.data_fingerprint import (
    FINGERPRINT_KEY,
    _cheap_fingerprint,
    _group_key,
    _sampled_sha256,
    check_same_training_data,
    dataset_fingerprint,
    idx_digest_groups,
    training_data_fingerprints,
)
from megatron_lst.training.resume_check import ResumeConfigError, ResumePosition
from training.training_cases import tiny_flags, write_corpus, write_store

POSITION = ResumePosition(iteration=3, consumed_samples=12)


def _copy_store(source, target):
    """A node-local copy: same bytes, other path, other modification and access times."""
    for suffix in (".bin", ".idx", ".json"):
        shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")
        os.utime(f"{target}{suffix}", (1_000_000, 1_000_000))
    return target


def test_the_fingerprint_follows_the_contents_not_the_path_or_the_file_times(tmp_path):
    original = write_store(tmp_path / "a" / "speech", "aligned", 20, seed=1)
    (tmp_path / "b").mkdir()
    copy = _copy_store(original, tmp_path / "b" / "speech")
    old, new = dataset_fingerprint(str(original)), dataset_fingerprint(str(copy))
    assert old["prefix"] != new["prefix"]
    assert {k: v for k, v in old.items() if k != "prefix"} == {
        k: v for k, v in new.items() if k != "prefix"}
    assert old["documents"] == 20 and old["kind"] == "aligned"
    assert old["bin_bytes"] == os.path.getsize(f"{original}.bin")
    assert check_same_training_data([old], [new], POSITION, "ckpt/iter_0000003") == []


def test_a_dataset_preprocessed_again_under_the_same_prefix_is_refused_naming_it(tmp_path):
    prefix = write_store(tmp_path / "speech", "aligned", 20, seed=1)
    text = write_store(tmp_path / "text", "text", 20, seed=2)
    saved = training_data_fingerprints([(0.5, str(prefix)), (0.5, str(text))])
    write_store(prefix, "aligned", 25, seed=3)  # other documents, same path
    current = training_data_fingerprints([(0.5, str(prefix)), (0.5, str(text))])
    with pytest.raises(ResumeConfigError) as refusal:
        check_same_training_data(saved, current, POSITION, "ckpt/iter_0000003")
    message = str(refusal.value)
    assert f"dataset {prefix}: " in message and "documents 20 -> 25" in message
    assert str(text) not in message  # the unchanged dataset is not named
    assert "sample 12" in message and "--finetune" in message and "Restore the data" in message


def test_other_ids_at_the_same_lengths_are_refused(tmp_path):
    """Re-tokenized units (another speech tokenizer of the same frame rate) keep every length and
    count: only the sampled .bin digest tells."""
    prefix = write_store(tmp_path / "speech", "aligned", 20, seed=1)
    saved = training_data_fingerprints([(None, str(prefix))])
    data = bytearray((tmp_path / "speech.bin").read_bytes())
    data[-1] ^= 1
    (tmp_path / "speech.bin").write_bytes(bytes(data))
    with pytest.raises(ResumeConfigError, match=r"sampled \.bin sha256 [0-9a-f]{12} -> "):
        check_same_training_data(saved, training_data_fingerprints([(None, str(prefix))]),
                                 POSITION, "ckpt")


def test_the_bin_sample_covers_first_last_and_inner_blocks_of_a_large_file(tmp_path):
    path = tmp_path / "large.bin"
    size = 5 * 1024 * 1024 + 123
    path.write_bytes(bytes(size))
    before = _sampled_sha256(str(path))
    for offset in (0, size - 1, (size - 64 * 1024) * 7 // 15):  # first, last, the 8th block
        with open(path, "r+b") as file:
            file.seek(offset)
            file.write(b"\x01")
        assert _sampled_sha256(str(path)) != before, offset
        with open(path, "r+b") as file:
            file.seek(offset)
            file.write(b"\x00")
    assert _sampled_sha256(str(path)) == before


def test_moved_datasets_are_compared_by_position_and_other_blends_by_prefix(tmp_path):
    speech = write_store(tmp_path / "speech", "aligned", 20, seed=1)
    text = write_store(tmp_path / "text", "text", 20, seed=2)
    saved = training_data_fingerprints([(0.5, str(speech)), (0.5, str(text))])
    # Another blend with only the text dataset, unchanged: nothing to refuse.
    assert check_same_training_data(saved, training_data_fingerprints([(None, str(text))]),
                                    POSITION, "ckpt") == []
    # The same datasets named in the other order: compared by position, refused.
    swapped = training_data_fingerprints([(0.5, str(text)), (0.5, str(speech))])
    with pytest.raises(ResumeConfigError, match=r"text \(trained as .*speech\): kind aligned -> text"):
        check_same_training_data(saved, swapped, POSITION, "ckpt")


def test_a_checkpoint_without_fingerprints_resumes_with_a_note_and_a_damaged_one_is_named():
    [note] = check_same_training_data(None, [], POSITION, "ckpt/iter_0000003")
    assert "records no fingerprint of its training data" in note and "not checked" in note
    with pytest.raises(CheckpointError, match=f"'{FINGERPRINT_KEY}' of its lst_checkpoint.json"):
        check_same_training_data({"speech": 1}, [], POSITION, "ckpt")


@pytest.mark.slow
def test_lst_train_refuses_rewritten_data_and_resumes_a_node_local_copy(tmp_path):
    data = write_corpus(tmp_path / "shared")
    save = tmp_path / "ckpt"
    entry = [sys.executable, "-m", "megatron_lst.training.cli"]

    def run(data_path, iterations):
        return subprocess.run(
            [*entry, *tiny_flags(data_path), "--eval-interval", "1000", "--lr-decay-iters", "6",
             "--train-iters", str(iterations), "--save", str(save), "--load", str(save)],
            capture_output=True, text=True, timeout=300)

    first = run(data, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((find_latest_checkpoint(save) / METADATA_FILENAME).read_text())
    assert [entry["prefix"] for entry in record["extra_state"][FINGERPRINT_KEY]] == [
        data[1], data[3]]

    # The same data on a node-local disk, other paths and file times, is kept for later.
    (tmp_path / "local").mkdir()
    local = ["0.5", str(_copy_store(data[1], tmp_path / "local" / "speech")),
             "0.5", str(_copy_store(data[3], tmp_path / "local" / "text"))]
    # The shared copy is preprocessed again with other documents: refused, exit status 3.
    write_store(tmp_path / "shared" / "speech", "aligned", 70, seed=9)
    refused = run(data, 4)
    assert refused.returncode == cli.EXIT_CHECKPOINT_REFUSED, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert f"dataset {data[1]}: documents 60 -> 70" in last and "Traceback" not in refused.stderr

    resumed = run(local, 4)  # the node-local copy of the checkpoint's data: resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert find_latest_checkpoint(save).name == "iter_0000004"

    # A checkpoint of an older version records no fingerprints: it resumes, saying so.
    metadata = find_latest_checkpoint(save) / METADATA_FILENAME
    record = json.loads(metadata.read_text())
    del record["extra_state"][FINGERPRINT_KEY]
    metadata.write_text(json.dumps(record))
    older = run(local, 6)
    assert older.returncode == 0, older.stderr[-3000:]
    assert "records no fingerprint of its training data" in older.stdout + older.stderr


@pytest.mark.distributed
def test_a_changed_node_local_copy_on_one_rank_stops_every_rank(tmp_path):
    """Each rank reads its own copy (node-local disks): the one whose copy differs refuses, and
    the others refuse with it instead of going on to wait for it in the next collective."""
    shared = write_store(tmp_path / "shared" / "speech", "aligned", 20, seed=1)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(training_data_fingerprints([(None, str(shared))])))
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        _copy_store(shared, tmp_path / f"node{rank}" / "speech")
    per_rank = str(tmp_path / "node{rank}" / "speech")
    worker = TESTS_DIR / "training" / "workers" / "data_check_worker.py"
    same = run_distributed(worker, 2, ["--prefix-per-rank", per_rank, "--saved", str(saved)])
    assert same == [{"refusal": None}, {"refusal": None}]

    write_store(tmp_path / "node1" / "speech", "aligned", 21, seed=1)  # rank 1's copy differs
    refused = run_distributed(worker, 2, ["--prefix-per-rank", per_rank, "--saved", str(saved)])
    for record in refused:
        assert record["refusal"] is not None and record["refusal"].endswith("(on rank 1)")
        assert "documents 20 -> 21" in record["refusal"]


def _copy_key(prefix: str) -> str:
    """The key a rank shares for its copy of the dataset at `prefix`."""
    return _group_key(_cheap_fingerprint(prefix), _sampled_sha256(f"{prefix}.idx"))


def test_ranks_whose_copies_agree_share_one_idx_digest_spread_over_them(tmp_path):
    speech = write_store(tmp_path / "speech", "aligned", 20, seed=1)
    text = write_store(tmp_path / "text", "text", 20, seed=2)
    other = write_store(tmp_path / "other" / "speech", "aligned", 20, seed=1)
    shared = [_copy_key(str(speech)), _copy_key(str(text))]
    elsewhere = _copy_key(str(other))
    assert len({*shared, elsewhere}) == 3  # the prefix is part of the key
    # Ranks 0-2 read one shared filesystem; rank 3 its own copy of speech at another path.
    groups = idx_digest_groups([shared, shared, shared, [elsewhere, shared[1]]])
    assert [(g.key, g.ranks, g.digesting_rank) for g in groups] == [
        (shared[0], (0, 1, 2), 0), (shared[1], (0, 1, 2, 3), 1), (elsewhere, (3,), 3)]
    # The same path holding other data on one node (rank 1): that copy is digested by rank 1.
    write_store(tmp_path / "node1" / "speech", "aligned", 20, seed=5)
    node1 = str(tmp_path / "node1" / "speech")
    changed = _group_key({**_cheap_fingerprint(node1), "prefix": str(speech)},
                         _sampled_sha256(f"{node1}.idx"))
    assert changed != shared[0]
    groups = idx_digest_groups([shared, [changed, shared[1]]])
    assert [(g.key, g.ranks, g.digesting_rank) for g in groups] == [
        (shared[0], (0,), 0), (shared[1], (0, 1), 1), (changed, (1,), 1)]


@pytest.mark.distributed
def test_ranks_on_a_shared_filesystem_digest_each_idx_once(tmp_path):
    speech = write_store(tmp_path / "speech", "aligned", 20, seed=1)
    text = write_store(tmp_path / "text", "text", 20, seed=2)
    worker = TESTS_DIR / "training" / "workers" / "fingerprint_share_worker.py"
    records = run_distributed(worker, 2, ["--prefix", str(speech), "--prefix", str(text),
                                          "--prefix", str(speech)])
    expected = [dataset_fingerprint(str(speech)), dataset_fingerprint(str(text))]
    assert [record["fingerprints"] for record in records] == [expected, expected]
    assert [record["digested"] for record in records] == [[f"{speech}.idx"], [f"{text}.idx"]]

    # Per-node copies at other paths are each fingerprinted as they are, by their own rank.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        _copy_store(speech, tmp_path / f"node{rank}" / "speech")
    write_store(tmp_path / "node1" / "speech", "aligned", 21, seed=1)
    per_rank = str(tmp_path / "node{rank}" / "speech")
    records = run_distributed(worker, 2, ["--prefix", per_rank])
    assert [record["fingerprints"][0]["documents"] for record in records] == [20, 21]
    assert records[1]["fingerprints"][0] == dataset_fingerprint(per_rank.format(rank=1))
    assert [record["digested"] for record in records] == [
        [f"{per_rank.format(rank=rank)}.idx"] for rank in (0, 1)]

    # A rank whose copy cannot be read stops both, naming itself and the file.
    os.remove(tmp_path / "node1" / "speech.idx")
    records = run_distributed(worker, 2, ["--prefix", per_rank])
    for record in records:
        assert record["fingerprints"] is None
        assert "rank 1: " in record["error"] and "node1/speech.idx" in record["error"]
        assert "rank 0" not in record["error"]
