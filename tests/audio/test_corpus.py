import pytest
from audio.audio_cases import tone

from megatron_lst.audio.audio_io import write_wav
from megatron_lst.audio.corpus import (
    CorpusError,
    read_audio_dir,
    read_transcripts,
    read_tsv,
    write_mfa_corpus,
)


def _wav(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, tone(8000, 0.1, 0), 8000)
    return path


def test_librispeech_layout(tmp_path):
    chapter = tmp_path / "103" / "1240"
    for n in range(2):
        _wav(chapter / f"103-1240-000{n}.wav")
    (chapter / "103-1240.trans.txt").write_text(
        "103-1240-0000 CHAPTER ONE\n\n103-1240-0001 MISSUS RACHEL LYNDE\n")
    utterances = read_transcripts(tmp_path)
    assert [(u.id, u.text) for u in utterances] == [
        ("103/1240/103-1240-0000", "CHAPTER ONE"), ("103/1240/103-1240-0001", "MISSUS RACHEL LYNDE")]
    assert utterances[0].audio == chapter / "103-1240-0000.wav"


def test_mls_layout(tmp_path):
    _wav(tmp_path / "train" / "audio" / "4800" / "10003" / "4800_10003_000000.wav")
    (tmp_path / "train" / "transcripts.txt").write_text("4800_10003_000000\tof the wind\n")
    [utterance] = read_transcripts(tmp_path)
    assert (utterance.id, utterance.text) == ("train/audio/4800/10003/4800_10003_000000",
                                              "of the wind")


def test_transcript_without_audio_names_the_line(tmp_path):
    (tmp_path / "transcripts.txt").write_text("a_b_1\thello\nmissing_c_2\tworld\n")
    _wav(tmp_path / "audio" / "a" / "b" / "a_b_1.wav")
    with pytest.raises(CorpusError, match=r"transcripts.txt:2: no audio for 'missing_c_2'"):
        read_transcripts(tmp_path)


def test_tsv_and_audio_dir(tmp_path):
    _wav(tmp_path / "clips" / "one.wav")
    _wav(tmp_path / "clips" / "two.wav")
    tsv = tmp_path / "list.tsv"
    tsv.write_text("path\ttext\nclips/two.wav\thello there\nclips/one.wav\tgood day\n")
    assert [(u.id, u.text) for u in read_tsv(tsv)] == [("clips/one", "good day"),
                                                       ("clips/two", "hello there")]
    assert [u.id for u in read_audio_dir(tmp_path)] == ["clips/one", "clips/two"]
    tsv.write_text("clips/one.wav hello\n")
    with pytest.raises(CorpusError, match=r"list.tsv:1: expected 'PATH<TAB>TEXT'"):
        read_tsv(tsv)
    tsv.write_text("clips/three.wav\thello\n")
    with pytest.raises(CorpusError, match=r"list.tsv:1: no audio file"):
        read_tsv(tsv)


def test_duplicate_ids_are_refused(tmp_path):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "a.flac")
    with pytest.raises(CorpusError, match="share the id 'a'"):
        read_audio_dir(tmp_path)


def test_mfa_corpus_mirrors_the_ids(tmp_path):
    _wav(tmp_path / "corpus" / "spk" / "u1.wav")
    tsv = tmp_path / "corpus" / "list.tsv"
    tsv.write_text("spk/u1.wav\thello world\n")
    assert write_mfa_corpus(read_tsv(tsv), tmp_path / "mfa") == 1
    assert (tmp_path / "mfa" / "spk" / "u1.lab").read_text() == "hello world\n"
    assert (tmp_path / "mfa" / "spk" / "u1.wav").resolve() == (tmp_path / "corpus" / "spk" /
                                                               "u1.wav").resolve()
    with pytest.raises(CorpusError, match="no transcript"):
        write_mfa_corpus(read_audio_dir(tmp_path / "corpus"), tmp_path / "mfa2")


def test_mfa_corpus_never_replaces_a_file(tmp_path):
    corpus = tmp_path / "corpus"
    audio = _wav(corpus / "spk" / "u1.wav")
    original = audio.read_bytes()
    tsv = corpus / "list.tsv"
    tsv.write_text("spk/u1.wav\thello world\n")
    # The corpus itself as the aligner's folder: the link would have replaced (deleted) the audio.
    with pytest.raises(CorpusError, match=r"u1\.wav: the aligner's link .* would replace"):
        write_mfa_corpus(read_tsv(tsv), corpus)
    assert audio.read_bytes() == original and not audio.is_symlink()
    _wav(tmp_path / "mfa" / "spk" / "u1.wav")  # a real file where the link goes
    with pytest.raises(CorpusError, match="would replace this file"):
        write_mfa_corpus(read_tsv(tsv), tmp_path / "mfa")
    assert write_mfa_corpus(read_tsv(tsv), tmp_path / "mfa2") == 1
    assert write_mfa_corpus(read_tsv(tsv), tmp_path / "mfa2") == 1  # a re-run replaces its links


def test_transcripts_that_are_not_utf8_name_the_file(tmp_path):
    """The tools printed only the codec's message, naming no file."""
    _wav(tmp_path / "ls" / "1" / "2" / "1-2-0000.wav")
    transcript = tmp_path / "ls" / "1" / "2" / "1-2.trans.txt"
    transcript.write_bytes("1-2-0000 café\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"1-2\.trans\.txt: not UTF-8 text"):
        read_transcripts(tmp_path / "ls")
    _wav(tmp_path / "a.wav")
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes("a.wav\tcafé\r\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"list\.tsv: not UTF-8 text"):
        read_tsv(tsv)
    tsv.write_text("a.wav\tcafé\r\n", encoding="utf-8")
    assert [(u.id, u.text) for u in read_tsv(tsv)] == [("a", "café")]


def test_listings_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """The mark became part of the first path or id: 'no audio file <BOM>a.wav', a header line
    read as a path, 'no audio for <BOM>1-2-0000'."""
    _wav(tmp_path / "a.wav")
    tsv = tmp_path / "list.tsv"
    for content in ("path\ttext\na.wav\thello\n", "a.wav\thello\n"):
        tsv.write_text("\ufeff" + content, encoding="utf-8")
        assert [(u.id, u.text) for u in read_tsv(tsv)] == [("a", "hello")]
    _wav(tmp_path / "ls" / "1" / "2" / "1-2-0000.wav")
    (tmp_path / "ls" / "1" / "2" / "1-2.trans.txt").write_text("\ufeff1-2-0000 HELLO\n",
                                                               encoding="utf-8")
    assert [(u.id, u.text) for u in read_transcripts(tmp_path / "ls")] == [("1/2/1-2-0000",
                                                                            "HELLO")]


def test_mfa_corpus_refuses_an_empty_transcript(tmp_path):
    """A TSV line 'PATH<TAB>' wrote an empty .lab, which the aligner skips: the utterance got no
    TextGrid and silently left the dataset."""
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    tsv = tmp_path / "list.tsv"
    tsv.write_text("a.wav\thello\nb.wav\t  \n")
    with pytest.raises(CorpusError, match=r"b\.wav: its transcript is empty"):
        write_mfa_corpus(read_tsv(tsv), tmp_path / "mfa")


def test_linked_folders_are_followed_once(tmp_path):
    """A corpus assembled from symlinks (train-960 -> the three LibriSpeech subsets) read
    nothing through the links: Path.rglob does not follow them, so those utterances were
    silently left out."""
    chapter = tmp_path / "elsewhere" / "103" / "1240"
    _wav(chapter / "103-1240-0000.wav")
    (chapter / "103-1240.trans.txt").write_text("103-1240-0000 CHAPTER ONE\n")
    corpus = tmp_path / "corpus"
    _wav(corpus / "19" / "198" / "19-198-0000.wav")
    (corpus / "19" / "198" / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n")
    (corpus / "103").symlink_to(tmp_path / "elsewhere" / "103", target_is_directory=True)
    (corpus / "19" / "up").symlink_to(corpus, target_is_directory=True)  # a loop: read once
    want = ["103/1240/103-1240-0000", "19/198/19-198-0000"]
    assert [u.id for u in read_transcripts(corpus)] == want
    assert [u.id for u in read_audio_dir(corpus)] == want
