"""Where a run's training and validation rows come from: `--data-path` cut by `--split`, or
whole datasets from `--train-data-path` / `--valid-data-path`."""

import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch

from megatron_lst.data.dataset import DatasetError
from megatron_lst.tokenizer.vocab import VocabularyError
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.data_provider import (
    build_datasets,
    build_loader,
    data_vocab,
    split_bounds,
)
from training.training_cases import VOCAB, tiny_flags, write_corpus, write_store


def documents(dataset):
    """(prefix name, first, stop) of each source of a blended dataset, in blend order."""
    return [(source.store.prefix.rsplit("/", 1)[-1], source.store.start, source.store.stop)
            for source in dataset.datasets]


def with_data(flags, *data):
    """`tiny_flags` with its `--data-path ...` (the last flag with values) replaced by `data`."""
    flags = list(flags)
    at = flags.index("--data-path")
    end = next((i for i in range(at + 1, len(flags)) if flags[i].startswith("--")), len(flags))
    return flags[:at] + flags[end:] + ["--train-iters", "2", *data]


def test_data_path_is_cut_by_split(tmp_path):  # tiny_flags split 90,10,0
    args = validate_args(parse_args(tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]), 1)
    datasets = build_datasets(args)
    assert documents(datasets.train) == [("speech", 0, 54), ("text", 0, 54)]
    assert documents(datasets.valid) == [("speech", 54, 60), ("text", 54, 60)]


def test_train_and_valid_data_paths_are_used_whole(tmp_path):
    train = write_corpus(tmp_path)  # 60 speech and 60 text documents, weights 0.5 each
    held_out = write_store(tmp_path / "held_out", "aligned", 12, seed=3)
    flags = with_data(tiny_flags(train), "--train-data-path", *train,
                      "--valid-data-path", str(held_out))
    datasets = build_datasets(validate_args(parse_args(flags), 1))
    assert documents(datasets.train) == [("speech", 0, 60), ("text", 0, 60)]
    assert documents(datasets.valid) == [("held_out", 0, 12)]
    assert len(datasets.valid) == 4  # --eval-iters 1 x --global-batch-size 4


def test_train_data_path_alone_means_no_validation(tmp_path, caplog):
    flags = with_data(tiny_flags(write_corpus(tmp_path)), "--train-data-path",
                      str(tmp_path / "speech"))
    datasets = build_datasets(validate_args(parse_args(flags), 1))
    assert documents(datasets.train) == [("speech", 0, 60)]
    assert datasets.valid is None
    assert "no --valid-data-path: no validation loss" in caplog.text


def test_eval_iters_zero_means_no_validation_as_in_megatron(tmp_path, caplog):
    # Megatron-LM trains without validation at --eval-iters 0; it was refused ("must be at
    # least 1") and a ported script had to find another way.
    flags = tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2", "--eval-iters", "0"]
    datasets = build_datasets(validate_args(parse_args(flags), 1))
    assert documents(datasets.train) == [("speech", 0, 54), ("text", 0, 54)]
    assert datasets.valid is None
    assert "--eval-iters 0: no validation loss" in caplog.text


def test_the_vocabulary_carries_the_datasets_tokenizer_digest(tmp_path):
    data = write_corpus(tmp_path)  # manifests record the tokenizer sha256 "000...0"
    args = validate_args(parse_args(tiny_flags(data) + ["--train-iters", "2"]), 1)
    assert data_vocab(args).tokenizer_sha256 == "0" * 64
    assert data_vocab(args).to_dict()["tokenizer_sha256"] == "0" * 64  # saved in checkpoints
    manifest = tmp_path / "text.json"
    record = json.loads(manifest.read_text())
    record["tokenizer"]["sha256"] = "1" * 64  # same size, another tokenizer
    manifest.write_text(json.dumps(record))
    with pytest.raises(VocabularyError, match=r"dataset .*text was made with \d+ text pieces and "
                                              r"\d+ speech units, tokenizer sha256 111111111111\.\.\. "
                                              r"but dataset .* sha256 000000000000\.\.\.; preprocess"):
        data_vocab(args)


def test_a_dataset_without_validation_documents_is_left_out_of_validation(tmp_path, caplog):
    data = write_corpus(tmp_path)  # 60 + 60 documents, split 90,10,0: 6 valid documents each
    small = write_store(tmp_path / "small", "aligned", 3, seed=4)  # 10% of 3 rounds to 0
    flags = with_data(tiny_flags(data), "--data-path", *data, "0.5", str(small))
    datasets = build_datasets(validate_args(parse_args(flags), 1))
    assert documents(datasets.train) == [("speech", 0, 54), ("text", 0, 54), ("small", 0, 3)]
    assert documents(datasets.valid) == [("speech", 54, 60), ("text", 54, 60)]
    assert len(datasets.valid) == 4
    assert f"leaves no validation documents in {small} (3 documents): validating on" in caplog.text

    caplog.clear()
    flags = with_data(tiny_flags(data), "--data-path", str(small))
    assert build_datasets(validate_args(parse_args(flags), 1)).valid is None
    assert "leaves no validation documents in any dataset: no validation loss" in caplog.text


def test_each_dataset_is_announced_once_without_the_index_reader_banners(tmp_path, caplog):
    import logging

    from megatron_lst.training.train_logging import QUIET_MEGATRON_LOGGERS

    reader = logging.getLogger(QUIET_MEGATRON_LOGGERS[0])
    level = reader.level
    reader.setLevel(logging.WARNING)  # as `configure_console_logging` does
    try:
        with caplog.at_level(logging.INFO):
            build_datasets(validate_args(parse_args(tiny_flags(write_corpus(tmp_path))
                                                    + ["--train-iters", "2"]), 1))
    finally:
        reader.setLevel(level)
    assert caplog.text.count(f"dataset {tmp_path / 'speech'}: 60 aligned documents") == 1
    assert caplog.text.count(f"dataset {tmp_path / 'text'}: 60 text documents") == 1
    assert "_IndexReader" not in caplog.text


def test_task_rows_come_from_the_same_split_of_the_speech_datasets(tmp_path):
    speech = write_store(tmp_path / "speech", "aligned", 60, seed=1)
    flags = with_data(tiny_flags(["1.0", str(speech)]), "--data-path", str(speech),
                      "--task", "asr", "--seq-length", "400", "--max-tokens", "400",
                      "--max-position-embeddings", "400")
    datasets = build_datasets(validate_args(parse_args(flags), 1))
    assert documents(datasets.train) == [("speech", 0, 54)]
    assert documents(datasets.valid) == [("speech", 54, 60)]
    source = datasets.train.datasets[0]
    assert source.task == "asr" and not datasets.valid.datasets[0].training
    row = datasets.train[0]
    mask = row["loss_mask"]
    assert mask[0] == 0 and mask.sum() > 0  # the prompt carries no loss, the transcript does


def test_task_rows_refuse_a_text_dataset(tmp_path):
    flags = with_data(tiny_flags(write_corpus(tmp_path)), "--data-path", *write_corpus(tmp_path),
                      "--task", "tts")
    with pytest.raises(DatasetError, match="aligned speech dataset"):
        build_datasets(validate_args(parse_args(flags), 1))


def test_speech_only_fraction_reaches_the_training_and_validation_rows(tmp_path):
    flags = tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]
    default = build_datasets(validate_args(parse_args(flags), 1))
    speech_only = build_datasets(validate_args(
        parse_args(flags + ["--speech-only-fraction", "1"]), 1))
    for datasets in (default, speech_only):
        assert [s.interleaver.config.speech_only_fraction
                for split in (datasets.train, datasets.valid) for s in split.datasets] == (
            [0.0] * 4 if datasets is default else [1.0] * 4)
    # Speech-only rows hold no text block; the default's interleaved rows do.
    def text_markers(datasets):
        rows = [datasets.train.datasets[0][i]["tokens"].numpy() for i in range(4)]
        return sum(int((row == datasets.vocab.text_marker).sum()) for row in rows)

    assert text_markers(speech_only) == 0 < text_markers(default)


@pytest.mark.parametrize("content, message", [
    (None, r"--tokenizer-model: .*spm.model: tokenizer not found"),
    (b"junk", r"spm.model: not a SentencePiece model"),
])
def test_a_missing_or_unreadable_tokenizer_is_a_vocabulary_error(tmp_path, content, message):
    tokenizer = tmp_path / "spm.model"
    if content is not None:
        tokenizer.write_bytes(content)
    flags = tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2",
                                                  "--tokenizer-model", str(tokenizer)]
    with pytest.raises(VocabularyError, match=message):  # lst-train: exit 4, one line
        build_datasets(validate_args(parse_args(flags), 1))


def test_datasets_recording_different_word_boundary_pieces_are_a_vocabulary_error(tmp_path):
    data = write_corpus(tmp_path)
    manifest = tmp_path / "text.json"
    record = json.loads(manifest.read_text())
    record["tokenizer"]["space_id"] = 5  # speech.json records none
    manifest.write_text(json.dumps(record))
    args = validate_args(parse_args(tiny_flags(data) + ["--train-iters", "2"]), 1)
    with pytest.raises(VocabularyError, match=r"record different word-boundary pieces"):
        build_datasets(args)  # lst-train: exit 4, one line


def test_aligned_datasets_of_different_frame_rates_are_refused(tmp_path):
    """Units at 50 Hz last half as long as units at 25 Hz: blending them would teach one unit id
    two durations. Text datasets record no rate and blend with either."""
    data = write_corpus(tmp_path)  # speech at 25 Hz, text
    fast = write_store(tmp_path / "fast", "aligned", 60, seed=4)
    manifest = tmp_path / "fast.json"
    record = json.loads(manifest.read_text())
    record["frame_rate"] = 50.0
    manifest.write_text(json.dumps(record))
    args = validate_args(parse_args(tiny_flags([*data, "0.5", str(fast)])
                                    + ["--train-iters", "2"]), 1)
    with pytest.raises(VocabularyError, match=rf"dataset {fast} holds speech units at 50 frames "
                                              rf"per second but dataset .*speech at 25: one unit "
                                              rf"would stand for 20 ms in one and 40 ms"):
        data_vocab(args)
    record["frame_rate"] = 25
    manifest.write_text(json.dumps(record))
    assert data_vocab(args).num_units == VOCAB.num_units


class _SignalledRows(torch.utils.data.Dataset):
    """Rows whose loader worker is sent `sig` while it reads them, as torchrun's SIGTERM (to the
    trainer's process group) and SLURM's signals (to every process of the step) reach it."""

    def __init__(self, sig: signal.Signals):
        self.sig = sig

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), self.sig)
        return torch.tensor(index)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_loader_workers_leave_the_exit_signals_to_the_trainer(monkeypatch, sig):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 1)
    args = argparse.Namespace(micro_batch_size=2, num_workers=2, exit_signal_handler=True,
                              exit_signal=["SIGTERM", "SIGUSR1"], exit_duration_in_mins=None,
                              exit_interval=None, seed=1)
    batches = list(build_loader(_SignalledRows(signal.Signals[sig]), args))
    assert torch.cat(batches).tolist() == list(range(8))


@pytest.mark.parametrize("split", ["1,1,1,97", "98,1,1,0"])
def test_a_split_of_more_than_three_parts_is_refused(split):
    """The fourth share was dropped: 1,1,1,97 trained on a third of every dataset."""
    with pytest.raises(DatasetError, match=rf"--split '{split}': 4 proportions; give at most "
                                           rf"three, for train, valid and test"):
        split_bounds(split, 100)


def write_text_store(prefix, num_documents: int, pieces: int):
    """`num_documents` text documents of `pieces` text pieces each (`BOS <t> pieces EOS` in the
    stream: one patch a token)."""
    from data.document_cases import VOCAB

    from megatron_lst.data.indexed import DocumentWriter
    from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo

    writer = DocumentWriter(prefix, "text")
    for i in range(num_documents):
        writer.add_text(np.full(pieces, 4 + i % (VOCAB.text_size - 4), dtype=np.int32))
    info = TokenizerInfo(path="none", sha256="0" * 64, vocab_size=VOCAB.text_size)
    writer.finalize(Manifest("text", VOCAB.to_dict(), info, VOCAB.num_units, None,
                             Counts(documents=num_documents, text_pieces=num_documents * pieces),
                             ["fixed"]))
    return str(prefix)


@pytest.mark.parametrize("flag, train_documents", [("--data-path", (90, 18)),
                                                   ("--train-data-path", (100, 20))])
def test_datasets_without_weights_are_blended_by_size_as_in_megatron(tmp_path, caplog, flag,
                                                                     train_documents):
    # Megatron-LM weighs a list of prefixes without weights by the datasets' sizes, so that one
    # epoch of the blend is one epoch of every dataset (was refused: "several datasets without
    # weights"). Documents of 11 and 25 pieces are 14 and 28 stream tokens (BOS <t> ... EOS), one
    # patch each: 2 and 4 rows of 7 new tokens (--seq-length 8).
    import logging

    big = write_text_store(tmp_path / "big", 100, 11)
    small = write_text_store(tmp_path / "small", 20, 25)
    rows = [2 * train_documents[0], 4 * train_documents[1]]  # one epoch of each train part
    iters = sum(rows) // 4  # --global-batch-size 4
    flags = with_data(tiny_flags([big]), flag, big, small) + ["--train-iters", str(iters)]
    with caplog.at_level(logging.INFO):
        datasets = build_datasets(validate_args(parse_args(flags), 1))
    train = datasets.train
    assert [len(source) for source in train.datasets] == rows
    np.testing.assert_array_equal(np.bincount(train.dataset_index), rows)
    for source, count in zip(train.datasets, train_documents, strict=True):
        # The last row starts in the last document of the first epoch: each dataset is read
        # once, none of them repeated while another is not finished.
        position, _, _ = source._heads[-1]
        assert position == count - 1
    tokens = [train_documents[0] * 14, train_documents[1] * 28]
    assert (f"train blend of datasets given without weights, weighted by their tokens: "
            f"{big} {tokens[0]} ({tokens[0] / sum(tokens):.4g}), "
            f"{small} {tokens[1]} ({tokens[1] / sum(tokens):.4g})") in caplog.text
    if flag == "--data-path":  # validation blends the valid parts (10 and 2 documents) by size
        assert documents(datasets.valid) == [("big", 90, 100), ("small", 18, 20)]


def test_task_rows_without_weights_are_blended_by_utterances(tmp_path):
    many = write_store(tmp_path / "many", "aligned", 40, seed=5)
    few = write_store(tmp_path / "few", "aligned", 10, seed=6)
    flags = with_data(tiny_flags([str(many)]), "--train-data-path", str(many), str(few),
                      "--task", "asr", "--max-tokens", "256", "--seq-length", "120",
                      "--max-position-embeddings", "256") + ["--train-iters", "5"]
    train = build_datasets(validate_args(parse_args(flags), 1)).train
    assert [len(source) for source in train.datasets] == [16, 4]  # 20 rows, 40:10
