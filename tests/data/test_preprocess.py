import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.data.documents import DocumentError
from megatron_lst.data.indexed import DocumentStore
from megatron_lst.data.textgrid import Interval, write_textgrid
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer, train_sentencepiece
from megatron_lst.tokenizer.vocab import VocabularyError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference_lst"
SEP = "<LST MODE SEP>"
WORDS = "the a of and to in is it speech text model unit word hello world time".split()


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Not registered in sys.modules, as other code loads the tools: they must work like that,
    # worker pools included.
    spec.loader.exec_module(module)
    return module


preprocess = _load_tool("preprocess_data")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("spm") / "spm.model", 290)


def _files(prefix: Path) -> list[bytes]:
    return [Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".json")]


def _synthetic_reference(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in range(lines):
            parts = []
            for _ in range(rng.randint(1, 12)):
                word = rng.choice(WORDS + ["[SIL]"])
                parts.append(f"{SEP}TEXT {word} {SEP}HUBERT "
                             + " ".join(str(rng.randrange(502)) for _ in range(rng.randint(1, 9))))
            f.write(json.dumps({"file_id": f"u{n}", "interleaved": " ".join(parts)}) + "\n")


def test_reference_fixture_converts_and_reads_back(tmp_path):
    if not FIXTURES.is_dir():
        pytest.skip("reference fixtures not present")
    source = FIXTURES / "mls.chunk.00.on_the_fly"
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "mls"
        preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                         "--tokenizer-model", str(FIXTURES / "spm.model"), "--output-prefix",
                         str(prefix), "--workers", str(workers), "--chunk-size", "3"])
        outputs.append(_files(prefix))
    assert outputs[0] == outputs[1]

    store = DocumentStore(tmp_path / "w1" / "mls")
    tokenizer = load_text_tokenizer(FIXTURES / "spm.model")
    store.check_tokenizer(tokenizer)
    assert store.kind == "aligned" and len(store) == 10 and store.vocab.size == 1020
    assert store.manifest.frame_rate == 25.0 and store.manifest.counts.units == 4108
    for doc, raw in zip((store[i] for i in range(len(store))), source.read_text().splitlines(), strict=True):
        parts = json.loads(raw)["interleaved"].split(SEP)[1:]
        words = [p.split(" ", 1)[1].strip() for p in parts[::2]]
        units = [int(u) for p in parts[1::2] for u in p.split()[1:]]
        np.testing.assert_array_equal(doc.unit_ids, units)
        offsets = doc.text_offsets()
        got_words = [tokenizer.decode(doc.text_ids[offsets[i]:offsets[i + 1]].tolist())
                     for i in np.flatnonzero(~doc.is_silence)]
        assert got_words == [w for w in words if w != "[SIL]"]


def test_workers_give_identical_files(tmp_path, spm, capsys):
    source = tmp_path / "synthetic.jsonl"
    _synthetic_reference(source, 300)
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        manifest = preprocess.main(["--input", str(source), str(source), "--input-format",
                                    "reference-jsonl", "--tokenizer-model", str(spm),
                                    "--output-prefix", str(prefix), "--workers", str(workers),
                                    "--chunk-size", "7"])
        outputs.append(_files(prefix))
    assert outputs[0] == outputs[1]
    assert manifest.counts.documents == 600 and len(DocumentStore(tmp_path / "w2")) == 600
    # A file named twice (a glob and the file again) is stored twice: said, not silent.
    assert (f"warning: --input names {source} twice (also as {source}): its documents are "
            f"stored twice") in capsys.readouterr().err


def test_text_jsonl_converts(tmp_path, spm):
    source = tmp_path / "text.jsonl"
    texts = [" ".join(WORDS[: n + 2]) for n in range(12)]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess.main(["--input", str(source), "--input-format", "text-jsonl", "--tokenizer-model",
                     str(spm), "--output-prefix", str(tmp_path / "text"), "--workers", "2",
                     "--chunk-size", "5"])
    store = DocumentStore(tmp_path / "text")
    tokenizer = load_text_tokenizer(spm)
    assert store.kind == "text" and store.manifest.frame_rate is None
    assert [store[i].tolist() for i in range(len(store))] == [tokenizer.encode(t) for t in texts]
    assert store.manifest.counts.words == sum(len(t.split()) for t in texts)


def test_a_corpus_with_a_byte_order_mark_keeps_its_first_document(tmp_path, spm):
    """The tool reads its inputs in chunks (not through read_text_jsonl): a byte-order mark made
    the first line invalid JSON there too."""
    texts = ["hello world", "the time"]
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\r\n"
                                                for t in texts).encode())
    manifest = preprocess.main(["--input", str(source), "--input-format", "text-jsonl",
                                "--tokenizer-model", str(spm), "--output-prefix",
                                str(tmp_path / "text"), "--skip-bad"])
    assert manifest.counts.documents == 2 and manifest.counts.bad_skipped == 0
    tokenizer = load_text_tokenizer(spm)
    store = DocumentStore(tmp_path / "text")
    assert [store[i].tolist() for i in range(len(store))] == [tokenizer.encode(t) for t in texts]


def test_textgrid_converts(tmp_path, spm):
    grids, units = tmp_path / "grids", tmp_path / "units"
    grids.mkdir()
    units.mkdir()
    for n in range(3):
        write_textgrid(grids / f"u{n}.TextGrid",
                       [Interval(0.0, 0.2, ""), Interval(0.2, 0.6, "hello"),
                        Interval(0.6, 1.0, WORDS[n])])
        np.save(units / f"u{n}.npy", np.arange(n, n + 50))
    preprocess.main(["--input-format", "textgrid", "--textgrid-dir", str(grids), "--units-dir",
                     str(units), "--tokenizer-model", str(spm), "--frame-rate", "50",
                     "--output-prefix", str(tmp_path / "tg")])
    store = DocumentStore(tmp_path / "tg")
    assert store.manifest.frame_rate == 50.0 and len(store) == 3
    assert store[2].seg_unit_len.tolist() == [10, 20, 20]
    np.testing.assert_array_equal(store[2].unit_ids, np.arange(2, 52))


def test_unit_files_without_a_textgrid_are_named(tmp_path, spm, capsys):
    """Utterances the aligner left without a TextGrid (MFA's unalignable ones) were left out of
    the dataset without a word."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    (grids / "spk1").mkdir(parents=True)
    (units / "spk1").mkdir(parents=True)
    write_textgrid(grids / "spk1" / "u0.TextGrid", [Interval(0.0, 1.0, "hello")])
    np.save(units / "spk1" / "u0.npy", np.arange(50))
    np.save(units / "spk1" / "u1.npy", np.arange(50))  # no TextGrid
    (units / "u2.txt").write_text("1 2 3\n")  # no TextGrid
    (units / "units.json").write_text("{}")  # no unit file
    write_textgrid(grids / "spk1" / "u3.TextGrid", [Interval(0.0, 1.0, "hello")])
    np.save(units / "u3.npy", np.arange(50))  # read by its name alone
    args = ["--input-format", "textgrid", "--textgrid-dir", str(grids), "--units-dir",
            str(units), "--tokenizer-model", str(spm), "--frame-rate", "50"]
    preprocess.main([*args, "--output-prefix", str(tmp_path / "tg")])
    assert len(DocumentStore(tmp_path / "tg")) == 2
    err = capsys.readouterr().err
    assert (f"warning: 2 unit files under {units} have no TextGrid under {grids}, so their "
            f"utterances are left out of the dataset ({units / 'spk1' / 'u1.npy'}, "
            f"{units / 'u2.txt'}); the aligner may have failed on them") in err
    (units / "spk1" / "u1.npy").unlink()
    (units / "u2.txt").unlink()
    preprocess.main([*args, "--output-prefix", str(tmp_path / "tg2")])
    assert "have no TextGrid" not in capsys.readouterr().err



def test_an_utterance_with_two_unit_files_is_skipped_under_skip_bad(tmp_path, spm, capsys):
    """spk1/a has a.npy and a.txt: refused naming both, or under --skip-bad skipped, counted
    and named in the summary. The check of TextGrids sharing a name (spk1/a, spk2/a) raised the
    refusal before any utterance was read, stopping the whole --skip-bad run."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    for speaker in ("spk1", "spk2"):
        (units / speaker).mkdir(parents=True)
        (grids / speaker).mkdir(parents=True)
        write_textgrid(grids / speaker / "a.TextGrid", [Interval(0.0, 0.4, "hello")])
        np.save(units / speaker / "a.npy", np.ones(10, dtype=np.int16))
    (units / "spk1" / "a.txt").write_text("1 " * 10)
    both = rf"{units / 'spk1' / 'a.npy'}, {units / 'spk1' / 'a.txt'}"
    args = ["--input-format", "textgrid", "--textgrid-dir", str(grids), "--units-dir",
            str(units), "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "out")]
    with pytest.raises(DocumentError, match=rf"spk1/a.TextGrid: 2 unit files of one "
                                            rf"utterance: {both}; keep the one"):
        preprocess.main(args)
    manifest = preprocess.main([*args, "--skip-bad"])
    assert manifest.counts.documents == 1 and manifest.counts.bad_skipped == 1
    out = capsys.readouterr().out
    assert "skipped 1 bad documents (--skip-bad;" in out and "1 several unit files, e.g.:" in out
    assert f"spk1/a.TextGrid: 2 unit files of one utterance: {both}" in out


def test_an_utterance_with_two_textgrids_is_skipped_under_skip_bad(tmp_path, spm, capsys):
    """a.TextGrid and a.textgrid, one utterance's two TextGrids, were refused before any
    utterance was read, stopping the whole --skip-bad run. Without --skip-bad they are refused
    naming both; with it that utterance alone is skipped, counted and listed."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    grids.mkdir()
    units.mkdir()
    for name in ("a", "b"):
        write_textgrid(grids / f"{name}.TextGrid", [Interval(0.0, 0.4, "hello")])
        np.save(units / f"{name}.npy", np.ones(10, dtype=np.int16))
    (grids / "a.textgrid").write_bytes((grids / "a.TextGrid").read_bytes())
    if len(list(grids.iterdir())) < 3:
        pytest.skip("a case-insensitive file system holds one of a.TextGrid and a.textgrid")
    args = ["--input-format", "textgrid", "--textgrid-dir", str(grids), "--units-dir",
            str(units), "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "out")]
    both = rf"{grids / 'a.TextGrid'} and a.textgrid: two TextGrids of one utterance; keep one"
    with pytest.raises(DocumentError, match=rf"^{both}$"):
        preprocess.main(args)
    manifest = preprocess.main([*args, "--skip-bad"])
    assert manifest.counts.documents == 1 and manifest.counts.bad_skipped == 1
    captured = capsys.readouterr()
    assert f"1 two TextGrids of one utterance, e.g.:\n      {both}\n" in captured.out
    assert "have no TextGrid" not in captured.err  # a.npy is the skipped utterance's
    rows = (tmp_path / "out.skipped.tsv").read_text().splitlines()
    assert rows[1:] == [f"{grids / 'a.TextGrid'}\ttwo TextGrids of one utterance\t{both}"]


def test_unknown_words_are_counted_and_warned_of(tmp_path, spm, capsys):
    """MFA's '<unk>' word intervals were trained as the text '<unk>' without a word; they are kept
    as speech without text, counted in the manifest and in a warning."""
    grids, units = tmp_path / "grids", tmp_path / "units"
    grids.mkdir()
    units.mkdir()
    for n, label in enumerate(("<unk>", "spn", "hello")):
        write_textgrid(grids / f"u{n}.TextGrid", [Interval(0.0, 0.6, "hello"),
                                                  Interval(0.6, 1.0, label)])
        np.save(units / f"u{n}.npy", np.arange(50))
    args = ["--input-format", "textgrid", "--textgrid-dir", str(grids), "--units-dir",
            str(units), "--tokenizer-model", str(spm), "--frame-rate", "50"]
    preprocess.main([*args, "--output-prefix", str(tmp_path / "tg")])
    store = DocumentStore(tmp_path / "tg")
    assert store.manifest.counts.unknown_words == 2 and store.manifest.counts.words == 4
    assert [store[n].seg_text_len.tolist()[1] == 0 for n in range(3)] == [True, True, False]
    assert ("warning: 2 word intervals are labelled <unk> or spn, the aligner's "
            "out-of-vocabulary word: their speech is kept without text") in capsys.readouterr().err
    (grids / "u0.TextGrid").unlink()
    (grids / "u1.TextGrid").unlink()
    (units / "u0.npy").unlink()
    (units / "u1.npy").unlink()
    preprocess.main([*args, "--output-prefix", str(tmp_path / "tg2")])
    assert "<unk>" not in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_stops_with_file_and_line(tmp_path, spm, workers):
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 20)
    lines = source.read_text().splitlines(keepends=True)
    lines[13] = json.dumps({"interleaved": f"{SEP}TEXT a {SEP}HUBERT 7 502"}) + "\n"
    source.write_text("".join(lines))
    prefix = tmp_path / "out"
    with pytest.raises(DocumentError, match=r"in.jsonl:14: speech unit 502 \(unit 1, segment 0\)"):
        preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                         "--tokenizer-model", str(spm), "--output-prefix", str(prefix),
                         "--workers", str(workers), "--chunk-size", "4"])
    assert not list(tmp_path.glob("out*"))  # no partial output left behind



_HOLD_THE_OUTPUT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("preprocess_data", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
with tool._sole_writer(sys.argv[2]):
    print("writing", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow  # a fresh interpreter holds the output, as a run started earlier would
def test_a_second_run_on_a_prefix_being_written_is_refused(tmp_path, spm):
    """Two runs on one --output-prefix (a job submitted twice) wrote the same PREFIX.partial.*
    files: the published dataset held one run's ids under the other's index."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "hello world"}) + "\n")
    prefix = tmp_path / "out" / "text"
    argv = ["--input", str(source), "--input-format", "text-jsonl", "--tokenizer-model", str(spm),
            "--output-prefix", str(prefix)]
    preprocess.main(argv)
    before = _files(prefix)
    with subprocess.Popen([sys.executable, "-c", _HOLD_THE_OUTPUT,
                           str(REPO / "tools" / "preprocess_data.py"), str(prefix)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) as other:
        assert other.stdout.readline() == "writing\n"
        with pytest.raises(SystemExit, match=rf"--output-prefix {prefix}: another "
                                             rf"tools/preprocess_data.py run is writing this "
                                             rf"dataset \(it holds the lock {prefix}.partial.lock"
                                             rf"\); wait for it to end"):
            preprocess.main(argv)
        assert _files(prefix) == before
        other.communicate("")  # that run ends
    source.write_text(json.dumps({"text": "the time"}) + "\n")
    preprocess.main(argv)  # its lock went with it
    store = DocumentStore(prefix)
    assert store[0].tolist() == load_text_tokenizer(spm).encode("the time")
    assert sorted(path.name for path in prefix.parent.iterdir()) == [
        "text.bin", "text.idx", "text.json"]


def test_a_run_stopped_while_renaming_leaves_no_dataset_that_looks_whole(tmp_path, spm,
                                                                        monkeypatch):
    """Rewriting a prefix with the same documents in another order (same sizes, same counts)
    and stopping after the new .bin replaced the old one: the old .idx and manifest would cut
    the new .bin at the old places. The old manifest is removed first, so the store refuses."""
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 12)
    prefix = tmp_path / "out"
    argv = ["--input", str(source), "--input-format", "reference-jsonl",
            "--tokenizer-model", str(spm), "--output-prefix", str(prefix)]
    preprocess.main(argv)
    source.write_text("".join(reversed(source.read_text().splitlines(keepends=True))))
    replace = os.replace

    def stop_at_the_index(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", stop_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        preprocess.main(argv)
    monkeypatch.setattr(os, "replace", replace)
    # It said the .bin/.idx pair looked like Megatron-LM's preprocess_data.py output.
    with pytest.raises(DocumentError, match=rf"out.json: manifest not found, and {prefix}.partial"
                                            rf".json is there: a tools/preprocess_data.py run was "
                                            rf"stopped while it moved its output into place, so "
                                            rf"{prefix}.bin/.idx may be of two runs; run it "
                                            rf"again$"):
        DocumentStore(prefix)
    preprocess.main(argv)  # the next run completes it
    assert len(DocumentStore(prefix)) == 12


def test_skip_bad_counts_in_manifest(tmp_path, spm, capsys):
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 10)
    with open(source, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"interleaved": f"{SEP}PHONES a"}) + "\n")
    with open(source, "ab") as f:  # a Latin-1 word: a line that is not UTF-8
        f.write(f'{{"interleaved": "{SEP}TEXT caf\xe9 {SEP}HUBERT 1"}}\n'.encode("latin-1"))
    manifest = preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                                "--tokenizer-model", str(spm), "--output-prefix",
                                str(tmp_path / "out"), "--skip-bad", "--workers", "2",
                                "--chunk-size", "3"])
    assert manifest.counts.documents == 10 and manifest.counts.bad_skipped == 3
    assert DocumentStore(tmp_path / "out").manifest.counts.bad_skipped == 3
    out = capsys.readouterr().out
    assert "skipped 3 bad documents" in out and "in.jsonl:11: not valid JSON" in out
    assert "in.jsonl:13: the line holds the byte 0xe9, which is not UTF-8" in out


def test_skip_bad_tallies_skips_by_kind_and_lists_every_one(tmp_path, spm, capsys):
    """The summary showed the first 5 skip messages and no tally: which kinds of problems the
    other skips were was not said anywhere. It counts them by kind, with a few examples of
    each, and PREFIX.skipped.tsv lists every one (a run that skips none removes an older list)."""
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 4)
    with open(source, "a") as f:
        for n in range(7):
            f.write(f"not json {n}\n")
        for unit in (600, 700):
            f.write(json.dumps({"interleaved": f"{SEP}TEXT the {SEP}HUBERT {unit}"}) + "\n")
    prefix = tmp_path / "out"
    args = ["--input", str(source), "--input-format", "reference-jsonl", "--tokenizer-model",
            str(spm), "--output-prefix", str(prefix), "--skip-bad", "--workers", "2",
            "--chunk-size", "3"]
    manifest = preprocess.main(args)
    assert manifest.counts.documents == 4 and manifest.counts.bad_skipped == 9
    out = capsys.readouterr().out
    assert (f"skipped 9 bad documents (--skip-bad; counted in the manifest, each listed in "
            f"{prefix}.skipped.tsv), by kind:\n    7 not valid JSON, e.g.:\n") in out
    assert "    2 unit outside the codebook, e.g.:\n" in out
    assert [f"in.jsonl:{line}: not valid JSON" in out for line in range(5, 12)] == [
        True] * 3 + [False] * 4
    rows = (tmp_path / "out.skipped.tsv").read_text().splitlines()
    assert rows[0] == "where\tkind\tmessage" and len(rows) == 10
    where, kind, message = rows[10 - 1].split("\t")
    assert (where, kind) == (f"{source}:13", "unit outside the codebook")
    assert message.startswith(f"{source}:13: speech unit 700 ")
    assert [row.split("\t")[:2] for row in rows[1:8]] == [
        [f"{source}:{line}", "not valid JSON"] for line in range(5, 12)]
    _synthetic_reference(source, 4)
    (tmp_path / "out.partial.skipped.tsv").write_text("a killed run's list\n")
    preprocess.main(args)
    assert "skipped" not in capsys.readouterr().out
    assert not (tmp_path / "out.skipped.tsv").exists()
    assert not (tmp_path / "out.partial.skipped.tsv").exists()


def test_a_compressed_input_is_refused_before_anything_is_read(tmp_path, spm):
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    _synthetic_reference(plain, 5)
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(SystemExit, match=rf"--input {packed} is gzip-compressed, .* "
                                         rf"decompress it first \(gunzip -k {packed}\)"):
        preprocess.main(["--input", str(plain), str(packed), "--input-format",
                         "reference-jsonl", "--tokenizer-model", str(spm), "--output-prefix",
                         str(tmp_path / "out"), "--skip-bad"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl.gz"]


def test_a_run_without_documents_names_the_output_prefix_given(tmp_path, spm):
    """The writer writes to PREFIX.partial: its error named that scratch prefix, not the
    --output-prefix of the command."""
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n\n")
    bad.write_text("not json\n")
    out = tmp_path / "out"
    for source, why in ((empty, r"every input was empty\)"),
                        (bad, r"every input was empty or skipped as bad \(1 skipped by "
                              r"--skip-bad: 1 not valid JSON; e.g. .*bad.jsonl:1: not valid "
                              r"JSON")):
        with pytest.raises(DocumentError, match=rf"^--output-prefix {out}: no documents to write "
                                                rf"\({why}.*; nothing was written"):
            preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                             "--tokenizer-model", str(spm), "--output-prefix", str(out),
                             "--skip-bad"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["empty.jsonl", "bad.jsonl"])


def test_store_refuses_another_tokenizer(tmp_path, spm):
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 5)
    preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                     "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "out")])
    rng = random.Random(3)
    other = train_sentencepiece([" ".join(rng.choice(WORDS) for _ in range(9))
                                 for _ in range(100)], tmp_path / "other.model", 280)
    with pytest.raises(VocabularyError, match="290-piece tokenizer"):
        DocumentStore(tmp_path / "out").check_tokenizer(load_text_tokenizer(other))


def test_argument_errors(tmp_path, spm):
    with pytest.raises(SystemExit, match="needs --textgrid-dir and --units-dir"):
        preprocess.main(["--input-format", "textgrid", "--tokenizer-model", str(spm),
                         "--output-prefix", str(tmp_path / "x")])
    # every utterance was refused for its unit file (with --skip-bad: "no documents to write")
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids.txt").write_text("")
    for grids, units, message in (("grids", "units", r"--units-dir .*units: no such directory$"),
                                  ("grids.txt", "grids", r"--textgrid-dir .*grids.txt: not a "
                                                         r"directory$")):
        with pytest.raises(SystemExit, match=message):
            preprocess.main(["--input-format", "textgrid", "--textgrid-dir", str(tmp_path / grids),
                             "--units-dir", str(tmp_path / units), "--tokenizer-model", str(spm),
                             "--output-prefix", str(tmp_path / "x"), "--skip-bad"])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        preprocess.main(["--input", str(tmp_path / "missing.jsonl"), "--input-format",
                         "text-jsonl", "--tokenizer-model", str(spm), "--output-prefix",
                         str(tmp_path / "x")])
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 2)
    reference = ["--input", str(source), "--input-format", "reference-jsonl",
                 "--output-prefix", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match="--tokenizer-model .*nope.model: no such file"):
        preprocess.main([*reference, "--tokenizer-model", str(tmp_path / "nope.model")])
    corpus = tmp_path / "corpus.json"
    corpus.write_bytes(source.read_bytes())
    with pytest.raises(SystemExit, match=r"--output-prefix .*corpus would overwrite .*corpus.json"):
        preprocess.main(["--input", str(corpus), "--input-format", "reference-jsonl",
                         "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "corpus")])
    assert corpus.read_bytes() == source.read_bytes()
    with pytest.raises(SystemExit, match=r"--output-prefix .*out/ names a directory; .*out/corpus"):
        preprocess.main([*reference[:-1], str(tmp_path / "out") + "/", "--tokenizer-model",
                         str(spm)])
    (tmp_path / "taken.idx").mkdir()
    with pytest.raises(SystemExit, match=r"--output-prefix .*taken: .*taken.idx is a directory"):
        preprocess.main([*reference[:-1], str(tmp_path / "taken"), "--tokenizer-model", str(spm)])
    assert not list(tmp_path.glob("taken*.partial*"))
    for rate in ("0", "-25", "nan", "inf"):
        with pytest.raises(SystemExit, match="--frame-rate must be a positive number"):
            preprocess.main([*reference, "--tokenizer-model", str(spm), "--frame-rate", rate])
    for units in ("0", "-5"):  # "num_units must be positive", naming no flag
        with pytest.raises(SystemExit, match=rf"--num-units is the speech codebook size .*, at "
                                             rf"least 1; got {units}"):
            preprocess.main([*reference, "--tokenizer-model", str(spm), "--num-units", units])
    # Another format's flags were ignored: the corpus was read as its --input-format says.
    for extra, message in (
            (["--json-key", "content"],
             "--json-key applies only to --input-format text-jsonl, not reference-jsonl"),
            (["--units-dir", str(tmp_path), "--textgrid-tier", "phones"],
             "--units-dir and --textgrid-tier apply only to --input-format textgrid, not "
             "reference-jsonl")):
        with pytest.raises(SystemExit, match=message):
            preprocess.main([*reference, "--tokenizer-model", str(spm), *extra])
    with pytest.raises(SystemExit, match="--json-key applies only to --input-format text-jsonl, "
                                         "not textgrid"):
        preprocess.main(["--input-format", "textgrid", "--textgrid-dir", str(tmp_path / "grids"),
                         "--units-dir", str(tmp_path), "--json-key", "content",
                         "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "x")])


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, spm, capsys):
    source = tmp_path / "synthetic.jsonl"
    _synthetic_reference(source, 250)
    preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                     "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "out"),
                     "--chunk-size", "30", "--log-interval", "100"])
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["preprocess: 120 documents",
                                                      "preprocess: 210 documents"]
    size = source.stat().st_size / 1e6
    assert f"of {size:,.1f} MB (" in lines[0] and "documents/s" in lines[0] and "MB/s" in lines[0]


def test_progress_of_a_non_ascii_corpus_reaches_its_total(tmp_path, spm, capsys):
    """The total is in bytes; the chunks counted characters, so a corpus beyond ASCII ended
    short of 100%."""
    source = tmp_path / "synthetic.jsonl"
    _synthetic_reference(source, 40)
    records = [json.loads(line) for line in source.read_text().splitlines()]
    source.write_text("".join(json.dumps({**record, "file_id": f"énoncé-日本-{n}"},
                                         ensure_ascii=False) + "\n"
                              for n, record in enumerate(records)), encoding="utf-8")
    preprocess.main(["--input", str(source), "--input-format", "reference-jsonl",
                     "--tokenizer-model", str(spm), "--output-prefix", str(tmp_path / "out"),
                     "--chunk-size", "8", "--log-interval", "8"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("preprocess: 40 documents,") and "(100.0%)" in last


@pytest.mark.slow  # a fresh interpreter runs the tool
def test_an_unwritable_output_is_one_line(tmp_path, spm):
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 2)
    (tmp_path / "file").write_text("")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                          str(source), "--input-format", "reference-jsonl", "--tokenizer-model",
                          str(spm), "--output-prefix", str(tmp_path / "file" / "out")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("error: ") and "file" in run.stderr


def _preprocess_interrupted(patch: str, source: Path, spm, prefix: Path):
    """tools/preprocess_data.py on `source` (reference JSONL) run in a fresh interpreter after
    the Python code `patch`, which raises KeyboardInterrupt somewhere (a Ctrl-C there)."""
    script = patch + ("import runpy, sys\n"
                      "sys.argv = sys.argv[1:]\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", script,
                           str(REPO / "tools" / "preprocess_data.py"), "--input", str(source),
                           "--input-format", "reference-jsonl", "--tokenizer-model", str(spm),
                           "--output-prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.slow  # a fresh interpreter runs the tool
def test_ctrl_c_is_one_line_and_leaves_no_files(tmp_path, spm):
    """Ctrl-C while documents are written: the partial files are removed, and the tool says so
    in one line with the shell's status for SIGINT (it printed a traceback)."""
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 20)
    (tmp_path / "out").mkdir()
    interrupt_at_the_third_document = (
        "from megatron_lst.data.indexed import DocumentWriter\n"
        "add = DocumentWriter.add_aligned\n"
        "def add_then_stop(self, doc):\n"
        "    if self.num_documents == 2:\n"
        "        raise KeyboardInterrupt\n"
        "    add(self, doc)\n"
        "DocumentWriter.add_aligned = add_then_stop\n")
    run = _preprocess_interrupted(interrupt_at_the_third_document, source, spm,
                                  tmp_path / "out" / "corpus")
    assert run.returncode == 130 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().endswith("interrupted: nothing written (the partial output was "
                                       "removed)")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.slow  # a fresh interpreter runs the tool
def test_ctrl_c_while_publishing_says_what_was_published(tmp_path, spm):
    """Ctrl-C between the final renames printed "nothing written" although the new .bin was in
    place and the old manifest gone: the message now names what was published and says to
    re-run."""
    source = tmp_path / "in.jsonl"
    _synthetic_reference(source, 5)
    prefix = tmp_path / "corpus"
    interrupt_at_the_index = (
        "import os\n"
        "replace = os.replace\n"
        "def replace_then_stop(src, dst):\n"
        "    if str(dst).endswith('.idx'):\n"
        "        raise KeyboardInterrupt\n"
        "    replace(src, dst)\n"
        "os.replace = replace_then_stop\n")
    run = _preprocess_interrupted(interrupt_at_the_index, source, spm, prefix)
    assert run.returncode == 130 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().endswith(
        f"interrupted while moving the output into place: published {prefix}.bin; "
        f"{prefix}.partial.idx, {prefix}.partial.json not yet. The dataset at {prefix} is "
        f"incomplete (it has no manifest, which readers refuse): run the same command again")
    assert "nothing written" not in run.stderr
