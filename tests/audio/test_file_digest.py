"""Hashing a user's input file to key a cache or record its provenance (the unit extraction's
codebook, the demo corpus's --text-files): read in blocks, never whole (a file of many GB), and
only a regular file, by the input-files rule (hashing a FIFO took its bytes from its reader)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from data.input_cases import fifo_with_writer

from megatron_lst.audio.codebook import CodebookError
from megatron_lst.audio.extract import ExtractConfig, _check_units_record
from megatron_lst.data import input_files
from megatron_lst.data.input_files import regular_file_sha256
from megatron_lst.demo_corpus import build as build_module
from megatron_lst.demo_corpus.build import DemoCorpusConfig


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
def test_the_digest_read_in_blocks_is_that_of_the_whole_bytes(tmp_path, monkeypatch, size):
    """Blocks of 64 bytes: files of none, one partial, one whole and several blocks."""
    monkeypatch.setattr(input_files, "HASH_BLOCK_BYTES", 64)
    data = bytes(range(256)) * 4
    path = tmp_path / "file.bin"
    path.write_bytes(data[:size])
    assert regular_file_sha256(path, ValueError, "file") == hashlib.sha256(data[:size]).hexdigest()
    assert input_files.streamed_sha256(path) == (size, hashlib.sha256(data[:size]).hexdigest())


def test_a_file_is_never_read_whole(tmp_path, monkeypatch):
    """Each read asks for one block at most: `Path.read_bytes` held a whole units or audio file."""
    monkeypatch.setattr(input_files, "HASH_BLOCK_BYTES", 64)
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 1000)
    asked: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, size=-1):
            asked.append(size)
            return self.stream.read(size)

    monkeypatch.setattr("builtins.open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    regular_file_sha256(path, ValueError, "file")
    assert asked and all(0 < size <= 64 for size in asked)


def _extract_units_record(codebook):
    config = ExtractConfig("hubert", str(codebook), str(codebook.parent / "units"))
    _check_units_record(config, type("Codebook", (), {"num_units": 4})(), [])


def _demo_corpus_key(text_file):
    config = replace(DemoCorpusConfig(), text_files=(str(text_file),))
    # the text files are hashed before the feature extractor is asked for its key
    build_module._build(text_file.parent / "corpus", config, None, False)


@pytest.mark.parametrize(("caller", "error", "what"), [
    (_extract_units_record, CodebookError, "codebook file"),
    (_demo_corpus_key, ValueError, "--text-files file"),
])
def test_a_fifo_or_directory_is_refused_naming_it_before_a_byte_is_read(tmp_path, caller, error,
                                                                        what):
    with fifo_with_writer(tmp_path / "fifo", b"payload") as fifo:
        with pytest.raises(error, match=rf"^{fifo}: is a FIFO \(named pipe\), not a file; pass "
                                        rf"the {what} as a regular file"):
            caller(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(error, match=rf"^{folder}: is a directory, not a file"):
        caller(folder)
