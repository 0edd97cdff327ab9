"""Crafted checkpoint files: a portable checkpoint's lst_config.json, and a dist checkpoint's
lst_manifest.json and lst_checkpoint.json, are refused naming the file and what is wrong, never read as other data nor
failing with a raw traceback."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from data.input_cases import fifo_with_writer

from megatron_lst.checkpoint.errors import CheckpointError, CheckpointIntegrityError
from megatron_lst.checkpoint.integrity import (
    MANIFEST_FILENAME,
    MEGATRON_CONFIG_FILENAME,
    FileRecord,
    inspect_checkpoint,
    read_manifest,
    write_manifest,
)
from megatron_lst.checkpoint.model_state import CheckpointContentError, lst_config_to_dict
from megatron_lst.checkpoint.portable import CONFIG_FILENAME, FORMAT, FORMAT_VERSION, load_portable
from megatron_lst.checkpoint.record_files import MAX_POINTER_FILE_BYTES, MAX_RECORD_FILE_BYTES
from megatron_lst.checkpoint.reference import read_reference_model_args
from megatron_lst.checkpoint.safe_pickle import (
    DCP_METADATA_FILENAME,
    MAX_DCP_INDEX_BYTES,
    read_dcp_metadata,
)
from megatron_lst.data.input_files import MAX_SMALL_FILE_BYTES
from megatron_lst.models.config import preset
from megatron_lst.models.reference_config import ReferenceImportError
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.checkpoint_discovery import read_tracker
from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata
from megatron_lst.training.checkpointing import FORMAT_VERSION as FORMAT_VERSION_OF_CHECKPOINTS
from megatron_lst.training.checkpointing import METADATA_FILENAME, TRACKER_FILENAME

VOCAB = JointVocab(text_size=58)
SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def _write_portable_config(directory, lst_config: dict, vocab: JointVocab) -> None:
    """A portable checkpoint's config alone: these are refused before its weights are read."""
    (directory / CONFIG_FILENAME).write_text(json.dumps(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "lst_config": lst_config,
         "vocab": vocab.to_dict()}))


def test_a_damaged_lst_config_names_the_config_file(tmp_path):
    """It named the field alone (`lst-convert portable-to-dist: global_model: unknown field(s)
    ['kv_channe;s']`), not the file among the user's checkpoints."""
    lst_config = lst_config_to_dict(preset("tiny", VOCAB.size))
    lst_config["global_model"]["kv_channe;s"] = lst_config["global_model"].pop("kv_channels")
    _write_portable_config(tmp_path, lst_config, VOCAB)
    with pytest.raises(CheckpointContentError, match=(
            rf"^{tmp_path / CONFIG_FILENAME}: 'lst_config' does not describe a model "
            r"\(global_model: unknown field\(s\) \['kv_channe;s'\]")):
        load_portable(tmp_path)


def test_a_vocab_that_does_not_fit_the_lst_config_names_the_config_file(tmp_path):
    """It was "vocabulary of 561 ids does not fit the model's vocab_size 563", naming no file,
    and only once the weights were read."""
    _write_portable_config(tmp_path, lst_config_to_dict(preset("tiny", VOCAB.size)),
                           JointVocab(text_size=56))
    with pytest.raises(CheckpointContentError, match=(
            rf"^{tmp_path / CONFIG_FILENAME}: 'vocab' has {VOCAB.size - 2} ids but 'lst_config' "
            rf"a vocab_size of {VOCAB.size}")):
        load_portable(tmp_path)


@pytest.mark.parametrize("size, sha256, problem", [
    # int() of these was an OverflowError, out of every caller's except
    ("Infinity", f'"{SHA256}"', "the size of 'a.bin' is inf"),
    ("1e400", f'"{SHA256}"', "the size of 'a.bin' is inf"),
    # read as the sizes 5, 5, 1 and -1, then reported as files of another size than recorded
    ('"5"', f'"{SHA256}"', "the size of 'a.bin' is '5'"),
    ("5.7", f'"{SHA256}"', "the size of 'a.bin' is 5.7"),
    ("true", f'"{SHA256}"', "the size of 'a.bin' is True"),
    ("-1", f'"{SHA256}"', "the size of 'a.bin' is -1"),
    # str() of a list or a number, a digest no file has
    ("5", '["x"]', "the sha256 of 'a.bin' is ['x']"),
    ("5", "12", "the sha256 of 'a.bin' is 12"),
    ("5", '"abc"', "the sha256 of 'a.bin' is 'abc'"),
])
def test_a_manifest_entry_of_another_type_is_refused_naming_the_manifest(tmp_path, size, sha256,
                                                                          problem):
    path = tmp_path / MANIFEST_FILENAME
    path.write_text('{"format_version": 1, "algorithm": "sha256", "files": {"a.bin": '
                    f'{{"size": {size}, "sha256": {sha256}}}}}}}')
    with pytest.raises(CheckpointIntegrityError) as caught:
        read_manifest(tmp_path)
    assert str(caught.value).startswith(f"cannot read {path}: {problem}")


def test_a_manifest_as_saved_reads(tmp_path):
    (tmp_path / MANIFEST_FILENAME).write_text(json.dumps(
        {"format_version": 1, "algorithm": "sha256",
         "files": {"a.bin": {"size": 5, "sha256": SHA256}}}))
    assert read_manifest(tmp_path) == {"a.bin": FileRecord(5, SHA256)}


def _write_training_metadata(directory, iteration=10, **extra) -> None:
    """A lst_checkpoint.json as a training save writes it (its model and flags left empty)."""
    directory.mkdir()
    extra_state = {"consumed_samples": 40, "tokens": 640, "curriculum_step": iteration,
                   "flops": {"encoder": 1.0, "global": 2.0, "decoder": 3.0,
                             "cross_attention": 4.0, "head": 5.0, "total": 15.0}, **extra}
    (directory / METADATA_FILENAME).write_text(json.dumps(
        {"format_version": FORMAT_VERSION_OF_CHECKPOINTS, "iteration": iteration,
         "extra_state": extra_state, "scheduler": {}, "sharded_state_metadata": {},
         "parallel_layout": {}, "vocab": None, "args": {}}))


def test_a_training_position_as_saved_reads(tmp_path):
    _write_training_metadata(tmp_path / "iter_0000010")
    assert read_checkpoint_metadata(tmp_path / "iter_0000010")["extra_state"]["tokens"] == 640


@pytest.mark.parametrize("iteration, extra, field", [
    # int() in the resume: a ValueError, an OverflowError, a TypeError
    (10, {"consumed_samples": "abc"}, "'extra_state.consumed_samples' ('abc')"),
    (10, {"consumed_samples": float("inf")}, "'extra_state.consumed_samples' (inf)"),
    (10, {"tokens": None}, "'extra_state.tokens' (None)"),
    # read as 2 and 1 samples, a position no save wrote
    (10, {"consumed_samples": 2.5}, "'extra_state.consumed_samples' (2.5)"),
    (10, {"consumed_samples": True}, "'extra_state.consumed_samples' (True)"),
    (10, {"consumed_samples": -8}, "'extra_state.consumed_samples' (-8)"),
    (-1, {}, "'iteration' (-1)"),
    (True, {}, "'iteration' (True)"),
    # FlopBreakdown(**...) in the resume: a KeyError, a TypeError; NaN summed into every report
    (10, {"flops": {"encoder": 1.0}}, "'extra_state.flops' ({'encoder': 1.0})"),
    (10, {"flops": [1.0]}, "'extra_state.flops' ([1.0])"),
    (10, {"flops": {"encoder": "1", "global": 2, "decoder": 3, "cross_attention": 4,
                    "head": 5}}, "'extra_state.flops' ({'encoder': '1'"),
    (10, {"flops": {"encoder": float("nan"), "global": 2, "decoder": 3, "cross_attention": 4,
                    "head": 5}}, "'extra_state.flops' ({'encoder': nan"),
])
def test_a_training_position_that_no_save_writes_is_refused_naming_it(tmp_path, iteration,
                                                                        extra, field):
    checkpoint = tmp_path / "iter_0000010"
    _write_training_metadata(checkpoint, iteration, **extra)
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint_metadata(checkpoint)
    assert str(refused.value).startswith(
        f"{checkpoint / METADATA_FILENAME} is damaged: field(s) {field}"), str(refused.value)


def test_a_megatron_config_with_an_integer_past_the_digit_limit_is_a_damaged_file(tmp_path):
    """json.loads raises a plain ValueError for it, which the check took for a checkpoint its
    storage could not read (CheckpointUnreadableError), not a damaged file among the others."""
    checkpoint = tmp_path / "iter_0000001"
    checkpoint.mkdir()
    config = checkpoint / MEGATRON_CONFIG_FILENAME
    config.write_text(f'{{"common_backend": "torch", "x": {"1" * (sys.get_int_max_str_digits() + 1)}}}')
    report = inspect_checkpoint(checkpoint)
    assert f"{config} is missing or damaged: Exceeds the limit" in report.problems[-1]


@pytest.mark.parametrize("digits", [sys.get_int_max_str_digits() + 1, 20])
def test_a_pointer_file_of_an_iteration_past_int64_is_refused_naming_it(tmp_path, digits):
    """int() of more digits than Python converts was a raw ValueError naming no file (such a
    file is larger than any pointer file too, unless Python's digit limit is set below 1 KiB)."""
    tracker = tmp_path / TRACKER_FILENAME
    tracker.write_text("9" * digits + "\n")
    with pytest.raises(CheckpointError, match=rf"^{tracker}( should hold an iteration number, "
                                              r"found '9999|: is [\d,]+ bytes, more than any "
                                              r"checkpoint pointer file)"):
        read_tracker(tmp_path)


def test_a_pointer_file_as_saved_reads(tmp_path):
    (tmp_path / TRACKER_FILENAME).write_text(f"{2**63 - 1}\n")
    assert read_tracker(tmp_path) == 2**63 - 1


# The records a load reads whole: the file's name, its reader given the folder, what it raises.
RECORD_READERS = [
    (METADATA_FILENAME, read_checkpoint_metadata, CheckpointError),
    (MANIFEST_FILENAME, read_manifest, CheckpointIntegrityError),
    (CONFIG_FILENAME, load_portable, CheckpointContentError),
]


@pytest.mark.parametrize("name, read, error", RECORD_READERS)
def test_a_checkpoint_record_that_is_a_fifo_is_refused_naming_it(tmp_path, name, read, error):
    """Opening it waited for a writer: the load hung, silently (a FIFO manifest was taken for
    none, and the checkpoint's files went unchecked)."""
    with fifo_with_writer(tmp_path / name, b"{}") as fifo:
        with pytest.raises(error, match=rf"^{re.escape(str(fifo))}: is a FIFO \(named pipe\)"):
            read(tmp_path)


def test_a_megatron_config_that_is_a_fifo_is_a_problem_naming_it(tmp_path):
    with fifo_with_writer(tmp_path / MEGATRON_CONFIG_FILENAME, b"{}") as fifo:
        problems = inspect_checkpoint(tmp_path).problems
    assert f"{fifo}: is a FIFO (named pipe), not a file" in problems[-1], problems


@pytest.mark.parametrize("name, read, error, max_bytes", [
    *((name, read, error, MAX_RECORD_FILE_BYTES) for name, read, error in RECORD_READERS),
    (TRACKER_FILENAME, read_tracker, CheckpointError, MAX_POINTER_FILE_BYTES),
])
def test_a_checkpoint_record_larger_than_any_save_writes_is_refused_unread(tmp_path, name, read,
                                                                          error, max_bytes):
    """It was read whole (a file of many GB into memory) before its content was judged."""
    with open(tmp_path / name, "wb") as record:
        record.truncate(max_bytes + 1)  # sparse: no disk
    with pytest.raises(error, match=rf"^{re.escape(str(tmp_path / name))}: is "
                                    rf"{max_bytes + 1:,} bytes, more than any"):
        read(tmp_path)


def test_a_megatron_config_larger_than_any_save_writes_is_a_problem_naming_it(tmp_path):
    config = tmp_path / MEGATRON_CONFIG_FILENAME
    with open(config, "wb") as record:
        record.truncate(MAX_RECORD_FILE_BYTES + 1)
    problems = inspect_checkpoint(tmp_path).problems
    assert f"{config}: is {MAX_RECORD_FILE_BYTES + 1:,} bytes, more than any" in problems[-1]


# The other whole-file reads of a checkpoint: the reference's model args (params.json or its
# training YAML) and a dist checkpoint's index (`.metadata`), the file each reads, its bound.
OTHER_WHOLE_FILE_READERS = [
    ("params.json", lambda folder: read_reference_model_args(folder / "params.json"),
     ReferenceImportError, MAX_SMALL_FILE_BYTES),
    ("run.yaml", lambda folder: read_reference_model_args(folder / "run.yaml"),
     ReferenceImportError, MAX_SMALL_FILE_BYTES),
    (DCP_METADATA_FILENAME, read_dcp_metadata, CheckpointIntegrityError, MAX_DCP_INDEX_BYTES),
]


@pytest.mark.parametrize("name, read, error, max_bytes", OTHER_WHOLE_FILE_READERS)
def test_a_reference_args_file_or_checkpoint_index_that_is_a_fifo_is_refused(tmp_path, name,
                                                                             read, error,
                                                                             max_bytes):
    """Opening it waited for a writer: the import or load hung, silently."""
    with fifo_with_writer(tmp_path / name, b"{}") as fifo:
        with pytest.raises(error, match=rf"^{re.escape(str(fifo))}: is a FIFO \(named pipe\)"):
            read(tmp_path)


@pytest.mark.parametrize("name, read, error, max_bytes", OTHER_WHOLE_FILE_READERS)
def test_a_reference_args_file_or_checkpoint_index_too_large_is_refused_unread(tmp_path, name,
                                                                               read, error,
                                                                               max_bytes):
    """It was read whole (a file of many GB into memory) before its content was judged."""
    with open(tmp_path / name, "wb") as record:
        record.truncate(max_bytes + 1)  # sparse: no disk
    with pytest.raises(error, match=rf"^{re.escape(str(tmp_path / name))}: is "
                                    rf"{max_bytes + 1:,} bytes, more than any"):
        read(tmp_path)


@pytest.mark.parametrize("make", [lambda path: path.mkdir(), os.mkfifo], ids=["folder", "fifo"])
def test_a_listed_file_that_is_no_regular_file_is_named_so_not_missing(tmp_path, make):
    """A FIFO or a folder in place of a file the manifest lists was reported "missing", which
    sent the user looking for a file that is there."""
    write_manifest(tmp_path, {"a.distcp": FileRecord(2, SHA256)})
    make(tmp_path / "a.distcp")
    problems = inspect_checkpoint(tmp_path).problems
    kind = "a directory" if (tmp_path / "a.distcp").is_dir() else r"a FIFO \(named pipe\)"
    assert re.match(rf"{re.escape(str(tmp_path / 'a.distcp'))} is not a regular file \({kind}\)",
                    problems[0]), problems
