"""The corpus readers read their inputs by one rule each: the TextGrid corpus finds its files
through linked folders as the audio corpus does (`folder_walk.files_under`)."""

from __future__ import annotations

import numpy as np

from megatron_lst.audio.corpus import read_audio_dir
from megatron_lst.data.folder_walk import files_under
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
    assert list(files_under(root)) == [root / "a_link" / "u.TextGrid"]
