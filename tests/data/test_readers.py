import bz2
import gzip
import json
import lzma
import os
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.data.corpus_lines import open_corpus_lines, refuse_compressed
from megatron_lst.data.document_parsing import parse_reference_interleaved
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.jsonl_corpus import read_reference_jsonl, read_text_jsonl
from megatron_lst.data.read_chunks import line_chunks
from megatron_lst.data.read_report import ReadReport
from megatron_lst.data.textgrid import Interval, write_textgrid
from megatron_lst.data.textgrid_corpus import read_textgrid_corpus
from megatron_lst.data.unit_files import load_units
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference_lst"
SEP = "<LST MODE SEP>"


def _line(interleaved: str, file_id: str = "utt") -> str:
    return json.dumps({"file_id": file_id, "interleaved": interleaved}) + "\n"


def _segments(doc, tokenizer):
    """(text of each segment, its units) of an AlignedDocument."""
    t, u = doc.text_offsets(), doc.unit_offsets()
    return [(tokenizer.decode(doc.text_ids[t[i]:t[i + 1]].tolist()),
             doc.unit_ids[u[i]:u[i + 1]].tolist()) for i in range(doc.num_segments)]


def test_reference_fixture_matches_raw_file():
    if not FIXTURES.is_dir():
        pytest.skip("reference fixtures not present")
    tokenizer = load_text_tokenizer(FIXTURES / "spm.model")
    path = FIXTURES / "mls.chunk.00.on_the_fly"
    sources = list(read_reference_jsonl(path, tokenizer))
    raw_lines = path.read_text().splitlines()
    assert len(sources) == len(raw_lines) == 10
    for number, (source, raw) in enumerate(zip(sources, raw_lines, strict=True), 1):
        assert source.where == f"{path}:{number}"
        # The fixture alternates TEXT/HUBERT strictly: pair them independently of the reader.
        parts = json.loads(raw)["interleaved"].split(SEP)[1:]
        expected = []
        for text, units in zip(parts[::2], parts[1::2], strict=True):
            word, units = text[len("TEXT "):].strip(), [int(u) for u in units.split()[1:]]
            if word == "[SIL]" and not units:
                continue  # a silence of zero frames carries nothing
            expected.append(("" if word == "[SIL]" else word, units))
        assert _segments(source.document, tokenizer) == expected
        assert source.counts.units == sum(len(u) for _, u in expected)
        assert source.counts.silences == sum(w == "" for w, _ in expected)


def test_reference_pairing_rules(tokenizer):
    doc, counts = parse_reference_interleaved(
        f"{SEP}HUBERT 1 2 {SEP}TEXT hello {SEP}TEXT the world {SEP}HUBERT 3 {SEP}TEXT [SIL] "
        f"{SEP}HUBERT {SEP}TEXT {SEP}HUBERT 4 {SEP}TEXT time", tokenizer, 20, "x:1")
    # leading units -> silence; TEXT then TEXT -> word with no units; several words -> one
    # segment; [SIL] with no units -> dropped; empty TEXT with units -> silence; last TEXT alone.
    assert _segments(doc, tokenizer) == [("", [1, 2]), ("hello", []), ("the world", [3]),
                                          ("", [4]), ("time", [])]
    assert (counts.segments, counts.words, counts.silences, counts.empty_silences_dropped) == (
        5, 4, 2, 1)
    assert doc.seg_text_len.tolist()[0] == 0 and doc.seg_text_len[1] > 0


@pytest.mark.parametrize("line,message", [
    ("{not json\n", r"bad.jsonl:2: not valid JSON"),
    ("[" * 100_000 + "\n", r"bad.jsonl:2: not a document \(JSON nested too deeply"),  # was a
    # RecursionError traceback
    ('{"file_id": "u"}\n', r"bad.jsonl:2: expected an object with an \"interleaved\" string"),
    (_line(f"{SEP}TEXT a {SEP}AUDIO 1 2"), r"bad.jsonl:2 \(utt\): segment 1 has unknown head "
                                           r"'AUDIO'"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 20"), r"bad.jsonl:2 \(utt\): speech unit 20 \(unit 1, "
                                             r"segment 0\) is outside the codebook 0..19"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 -3"), r"bad.jsonl:2 \(utt\): speech unit -3"),
    # numpy read it as 9223372036854775807, the number the error then named
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 {10**20}"), rf"bad.jsonl:2 \(utt\): speech unit {10**20} "
                                                  r"is beyond 64-bit integers"),
    # Python's int() refused it (over 4300 digits): a ValueError escaped --skip-bad
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 {'9' * 5000}"), r"bad.jsonl:2 \(utt\): speech unit "
                                                        r"9{20}\.\.\. \(5000 characters\) is "
                                                        r"beyond 64-bit integers"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 -{'0' * 30}7 -{'9' * 4400}"),
     r"speech unit -9{19}\.\.\. \(4401 characters\) is beyond"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1 x2"), r"bad.jsonl:2 \(utt\): speech unit 'x2' is not an "
                                             r"integer"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1+2"), r"bad.jsonl:2 \(utt\): speech unit '1\+2'"),
    (_line(f"{SEP}TEXT a {SEP}HUBERT 1.5"), r"bad.jsonl:2 \(utt\): speech unit '1.5'"),
    (_line(""), r"bad.jsonl:2 \(utt\): empty document"),
    (_line(f"{SEP}TEXT [SIL] {SEP}HUBERT "), r"bad.jsonl:2 \(utt\): empty document"),
    (_line(f"{SEP}TEXT a {SEP}TEXT b {SEP}HUBERT "), r"bad.jsonl:2 \(utt\): no speech units \(no "
                                                    r"HUBERT payloads"),
    (_line(f"TEXT a {SEP}HUBERT 1"), r"bad.jsonl:2 \(utt\): text before the first"),
    (_line(f"{SEP}TEXT [SIL] a {SEP}HUBERT 1"), r"bad.jsonl:2 \(utt\): segment 0 mixes \[SIL\]"),
])
def test_reference_bad_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(_line(f"{SEP}TEXT a {SEP}HUBERT 1") + line)
    with pytest.raises(DocumentError, match=message):
        list(read_reference_jsonl(path, tokenizer, num_units=20))


def test_reference_skip_bad_counts(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text(_line(f"{SEP}TEXT a {SEP}HUBERT 1") + "\n" + "{oops\n"
                    + _line(f"{SEP}TEXT b {SEP}HUBERT 99") + _line(f"{SEP}TEXT the {SEP}HUBERT 2"))
    report = ReadReport()
    sources = list(read_reference_jsonl(path, tokenizer, num_units=20, skip_bad=True,
                                        report=report))
    assert [s.where for s in sources] == [f"{path}:1", f"{path}:5"]
    assert report.bad_skipped == 2
    assert [(skip.where, skip.kind) for skip in report.skipped] == [
        (f"{path}:3", "not valid JSON"), (f"{path}:4", "unit outside the codebook")]
    assert report.skipped[0].message.startswith(f"{path}:3: not valid JSON")


def test_text_jsonl(tmp_path, tokenizer):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "hello world"}\n\n{"body": "the time", "text": "a"}\n')
    sources = list(read_text_jsonl(path, tokenizer))
    assert [s.where for s in sources] == [f"{path}:1", f"{path}:3"]
    assert sources[0].document.tolist() == tokenizer.encode("hello world")
    assert sources[0].document.dtype == np.int32 and sources[0].counts.words == 2
    with pytest.raises(DocumentError, match=r"text.jsonl:1: expected an object with a 'body'"):
        list(read_text_jsonl(path, tokenizer, key="body"))
    report = ReadReport()
    (body,) = read_text_jsonl(path, tokenizer, key="body", skip_bad=True, report=report)
    assert body.document.tolist() == tokenizer.encode("the time") and report.bad_skipped == 1
    path.write_text('{"text": "hello"}\n{"text": "  "}\n')
    with pytest.raises(DocumentError, match=r"text.jsonl:2: empty document"):
        list(read_text_jsonl(path, tokenizer))
    assert len(list(read_text_jsonl(path, tokenizer, skip_bad=True))) == 1


@pytest.mark.parametrize("read, raw, message", [
    (read_text_jsonl, b'{"text": "caf\xe9"}\n', r"x.jsonl:2: the line holds the byte 0xe9, "
                                                  r"which is not UTF-8, at character 13"),
    (read_text_jsonl, b'{"text": "a \\ud800 b"}\n', r"x.jsonl:2: 'text' holds a lone surrogate "
                                                     r"\\ud800"),
    (read_reference_jsonl, b'{"interleaved": "' + SEP.encode() + b'TEXT \\udfff a"}\n',
     r"x.jsonl:2: \"interleaved\" holds a lone surrogate \\udfff"),
])
def test_text_that_is_not_utf8_names_the_line(tmp_path, tokenizer, read, raw, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "hello", "interleaved": "' + SEP.encode() + b'TEXT a ' + SEP.encode()
                     + b'HUBERT 1"}\n' + raw)
    with pytest.raises(DocumentError, match=message):
        list(read(path, tokenizer))
    report = ReadReport()
    assert len(list(read(path, tokenizer, skip_bad=True, report=report))) == 1
    assert report.bad_skipped == 1


@pytest.mark.parametrize("read, first, second", [
    (read_text_jsonl, '{"text": "hello world"}', '{"text": "the time"}'),
    (read_reference_jsonl, _line(f"{SEP}TEXT hello {SEP}HUBERT 1 2").strip(),
     _line(f"{SEP}TEXT world {SEP}HUBERT 3").strip()),
])
def test_a_byte_order_mark_before_the_first_line_is_dropped(tmp_path, tokenizer, read, first,
                                                          second):
    """A JSONL file saved with a byte-order mark (Windows editors, some exporters) lost its first
    document: the line read as invalid JSON (refused, or skipped under --skip-bad)."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{first}\r\n{second}\r\n".encode())
    report = ReadReport()
    sources = list(read(path, tokenizer, skip_bad=True, report=report))
    assert report.bad_skipped == 0 and [s.where for s in sources] == [f"{path}:1", f"{path}:2"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(f"{first}\n{second}\n")
    def pieces(document):  # an AlignedDocument's text ids, or a text document
        return getattr(document, "text_ids", document).tolist()

    assert ([pieces(s.document) for s in sources]
            == [pieces(s.document) for s in read(plain, tokenizer)])


def test_a_stray_cr_inside_a_line_neither_splits_it_nor_shifts_the_line_numbers(tmp_path,
                                                                               tokenizer):
    """Read as a line end (universal newlines), a CR between the tokens of a JSON line split it
    into two refused halves, and every later line was named one past what `sed -n` shows."""
    path = tmp_path / "corpus.jsonl"
    lines = ['{"text": "one"}', '{"text":\r "two"}', '{"text": "three"}']
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n{\n")
    with pytest.raises(DocumentError, match=rf"^{path}:4: "):
        list(read_text_jsonl(path, tokenizer))
    path.write_bytes("\n".join(lines).encode() + b"\n")
    assert [s.where for s in read_text_jsonl(path, tokenizer)] == [f"{path}:{n}" for n in (1, 2, 3)]
    mac = tmp_path / "mac.jsonl"  # classic Mac OS line ends only: still one document a line
    mac.write_bytes("\r".join([lines[0], lines[2]]).encode() + b"\r")
    assert [s.where for s in read_text_jsonl(mac, tokenizer)] == [f"{mac}:1", f"{mac}:2"]


def _utterance(textgrid_dir: Path, units_dir: Path, name: str, intervals, units,
               as_text=False):
    textgrid_dir.mkdir(parents=True, exist_ok=True)
    units_dir.mkdir(parents=True, exist_ok=True)
    write_textgrid(textgrid_dir / f"{name}.TextGrid", intervals)
    if as_text:
        (units_dir / f"{name}.txt").write_text(" ".join(map(str, units)) + "\n")
    else:
        np.save(units_dir / f"{name}.npy", np.asarray(units, dtype=np.int16))


WORD_TIER = [Interval(0.0, 0.2, ""), Interval(0.2, 0.52, "hello"), Interval(0.52, 0.6, "sp"),
             Interval(0.6, 0.62, "<eps>"), Interval(0.62, 1.0, "world")]


def test_textgrid_corpus(tmp_path, tokenizer):
    grids, units = tmp_path / "grids", tmp_path / "units"
    _utterance(grids / "spk1", units / "spk1", "a", WORD_TIER, list(range(20)) + [5] * 5)
    _utterance(grids, units, "b", [Interval(0, 0.4, "the")], [1] * 11, as_text=True)
    sources = list(read_textgrid_corpus(grids, units, tokenizer, frame_rate=25.0, num_units=20))
    assert [Path(s.where.split(" + ")[0]).name for s in sources] == ["b.TextGrid", "a.TextGrid"]
    # 25 Hz: frames [0,5) [5,13) [13,15) [15,16) [16,25); b: 10 frames in the grid, 11 units,
    # so its last segment absorbs the extra frame.
    assert _segments(sources[1].document, tokenizer) == [
        ("", list(range(5))), ("hello", list(range(5, 13))), ("", [13, 14]), ("", [15]),
        ("world", [16, 17, 18, 19] + [5] * 5)]
    assert _segments(sources[0].document, tokenizer) == [("the", [1] * 11)]
    assert sources[1].counts.silences == 3 and sources[1].counts.words == 2



def test_textgrids_of_one_name_in_two_folders_need_their_own_unit_files(tmp_path, tokenizer):
    """By name alone spk1/a and spk2/a would both read units/a.npy: refused unless each has a
    unit file at its relative path."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    _utterance(grids / "spk1", units, "a", WORD_TIER, [1] * 25)  # units/a.npy: by name only
    _utterance(grids / "spk2", units / "spk2", "a", WORD_TIER, [2] * 25)
    with pytest.raises(DocumentError, match=r"2 TextGrids share the name 'a' .*spk1/a.TextGrid "
                                            r"has no unit file at its relative path"):
        list(read_textgrid_corpus(grids, units, tokenizer, num_units=20))
    _utterance(grids / "spk1", units / "spk1", "a", WORD_TIER, [3] * 25)
    sources = list(read_textgrid_corpus(grids, units, tokenizer, num_units=20))
    assert [s.document.unit_ids[0] for s in sources] == [3, 2]

def test_an_utterance_with_two_unit_files_is_refused_naming_both(tmp_path, tokenizer):
    """units/a.npy and units/a.txt: which one holds the units is not guessed, even when the
    two agree."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    _utterance(grids, units, "a", WORD_TIER, [1] * 25)
    _utterance(grids, units, "a", WORD_TIER, [1] * 25, as_text=True)
    with pytest.raises(DocumentError, match=rf"a\.TextGrid: 2 unit files of one utterance: "
                                            rf"{units / 'a.npy'}, {units / 'a.txt'}; keep the one"):
        list(read_textgrid_corpus(grids, units, tokenizer, num_units=20))
    (units / "a.npy").unlink()
    (source,) = read_textgrid_corpus(grids, units, tokenizer, num_units=20)
    assert list(source.document.unit_ids) == [1] * 25


def test_textgrid_zero_frame_silence_dropped(tmp_path, tokenizer):
    tier = [Interval(0.0, 0.01, ""), Interval(0.01, 0.4, "hello")]
    _utterance(tmp_path / "g", tmp_path / "u", "a", tier, [3] * 10)
    (source,) = read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20)
    assert _segments(source.document, tokenizer) == [("hello", [3] * 10)]
    assert source.counts.empty_silences_dropped == 1


@pytest.mark.parametrize("label", ["[SIL]", "SIL", "SP", "<sil>", "<SIL>", "!SIL", "<EPS>"])
def test_textgrid_silence_labels_of_other_aligners_are_silences(tmp_path, tokenizer, label):
    """'[SIL]' (the reference format's silence word) and Kaldi's or upper-case silence labels
    were read as words: their frames became a word whose text ('[SIL]', 'SIL') was trained."""
    tier = [Interval(0.0, 0.2, label), Interval(0.2, 0.6, "hello"), Interval(0.6, 1.0, label)]
    _utterance(tmp_path / "g", tmp_path / "u", "a", tier, [3] * 25)
    (source,) = read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20)
    assert _segments(source.document, tokenizer) == [("", [3] * 5), ("hello", [3] * 10),
                                                     ("", [3] * 10)]
    assert (source.counts.words, source.counts.silences) == (1, 2)


@pytest.mark.parametrize("label", ["<unk>", "<UNK>", "spn", "SPN"])
def test_textgrid_unknown_words_keep_their_speech_without_text(tmp_path, tokenizer, label):
    """MFA's out-of-vocabulary word ('<unk>', aligned to the speech-noise phone 'spn') was trained
    as the literal text '<unk>' in text blocks and ASR answers; its frames are kept as a segment
    without text, counted apart from words and silences. One of no frames is dropped."""
    tier = [Interval(0.0, 0.2, "the"), Interval(0.2, 0.6, label), Interval(0.6, 0.6, label),
            Interval(0.6, 1.0, "cat")]
    _utterance(tmp_path / "g", tmp_path / "u", "a", tier, list(range(25)))
    (source,) = read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=30)
    assert _segments(source.document, tokenizer) == [
        ("the", list(range(5))), ("", list(range(5, 15))), ("cat", list(range(15, 25)))]
    counts = source.counts
    assert (counts.words, counts.silences, counts.unknown_words) == (2, 0, 2)
    assert counts.empty_silences_dropped == 0



@pytest.mark.parametrize("label, marker, kind", [
    ("hello sp", "sp", "silence"), ("SIL hello", "SIL", "silence"),
    ("hello <unk>", "<unk>", "unknown word"), ("hello [SIL] world", "[SIL]", "silence")])
def test_textgrid_label_mixing_a_word_with_a_marker_is_refused(tmp_path, tokenizer, label,
                                                               marker, kind):
    """'hello sp' was tokenized as the text 'hello sp': the silence marker trained as a word.
    MFA writes a word or a silence per interval, never both, so which frames are the word is
    unknown: refused, naming the interval (as the reference-JSONL reader refuses [SIL] among
    words)."""
    tier = [Interval(0.0, 0.2, ""), Interval(0.2, 1.0, label)]
    _utterance(tmp_path / "g", tmp_path / "u", "a", tier, [3] * 25)
    with pytest.raises(DocumentError, match=rf"a.npy: interval 2 of tier 'words' "
                                            rf"\({re.escape(repr(label))}, from 0.200s\) mixes "
                                            rf"words with the marker {re.escape(repr(marker))}"
                                            rf".*give the {kind} its own interval"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    report = ReadReport()
    assert list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20,
                                     skip_bad=True, report=report)) == []
    assert report.bad_skipped == 1


def test_textgrid_label_of_markers_only_is_a_silence_or_an_unknown_word(tmp_path, tokenizer):
    tier = [Interval(0.0, 0.2, "sil sp"), Interval(0.2, 0.6, "hello world"),
            Interval(0.6, 1.0, "<unk> sp")]
    _utterance(tmp_path / "g", tmp_path / "u", "a", tier, list(range(25)))
    (source,) = read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=30)
    assert _segments(source.document, tokenizer) == [
        ("", list(range(5))), ("hello world", list(range(5, 15))), ("", list(range(15, 25)))]
    counts = source.counts
    assert (counts.words, counts.silences, counts.unknown_words) == (2, 1, 1)


def test_textgrid_length_mismatch_names_both_files(tmp_path, tokenizer):
    _utterance(tmp_path / "g", tmp_path / "u", "a", WORD_TIER, [1] * 22)
    with pytest.raises(DocumentError, match=r"g/a.TextGrid \+ .*u/a.npy: the TextGrid ends at "
                                            r"1.000s = 25 frames at 25 Hz but a.npy holds 22"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))


def test_textgrid_bad_units(tmp_path, tokenizer):
    _utterance(tmp_path / "g", tmp_path / "u", "a", WORD_TIER, [1] * 24 + [20])
    with pytest.raises(DocumentError, match=r"a.npy: speech unit 20 \(unit 24, segment 4\)"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    np.save(tmp_path / "u" / "a.npy", np.zeros((25, 2), dtype=np.int64))
    with pytest.raises(DocumentError, match=r"a.npy: expected a 1-D integer array"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    # A header claiming 10**13 values: numpy allocated them first (a MemoryError traceback).
    np.save(tmp_path / "u" / "a.npy", np.zeros(25, dtype=np.int64))
    raw = (tmp_path / "u" / "a.npy").read_bytes()
    (tmp_path / "u" / "a.npy").write_bytes(raw.replace(b"(25,)", b"(10000000000000,)"))
    with pytest.raises(DocumentError, match=r"a.npy: its .npy header declares an array of shape "
                                            r"\(10000000000000,\) of int64 \(80,000,000,000,000 "
                                            r"bytes\) but \d+ bytes follow the header"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    # A damaged header (its closing brace lost): numpy's tokenize.TokenError was a traceback.
    (tmp_path / "u" / "a.npy").write_bytes(raw.replace(b"}", b" "))
    with pytest.raises(DocumentError, match=r"a.npy: not a readable .npy array"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    # numpy took a file without its magic bytes for a pickle and refused "pickled data"
    for not_npy in (b"1 2 3 4\n", b"", b"\x93NUM"):
        (tmp_path / "u" / "a.npy").write_bytes(not_npy)
        with pytest.raises(DocumentError, match=r"a.npy: not a .npy array \(it does not start "
                                                r"with numpy's header b'\\x93NUMPY'\); a text "
                                                r"file of units needs a .txt name"):
            list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    (tmp_path / "u" / "a.npy").unlink()
    (tmp_path / "u" / "a.txt").write_bytes(b"1 2 \xff 3\n")
    with pytest.raises(DocumentError, match=r"a.txt: not a text file of units"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    (tmp_path / "u" / "a.txt").unlink()
    with pytest.raises(DocumentError, match=r"a.TextGrid: no unit file a\{.npy"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))
    report = ReadReport()
    assert list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20,
                                     skip_bad=True, report=report)) == []
    assert report.bad_skipped == 1


def test_an_utterance_too_short_for_a_unit_names_its_empty_unit_file(tmp_path, tokenizer):
    """Audio shorter than one unit frame gets an empty unit file; the refusal spoke only of the
    reference format's HUBERT payloads and sent the user to text-jsonl."""
    _utterance(tmp_path / "g", tmp_path / "u", "a", [Interval(0.0, 0.03, "hi")], [])
    with pytest.raises(DocumentError, match=r"a.npy: no speech units \(.*an empty unit file: "
                                            r"audio shorter than one unit frame.*--skip-bad"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer))


def test_unit_files_with_a_byte_order_mark_or_ids_beyond_int64(tmp_path):
    """A text unit file saved with a BOM was 'not integers'; a uint64 .npy id past int64 wrapped
    to a negative unit and was refused as that."""
    (tmp_path / "a.txt").write_bytes("\ufeff3 1 4\n".encode())
    assert load_units(tmp_path / "a.txt").tolist() == [3, 1, 4]
    np.save(tmp_path / "b.npy", np.array([1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(DocumentError, match=r"b.npy: unit 18446744073709551615 is beyond any "
                                            r"codebook"):
        load_units(tmp_path / "b.npy")
    np.save(tmp_path / "c.npy", np.array([1, 499], dtype=np.uint64))
    assert load_units(tmp_path / "c.npy").tolist() == [1, 499]


def test_textgrid_missing_tier(tmp_path, tokenizer):
    _utterance(tmp_path / "g", tmp_path / "u", "a", WORD_TIER, [1] * 25)
    with pytest.raises(DocumentError, match=r"a.TextGrid: no tier named 'phones'"):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, tier="phones"))


def _raw_textgrid(path: Path, intervals) -> None:
    """A long-format TextGrid with exactly these intervals (gaps kept, unlike write_textgrid)."""
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "",
             f"xmin = {intervals[0][0]}", f"xmax = {intervals[-1][1]}", "tiers? <exists>",
             "size = 1", "item []:", "    item [1]:", '        class = "IntervalTier"',
             '        name = "words"', f"        xmin = {intervals[0][0]}",
             f"        xmax = {intervals[-1][1]}", f"        intervals: size = {len(intervals)}"]
    for i, (start, end, label) in enumerate(intervals, 1):
        lines += [f"        intervals [{i}]:", f"            xmin = {start}",
                  f"            xmax = {end}", f'            text = "{label}"']
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("intervals, message", [
    ([(0.5, 0.7, "hello"), (0.7, 1.0, "world")], r"interval 1 of tier 'words' \('hello'\) "
                                                 r"starts at 0.500s = frame 13, but the tier "
                                                 r"reaches only frame 0"),
    ([(0.0, 0.4, "hello"), (0.6, 1.0, "world")], r"interval 2 .*'world'.* frame 15, but the "
                                                 r"tier reaches only frame 10"),
    # An overlap, intervals out of time order and a negative start were all reported as a gap
    # ("but the tier reaches only frame 15 before it ... without gaps").
    ([(0.0, 0.6, "hello"), (0.4, 1.0, "world")], r"interval 2 .*'world'.* frame 10, inside "
                                                 r"interval 1 \('hello'\), which ends at 0.600s "
                                                 r"= frame 15: the intervals overlap; .*in time "
                                                 r"order"),
    ([(0.5, 1.0, "world"), (0.0, 0.5, "hello")], r"interval 2 .*'hello'.* frame 0, before "
                                                 r"interval 1 \('world', from 0.500s\): the "
                                                 r"intervals are out of time order"),
    ([(-0.2, 0.5, "hello"), (0.5, 1.0, "world")], r"interval 1 .*'hello'.* starts at -0.200s = "
                                                  r"frame -5, before the utterance starts"),
])
def test_textgrid_with_gaps_is_an_error(tmp_path, tokenizer, intervals, message):
    # Frames are cut at interval starts: a gap would silently join the interval before.
    (tmp_path / "g").mkdir()
    (tmp_path / "u").mkdir()
    _raw_textgrid(tmp_path / "g" / "a.TextGrid", intervals)
    np.save(tmp_path / "u" / "a.npy", np.ones(25, dtype=np.int64))
    with pytest.raises(DocumentError, match=message):
        list(read_textgrid_corpus(tmp_path / "g", tmp_path / "u", tokenizer, num_units=20))


def test_textgrid_suffix_in_another_case_is_read(tmp_path, tokenizer):
    """b.textgrid beside a.TextGrid was silently left out of the dataset."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    _utterance(grids, units, "a", WORD_TIER, [1] * 25)
    _utterance(grids, units, "b", WORD_TIER, [2] * 25)
    (grids / "b.TextGrid").rename(grids / "b.textgrid")
    sources = list(read_textgrid_corpus(grids, units, tokenizer, num_units=20))
    assert [s.document.unit_ids[0] for s in sources] == [1, 2]
    (grids / "a.TEXTGRID").write_bytes((grids / "a.TextGrid").read_bytes())
    if len(list(grids.iterdir())) == 3:  # a case-sensitive file system
        with pytest.raises(DocumentError, match=r"a.TEXTGRID and a.TextGrid: two TextGrids of "
                                                r"one utterance; keep one"):
            list(read_textgrid_corpus(grids, units, tokenizer, num_units=20))
        report = ReadReport()  # skip_bad: that utterance alone is skipped
        sources = list(read_textgrid_corpus(grids, units, tokenizer, num_units=20,
                                            skip_bad=True, report=report))
        assert [s.document.unit_ids[0] for s in sources] == [2]
        assert [(skip.where, skip.kind) for skip in report.skipped] == [
            (str(grids / "a.TEXTGRID"), "two TextGrids of one utterance")]


@pytest.mark.parametrize(("compress", "named", "command"), [
    (gzip.compress, "gzip", "gunzip -k"), (bz2.compress, "bzip2", "bunzip2 -k"),
    (lzma.compress, "xz", "unxz -k"),
    (lambda raw: b"\x28\xb5\x2f\xfd" + raw, "zstd", "zstd -d"),  # a zstd frame's magic
])
def test_a_compressed_corpus_is_named_as_compressed_not_as_bad_text(tmp_path, tokenizer,
                                                                     compress, named, command):
    """Read as text, every line of a .jsonl.gz was "not UTF-8", and --skip-bad skipped them
    all: it is refused whole, saying how to decompress it."""
    path = tmp_path / "corpus.jsonl.z"
    path.write_bytes(compress(b'{"text": "hello world"}\n' * 50))
    message = (rf"{path} is {named}-compressed, and corpora are read as UTF-8 text; "
               rf"decompress it first \({command} {path}\)")
    with pytest.raises(DocumentError, match=message):
        list(read_text_jsonl(path, tokenizer, skip_bad=True))
    with pytest.raises(DocumentError, match=message):
        refuse_compressed(path)


def test_text_that_begins_like_a_magic_number_is_read(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text('BZh is not bzip2 without its block size\n')
    refuse_compressed(path)
    with open_corpus_lines(path) as lines:
        assert list(lines) == ['BZh is not bzip2 without its block size\n']


@pytest.mark.parametrize("chunk_size", [1, 2, 100])
def test_line_chunks_count_the_bytes_the_progress_total_counts(tmp_path, chunk_size):
    """The progress total is the files' size in bytes: chunks counted characters (and skipped
    blank lines, a byte-order mark, the \\r of \\r\\n), so a non-ASCII corpus never reached
    100%."""
    path = tmp_path / "corpus.jsonl"
    lines = ['{"text": "café naïve 日本語"}', "", '{"text": "plain"}', "  ", '{"text": "ünï"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\n")
    chunks = list(line_chunks([str(path), str(path)], chunk_size))
    assert sum(chunk.size for chunk in chunks) == 2 * path.stat().st_size
    assert [number for chunk in chunks[:len(chunks) // 2] for number, _ in chunk.items] == [1, 3, 5]
    ascii_only = tmp_path / "ascii.jsonl"
    ascii_only.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [chunk.size for chunk in line_chunks([str(ascii_only)], 1)] == [14, 14]


def test_a_corpus_read_from_a_pipe_loses_no_bytes_to_the_compression_check(tokenizer):
    """`--input <(zcat corpus.jsonl.gz)` for a library caller: the first bytes of a pipe, once
    looked at for a compressor's magic number, would be gone from the first line."""
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"text": "hello world"}\n{"text": "the model"}\n')
    os.close(write_end)
    try:
        documents = list(read_text_jsonl(f"/dev/fd/{read_end}", tokenizer))
    finally:
        os.close(read_end)
    assert [d.document.tolist() for d in documents] == [
        tokenizer.encode_words([words])[0].tolist() for words in ("hello world", "the model")]
