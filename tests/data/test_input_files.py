"""The one rule for the user's input files (megatron_lst/data/input_files.py): a whole-file reader
takes only a regular file, a line reader takes a pipe too but no line longer than any document's;
each refuses with its own error naming the file, before reading (or opening) what it refuses."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from input_cases import fifo_with_writer
from tool_modules import load_tool

from megatron_lst.audio.audio_io import AudioError, audio_info, read_audio
from megatron_lst.audio.codebook import CodebookError, load_codebook
from megatron_lst.audio.corpus import CorpusError, read_tsv
from megatron_lst.audio.hubert import HubertFeatures, wants_normalized_input
from megatron_lst.data import input_files
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import MAX_LINE_CHARACTERS, bounded_lines
from megatron_lst.data.jsonl_corpus import read_text_jsonl
from megatron_lst.data.manifest import Manifest, ManifestError
from megatron_lst.data.textgrid import Interval, TextGridError, read_textgrid, write_textgrid
from megatron_lst.data.textgrid_corpus import read_textgrid_corpus
from megatron_lst.data.unit_files import load_units
from megatron_lst.evaluation.items import ItemError, load_items
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer

# (reader, the error it raises, the file name it reads); each reads one whole file.
WHOLE_FILE_READERS = {
    "items": (lambda path: load_items(path, None, None), ItemError, "items.jsonl"),
    "textgrid": (read_textgrid, TextGridError, "a.TextGrid"),
    "units-txt": (load_units, DocumentError, "a.txt"),
    "units-npy": (load_units, DocumentError, "a.npy"),
    "manifest": (lambda path: Manifest.load(path.with_suffix("")), ManifestError, "data.json"),
    "audio": (read_audio, AudioError, "a.wav"),
    "audio-info": (audio_info, AudioError, "a.wav"),
    "tsv": (read_tsv, CorpusError, "list.tsv"),
    "codebook": (load_codebook, CodebookError, "km.npy"),  # a FIFO was "no such codebook"
    # A FIFO was "tokenizer not found"; a device was hashed forever.
    "tokenizer": (load_text_tokenizer, FileNotFoundError, "spm.model"),
    "hubert-config": (lambda path: _hubert_features(path.parent), ValueError, "config.json"),
    "hubert-preprocessor": (lambda path: wants_normalized_input(path.parent, "group"), ValueError,
                            "preprocessor_config.json"),
}


def _hubert_features(model_dir: Path) -> HubertFeatures:
    pytest.importorskip("transformers")
    return HubertFeatures(model_dir)


@pytest.mark.parametrize("name", WHOLE_FILE_READERS)
def test_a_fifo_is_refused_by_name_before_it_is_opened(tmp_path, name):
    """Opening a FIFO blocks until a writer comes (`lst-eval --items` on a forgotten named pipe
    waited forever); with a writer, a reader read what came through it as the file."""
    read, error, filename = WHOLE_FILE_READERS[name]
    with fifo_with_writer(tmp_path / filename, b"") as fifo, pytest.raises(
            error, match=rf"{fifo}: is a FIFO \(named pipe\), not a file; pass the .+ as a "
                         rf"regular file"):
        read(fifo)


@pytest.mark.parametrize("fifo_name", ["a.TextGrid", "a.npy", "a.txt"])
def test_a_corpus_file_that_is_a_fifo_is_named_as_one(tmp_path, fifo_name):
    """A unit file that is a FIFO was "no unit file"; a TextGrid that is one was left out of
    the corpus without a word."""
    textgrids, units = tmp_path / "g", tmp_path / "u"
    textgrids.mkdir()
    units.mkdir()
    if fifo_name == "a.TextGrid":
        (units / "a.txt").write_text("1 2 3\n")
    else:
        write_textgrid(textgrids / "a.TextGrid", [Interval(0.0, 1.0, "hello")])
    with fifo_with_writer((units if fifo_name != "a.TextGrid" else textgrids) / fifo_name, b""
                          ) as fifo, pytest.raises(
            DocumentError, match=rf"{fifo}: is a FIFO \(named pipe\), not a file"):
        list(read_textgrid_corpus(textgrids, units, None))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
@pytest.mark.parametrize("name", WHOLE_FILE_READERS)
def test_a_device_is_refused_by_name_before_it_is_read(tmp_path, name):
    """`lst-eval --items /dev/zero` read (and allocated) forever."""
    read, error, filename = WHOLE_FILE_READERS[name]
    link = tmp_path / filename
    link.symlink_to("/dev/zero")
    with pytest.raises(error, match=rf"{link}: is a character device, not a file"):
        read(link)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_corpus_that_is_a_device_is_refused_but_a_pipe_is_read(tmp_path):
    with pytest.raises(DocumentError, match=r"/dev/zero: is a character device, not a file; pass "
                                            r"the corpus as a regular file"):
        list(read_text_jsonl("/dev/zero", None))


# The readers whose first read of their file is `input_files.read_bounded_bytes`.
BOUNDED_READERS = ("items", "textgrid", "units-txt", "manifest", "tsv", "hubert-config")


@pytest.mark.parametrize("name", BOUNDED_READERS)
@pytest.mark.parametrize("failure", [errno.EACCES, errno.EIO])
def test_a_file_that_cannot_be_read_is_refused_by_name(tmp_path, monkeypatch, name, failure):
    """A file the user may not read, or whose storage fails, was an OSError traceback out of
    every reader but --config's. Root reads any file: the open fails as it would for another
    user."""
    read, error, filename = WHOLE_FILE_READERS[name]
    path = tmp_path / filename
    path.write_bytes(b"x")

    def refused(file, *args, **kwargs):
        raise OSError(failure, os.strerror(failure), str(file))

    monkeypatch.setattr(input_files, "open", refused, raising=False)
    with pytest.raises(error, match=rf"{path}: cannot read the .+ \({os.strerror(failure)}\); "
                                    rf"make it readable by the user running the job"):
        read(path)


def test_a_line_longer_than_any_document_is_refused_at_its_line():
    lines = bounded_lines(io.StringIO("short\n" + "x" * 11 + "\nshort\n"), "c.jsonl",
                          DocumentError, max_characters=10)
    assert next(lines) == "short\n"
    with pytest.raises(DocumentError, match=r"c.jsonl:2: a line longer than 10 characters"):
        next(lines)
    ten = bounded_lines(io.StringIO("x" * 9 + "\n"), "c.jsonl", DocumentError, max_characters=10)
    assert list(ten) == ["x" * 9 + "\n"]


def test_a_piped_corpus_of_one_endless_line_is_refused_at_the_bound(tmp_path):
    """`--input <(cat /dev/zero)` or a binary file without line ends: a line was read whole, the
    whole input, into memory; the corpus stops at the line bound, naming the line."""
    with fifo_with_writer(tmp_path / "corpus.jsonl", b"\x00" * (MAX_LINE_CHARACTERS + 1)
                          ) as fifo, pytest.raises(DocumentError, match=rf"{fifo}:1: a line longer "
                                                   rf"than {MAX_LINE_CHARACTERS:,} characters"):
        list(read_text_jsonl(fifo, None))


@pytest.mark.parametrize("tool, arguments", [
    ("preprocess_data", ["--input-format", "text-jsonl", "--tokenizer-model", "spm.model",
                         "--output-prefix", "out"]),
    ("train_tokenizer", ["--input-format", "text-jsonl", "--output", "spm.model"]),
])
def test_the_corpus_tools_name_an_input_that_is_no_regular_file(tmp_path, tool, arguments):
    """`--input <(zcat corpus.jsonl.gz)` or `--input /dev/zero` was refused as "no such file"."""
    with fifo_with_writer(tmp_path / "corpus.jsonl", b"") as fifo, pytest.raises(
            SystemExit, match=rf"^--input {fifo}: is a FIFO \(named pipe\), not a file; pass the "
                              rf"corpus as a regular file$"):
        load_tool(tool).main(["--input", str(fifo), *arguments])
