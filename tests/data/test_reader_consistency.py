"""The readers of training inputs follow the rules of their siblings: the TextGrid corpus finds
its files through linked folders as the audio corpus does (`folder_walk.files_under`), and a
corpus JSONL line that gives a key twice is refused as an evaluation item's is
(`json_objects.loads_unique_keys`)."""

from __future__ import annotations

import errno
import json
import os
import re

import numpy as np
import pytest
from tool_modules import load_tool

from megatron_lst.audio.corpus import CorpusError, read_audio_dir
from megatron_lst.data.document_parsing import SEGMENT_SEP
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.folder_walk import files_under
from megatron_lst.data.jsonl_corpus import read_reference_jsonl, read_text_jsonl
from megatron_lst.data.read_report import ReadReport
from megatron_lst.data.textgrid import Interval, write_textgrid
from megatron_lst.data.textgrid_corpus import textgrid_utterances, unit_files_without_textgrid


def _utterance(grids, units, relative: str) -> None:
    (grids / relative).parent.mkdir(parents=True, exist_ok=True)
    (units / relative).parent.mkdir(parents=True, exist_ok=True)
    write_textgrid(grids / f"{relative}.TextGrid", [Interval(0.0, 1.0, "hello")])
    np.save(units / f"{relative}.npy", np.arange(25))


def test_textgrids_and_unit_files_in_linked_folders_are_found_once(tmp_path):
    """A TextGrid corpus assembled from symlinks to speakers' folders lost the linked speakers
    without a word (`Path.rglob` does not follow links), where the audio corpus follows them; a
    link back up (a loop) is walked once."""
    grids, units, elsewhere = tmp_path / "grids", tmp_path / "units", tmp_path / "elsewhere"
    _utterance(grids, units, "spk1/a")
    _utterance(elsewhere / "grids", elsewhere / "units", "spk2/b")
    _utterance(elsewhere / "grids", elsewhere / "units", "spk3/c")
    for kind, root in (("grids", grids), ("units", units)):
        (root / "spk2").symlink_to(elsewhere / kind / "spk2", target_is_directory=True)
        (root / "spk1" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (units / "spk3").symlink_to(elsewhere / "units" / "spk3", target_is_directory=True)
    utterances = textgrid_utterances(grids, units)
    assert utterances == [(grids / "spk1" / "a.TextGrid",), (grids / "spk2" / "b.TextGrid",)]
    # spk3's units have no TextGrid: named, not left out because they lie behind a link
    assert unit_files_without_textgrid(grids, units, utterances) == [units / "spk3" / "c.npy"]


def test_the_audio_and_textgrid_corpora_walk_a_folder_alike(tmp_path):
    """One folder of audio and TextGrids side by side (an aligner's corpus) gives both readers
    the same utterances, linked folders included."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    for root, relative in ((corpus, "spk1/a"), (elsewhere, "spk2/b")):
        (root / relative).parent.mkdir(parents=True)
        write_textgrid(root / f"{relative}.TextGrid", [Interval(0.0, 1.0, "hello")])
        (root / f"{relative}.wav").write_bytes(b"")  # listed, not read
    (corpus / "spk2").symlink_to(elsewhere / "spk2", target_is_directory=True)
    audio_ids = [utterance.id for utterance in read_audio_dir(corpus)]
    textgrid_ids = [path.relative_to(corpus).with_suffix("").as_posix()
                    for path, in textgrid_utterances(corpus, corpus)]
    assert audio_ids == textgrid_ids == ["spk1/a", "spk2/b"]


def test_a_folder_linked_at_several_places_is_walked_at_the_lexically_first(tmp_path):
    """Which place a folder reached twice was read at followed the order the file system lists
    a folder in; its files' paths (the utterance ids, the unit files' relative paths) with it."""
    root = tmp_path / "corpus"
    (root / "zz_real").mkdir(parents=True)
    (root / "zz_real" / "u.TextGrid").write_bytes(b"")
    for name in ("a_link", "m_link", "q_link", "c_link", "k_link", "e_link", "x_link"):
        (root / name).symlink_to(root / "zz_real", target_is_directory=True)
    assert list(files_under(root, DocumentError)) == [root / "a_link" / "u.TextGrid"]


def _corpus_with_a_second_speaker(root):
    for speaker in ("spk1", "spk2"):
        (root / speaker).mkdir(parents=True)
        write_textgrid(root / speaker / "a.TextGrid", [Interval(0.0, 1.0, "hello")])
        (root / speaker / "a.wav").write_bytes(b"")  # listed, not read


def _both_corpora(root):
    return (lambda: read_audio_dir(root), CorpusError), \
           (lambda: textgrid_utterances(root, root), DocumentError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its permissions")
def test_a_folder_the_user_cannot_read_is_an_error_not_a_hole_in_the_corpus(tmp_path):
    """A speaker's folder of mode 000 was left out of both corpora without a word."""
    root = tmp_path / "corpus"
    _corpus_with_a_second_speaker(root)
    (root / "spk2").chmod(0)
    try:
        for read, error in _both_corpora(root):
            with pytest.raises(error, match=r"spk2: cannot list the folder \(Permission denied\)"
                                            r".*make it readable.*or move it out of"):
                read()
    finally:
        (root / "spk2").chmod(0o755)


def test_a_folder_the_storage_cannot_list_is_an_error_naming_it(tmp_path, monkeypatch):
    """An I/O error listing a folder (a failing disk, a stale network mount) left its files out
    of both corpora without a word; a missing corpus folder is still the readers' own "none
    found"."""
    root = tmp_path / "corpus"
    _corpus_with_a_second_speaker(root)
    list_folder = os.scandir

    def failing_scandir(path="."):
        if os.fspath(path) == os.fspath(root / "spk2"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return list_folder(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    for read, error in _both_corpora(root):
        with pytest.raises(error, match=rf"spk2: cannot list the folder \({os.strerror(errno.EIO)}"
                                        rf"\).*make it readable.*or move it out of"):
            read()
    assert list(files_under(tmp_path / "absent", DocumentError)) == []


def _reference(words: str) -> str:
    return "".join(f"{SEGMENT_SEP}TEXT {word} {SEGMENT_SEP}HUBERT 1 2" for word in words.split())


@pytest.mark.parametrize("read, key, good, twice", [
    (read_text_jsonl, "text", json.dumps({"text": "hello world"}), '{"text": "a", "text": "b"}'),
    (read_reference_jsonl, "interleaved", json.dumps({"interleaved": _reference("the time")}),
     f'{{"interleaved": "{_reference("a")}", "file_id": "u", "interleaved": "{_reference("b")}"}}'),
])
def test_a_corpus_line_that_gives_a_key_twice_is_a_bad_document(tmp_path, tokenizer, read, key,
                                                                 good, twice):
    """It was read as the key's last value, silently, where an evaluation item that gives a key
    twice is refused; under --skip-bad it is skipped and tallied by its kind."""
    path = tmp_path / "corpus.jsonl"
    path.write_text(f"{good}\n{twice}\n{good}\n")
    with pytest.raises(DocumentError, match=rf"^{re.escape(str(path))}:2: the key {key!r} "
                                            r"appears twice in one object") as refused:
        list(read(path, tokenizer))
    assert refused.value.kind == "key given twice"
    report = ReadReport()
    sources = list(read(path, tokenizer, skip_bad=True, report=report))
    assert [source.where for source in sources] == [f"{path}:1", f"{path}:3"]
    assert [(skip.where, skip.kind) for skip in report.skipped] == [
        (f"{path}:2", "key given twice")]


def test_a_tokenizer_corpus_line_that_gives_a_key_twice_is_named(tmp_path):
    """tools/train_tokenizer.py trained on the key's last value, silently."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": "a", "text": "b"}\n')
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(corpus))}:2: the key 'text' appears "
                                         r"twice in one object"):
        load_tool("train_tokenizer").main([
            "--input", str(corpus), "--input-format", "text-jsonl", "--vocab-size", "100",
            "--output", str(tmp_path / "spm.model")])
    assert not (tmp_path / "spm.model").exists()
