import gc
import json
import pickle
import random
import weakref

import numpy as np
import pytest
from input_cases import fifo_with_writer

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.indexed import DocumentStore, DocumentWriter, StoreError
from megatron_lst.data.manifest import Counts, Manifest, ManifestError, TokenizerInfo
from megatron_lst.tokenizer.text_tokenizer import (
    joint_vocab,
    load_text_tokenizer,
    train_sentencepiece,
)
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

WORDS = "the a of and to in is it speech text model unit word hello world time".split()
NUM_UNITS = 20


def _tokenizer(path, vocab_size, seed=0):
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    return load_text_tokenizer(train_sentencepiece(corpus, path, vocab_size))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("spm") / "spm.model", 290)


def _random_aligned(rng: np.random.Generator) -> AlignedDocument:
    segments = int(rng.integers(1, 9))
    seg_text_len = rng.integers(0, 4, segments).astype(np.int32)
    seg_unit_len = rng.integers(0, 6, segments).astype(np.int32)
    seg_unit_len[seg_text_len == 0] += 1  # a silence has units
    return AlignedDocument(
        rng.integers(3, 290, int(seg_text_len.sum())).astype(np.int32),
        rng.integers(0, NUM_UNITS, int(seg_unit_len.sum())).astype(np.int32),
        seg_text_len, seg_unit_len)


def _write(prefix, kind, documents, tokenizer) -> Manifest:
    writer = DocumentWriter(prefix, kind)
    counts = Counts(documents=len(documents))
    for doc in documents:
        if kind == "aligned":
            writer.add_aligned(doc)
            counts.segments += doc.num_segments
            counts.text_pieces += len(doc.text_ids)
            counts.units += len(doc.unit_ids)
        else:
            writer.add_text(doc)
            counts.text_pieces += len(doc)
    manifest = Manifest(kind, joint_vocab(tokenizer, NUM_UNITS).to_dict(),
                        TokenizerInfo(tokenizer.path, tokenizer.sha256, tokenizer.vocab_size),
                        NUM_UNITS, 25.0 if kind == "aligned" else None, counts, ["memory"])
    writer.finalize(manifest)
    return manifest


@pytest.fixture
def aligned_store(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    documents = [_random_aligned(rng) for _ in range(30)]
    _write(tmp_path / "sub" / "aligned", "aligned", documents, tokenizer)
    return tmp_path / "sub" / "aligned", documents


def test_aligned_round_trip(aligned_store, tokenizer):
    prefix, documents = aligned_store
    store = DocumentStore(prefix)
    assert store.kind == "aligned" and len(store) == len(documents)
    assert store.vocab == joint_vocab(tokenizer, NUM_UNITS)
    for i in [*range(len(documents)), -1]:
        got, want = store[i], documents[i]
        for name in ("text_ids", "unit_ids", "seg_text_len", "seg_unit_len"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
            assert getattr(got, name).dtype == np.int32
        got.validate(NUM_UNITS)
    np.testing.assert_array_equal(
        store.token_counts(), [len(d.text_ids) + len(d.unit_ids) for d in documents])
    with pytest.raises(IndexError, match="document 30 out of range for 30"):
        store[30]
    # DataLoader workers receive the store pickled.
    copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(copy[7].unit_ids, documents[7].unit_ids)


def test_text_round_trip(tmp_path, tokenizer):
    documents = [np.array(tokenizer.encode(" ".join(WORDS[: n + 1])), dtype=np.int32)
                 for n in range(10)]
    _write(tmp_path / "text", "text", documents, tokenizer)
    store = DocumentStore(tmp_path / "text")
    assert store.kind == "text" and len(store) == 10 and store.manifest.frame_rate is None
    for got, want in zip((store[i] for i in range(10)), documents, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(store.token_counts(), [len(d) for d in documents])


@pytest.mark.parametrize("kind", ["aligned", "text"])
def test_a_document_outlives_the_store_it_was_read_from(tmp_path, tokenizer, kind):
    """Documents are views of the mapped .bin, which megatron.core unmaps when its reader is
    collected: `DocumentStore(prefix)[0]` read after the store was dropped crashed the
    interpreter (SIGSEGV). The document now holds the mapping open (checked before it is read,
    so that without that the test fails instead of crashing)."""
    documents = ([_random_aligned(np.random.default_rng(0)) for _ in range(3)] if kind == "aligned"
                 else [np.arange(3, 3 + n, dtype=np.int32) for n in (4, 7, 2)])
    _write(tmp_path / kind, kind, documents, tokenizer)
    store = DocumentStore(tmp_path / kind)
    reader = weakref.ref(store._dataset)
    document = store[1]
    del store
    gc.collect()
    assert reader() is not None, "the document's mapping was closed with its store"
    parts = (("text_ids", "unit_ids", "seg_text_len", "seg_unit_len") if kind == "aligned"
             else (None,))
    for name in parts:
        got = document if name is None else getattr(document, name)
        want = documents[1] if name is None else getattr(documents[1], name)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32 and not got.flags.writeable
    del document, got
    gc.collect()
    assert reader() is None  # the mapping goes with the last document read from it



def test_a_pickled_store_maps_its_bin_again_instead_of_copying_it(tmp_path, tokenizer):
    """DataLoader workers receive the store pickled: the array of the mapped .bin documents are
    read from must not travel with it (4 MB of ids here)."""
    _write(tmp_path / "big", "text", [np.full(1 << 20, 5, dtype=np.int32)], tokenizer)
    copy = pickle.loads(pickle.dumps(DocumentStore(tmp_path / "big")))
    assert len(pickle.dumps(copy)) < 1 << 16
    assert copy[0].sum() == 5 << 20 and not copy[0].flags.writeable  # a view of its own mapping


def test_truncated_bin(aligned_store):
    prefix, _ = aligned_store
    bin_path = prefix.with_name(prefix.name + ".bin")
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(StoreError, match=rf"aligned.bin: is {size - 4} bytes but .*aligned.idx "
                                         rf"describes {size} bytes; the file is truncated"):
        DocumentStore(prefix)
    with open(bin_path, "r+b") as f:  # the other way: 4 bytes more than the index describes
        f.truncate(size + 4)
    with pytest.raises(StoreError, match=rf"aligned.bin: is {size + 4} bytes but .*aligned.idx "
                                         rf"describes {size} bytes; the file is longer: written "
                                         rf"to after its index, or a .bin of another run"):
        DocumentStore(prefix)


def test_an_empty_bin_is_named_without_noise_from_megatron(aligned_store, capfd):
    prefix, _ = aligned_store
    prefix.with_name(prefix.name + ".bin").write_bytes(b"")
    with pytest.raises(StoreError, match=r"aligned.bin: is empty \(0 bytes\); the file is "
                                         r"truncated"):
        DocumentStore(prefix)
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-9], r"is \d+ bytes but its header lists 120 sequences and 31 document"),
    (lambda raw: raw + b"\0", r"is \d+ bytes but its header lists 120 sequences"),
    (lambda raw: raw[:20], r"20 bytes, shorter than an index header"),
    (lambda raw: b"x" * len(raw), r"does not start with a version-1 Megatron index header"),
    # megatron.core raised "99 is not a valid DType" and printed an ignored AttributeError
    (lambda raw: raw[:17] + bytes([99]) + raw[18:], r"its header gives dtype code 99, not "
                                                    r"int32's 4"),
    (lambda raw: raw[:17] + bytes([8]) + raw[18:], r"its header gives dtype code 8"),
], ids=["truncated", "trailing bytes", "shorter than a header", "not an index",
        "unknown dtype code", "another dtype"])
def test_damaged_idx_is_named_before_megatron_reads_it(aligned_store, damage, message, capfd):
    prefix, _ = aligned_store
    idx_path = prefix.with_name(prefix.name + ".idx")
    idx_path.write_bytes(damage(idx_path.read_bytes()))
    with pytest.raises(StoreError, match=rf"aligned.idx: {message}.*(not a Megatron index|not "
                                         rf"written by tools/preprocess_data.py)"):
        DocumentStore(prefix)
    gc.collect()  # megatron's half-built reader, had it been made, would complain here
    assert "Exception ignored" not in capfd.readouterr().err



def _shift_document_boundaries(raw: bytes, shift: int, last_only: bool) -> bytes:
    boundaries = np.frombuffer(raw[34 + 12 * 120:], dtype=np.int64).copy()  # [31]
    if last_only:
        boundaries[-1] += shift
    else:
        boundaries += shift
    return raw[:34 + 12 * 120] + boundaries.tobytes()


@pytest.mark.parametrize("shift, last_only, bounds", [
    (4, False, "from sequence 4 to 124"),  # megatron.core: an AssertionError with no message
    (10**12, True, "from sequence 0 to 1000000000120"),
    (-120, True, "from sequence 0 to 0"),
])
def test_document_boundaries_outside_the_sequences_are_named(aligned_store, shift, last_only,
                                                             bounds):
    prefix, _ = aligned_store
    idx_path = prefix.with_name(prefix.name + ".idx")
    idx_path.write_bytes(_shift_document_boundaries(idx_path.read_bytes(), shift, last_only))
    with pytest.raises(StoreError, match=rf"aligned.idx: its document boundaries run {bounds}, "
                                         rf"not from 0 to its 120 sequences; the index is "
                                         rf"damaged \(re-run tools/preprocess_data.py\)"):
        DocumentStore(prefix)


def test_a_directory_given_as_a_prefix_is_named_with_the_datasets_in_it(aligned_store,
                                                                          tmp_path):
    prefix, _ = aligned_store
    with pytest.raises(ManifestError, match=rf"sub is a directory: name a dataset in it by its "
                                            rf"prefix, .* e.g. {prefix} \({prefix}\)"):
        DocumentStore(prefix.parent)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"empty is a directory: .* e.g. .*empty/corpus$"):
        DocumentStore(tmp_path / "empty")


def test_missing_manifest_and_data(aligned_store):
    prefix, _ = aligned_store
    prefix.with_name(prefix.name + ".bin").unlink()
    with pytest.raises(StoreError, match=r"aligned.bin: not found"):
        DocumentStore(prefix)
    with pytest.raises(ManifestError, match=r"aligned.bin.json: manifest not found; .*a dataset "
                                            r"is named by its prefix: pass .*aligned, without .bin"):
        DocumentStore(f"{prefix}.bin")
    prefix.with_name(prefix.name + ".json").unlink()
    with pytest.raises(ManifestError, match=r"aligned.json: manifest not found; [^;]*$"):
        DocumentStore(prefix)


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_a_data_file_that_is_a_fifo_is_refused_before_it_is_opened(aligned_store, suffix):
    """A FIFO in place of the .idx blocked the store's opening until a writer came."""
    prefix, _ = aligned_store
    path = prefix.with_name(prefix.name + suffix)
    path.unlink()
    with fifo_with_writer(path, b""), pytest.raises(
            StoreError, match=rf"{path}: is a FIFO \(named pipe\), not a file; pass the dataset "
                              rf"file as a regular file"):
        DocumentStore(prefix)


@pytest.mark.parametrize("field,value,message", [
    ("documents", 29, "holds 30 documents but .* says 29"),
    ("units", 1, "holds \\d+ units but .* says 1"),
])
def test_manifest_disagreeing_with_index(aligned_store, field, value, message):
    prefix, _ = aligned_store
    path = prefix.with_name(prefix.name + ".json")
    raw = json.loads(path.read_text())
    raw["counts"][field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=message):
        DocumentStore(prefix)


def test_unreadable_manifest(aligned_store):
    prefix, _ = aligned_store
    path = prefix.with_name(prefix.name + ".json")
    raw = json.loads(path.read_text())
    path.write_text("{")
    with pytest.raises(ManifestError, match="aligned.json: unreadable manifest"):
        DocumentStore(prefix)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99"):
        DocumentStore(prefix)
    for version in (True, 1.0):  # JSON true and 1.0 equal 1 in Python; no writer writes them
        path.write_text(json.dumps({**raw, "format_version": version}))
        with pytest.raises(ManifestError, match=f"format version {version!r} is not 1"):
            DocumentStore(prefix)
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="unreadable manifest .*expected a JSON object"):
        DocumentStore(prefix)
    # Both named no file: "'utf-8' codec can't decode ...", "manifest kind must be one of ..."
    path.write_bytes(b"\xff\xfe{\x00}\x00")
    with pytest.raises(ManifestError, match="aligned.json: unreadable manifest .*'utf-8' codec"):
        DocumentStore(prefix)
    path.write_text(json.dumps({**raw, "kind": "audio"}))
    with pytest.raises(ManifestError, match=r"aligned.json: unreadable manifest \(kind 'audio' is "
                                            r"not one of \('aligned', 'text'\)\)"):
        DocumentStore(prefix)


@pytest.mark.parametrize("section, key, value, message", [
    ("vocab", "text_size", None, r"unreadable vocabulary \(vocabulary field\(s\) 'text_size' "
                                 r"\(missing\) are not integers\)"),
    ("vocab", "num_units", "502", r"unreadable vocabulary \(vocabulary field\(s\) 'num_units' "
                                  r"\(str\) are not integers\)"),
    ("vocab", "size", 10**6, r"unreadable vocabulary \(vocabulary field 'size' is 1000000 but "
                             r"text_size \d+ and num_units \d+ make it \d+; the record was "
                             r"edited"),
    ("vocab", "pad_id", -1, r"unreadable vocabulary \(special ids must be >= 0"),
    ("counts", "documents", 30.0, r"unreadable manifest \(counts \['documents'\] are not integers"),
    ("counts", "units", "7", r"unreadable manifest \(counts \['units'\] are not integers"),
    ("tokenizer", "space_id", 10**6, r"unreadable manifest \(tokenizer space_id 1000000 is not "
                                      r"a piece of the \d+-piece tokenizer"),
    # TypeErrors where the fields were first used ("'int' object is not subscriptable")
    ("tokenizer", "sha256", 5, r"unreadable manifest \(tokenizer sha256 5: not what "
                               r"tools/preprocess_data.py writes\)"),
    ("tokenizer", "vocab_size", "290", r"unreadable manifest \(tokenizer vocab_size '290'"),
    (None, "frame_rate", "25", r"unreadable manifest \(frame_rate '25' is not a positive number"),
    (None, "frame_rate", None, r"unreadable manifest \(frame_rate None is not a positive number"),
])
def test_a_hand_edited_manifest_is_refused_by_name(aligned_store, section, key, value, message):
    prefix, _ = aligned_store
    path = prefix.with_name(prefix.name + ".json")
    raw = json.loads(path.read_text())
    record = raw if section is None else raw[section]
    if value is None and section is not None:
        del record[key]
    else:
        record[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"aligned.json: " + message):
        DocumentStore(prefix)


@pytest.mark.parametrize("edit, message", [
    # a vocabulary of another text size, derived ids and all: units at other joint ids
    (lambda raw: raw.update(vocab={**JointVocab(280, NUM_UNITS).to_dict(),
                                   "tokenizer_sha256": raw["tokenizer"]["sha256"]}),
     r"vocab text_size 280, tokenizer vocab_size 290"),
    (lambda raw: raw.update(num_units=502), r"vocab num_units 20, num_units 502"),
    (lambda raw: raw["vocab"].update(tokenizer_sha256="0" * 64),
     r"vocab tokenizer_sha256 000000000000\.\.\., tokenizer sha256 [0-9a-f]{12}\.\.\."),
    (lambda raw: raw["tokenizer"].update(space_id=2), r"tokenizer space_id 2, vocab eos_id 2"),
])
def test_a_manifest_that_contradicts_itself_is_refused(aligned_store, tokenizer, edit, message):
    """Each field reads well alone, but the vocabulary layout disagrees with the tokenizer or
    codebook recorded beside it: the store opened, and training built its model from the
    layout while the tokenizer check passed on the other record."""
    prefix, _ = aligned_store
    path = prefix.with_name(prefix.name + ".json")
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"aligned.json: contradicts itself \(" + message
                       + r"\): the manifest was edited or damaged.*re-run "
                         r"tools/preprocess_data.py"):
        DocumentStore(prefix)


def test_check_tokenizer(aligned_store, tokenizer, tmp_path):
    prefix, _ = aligned_store
    store = DocumentStore(prefix)
    store.check_tokenizer(tokenizer)
    smaller = _tokenizer(tmp_path / "small.model", 280)
    with pytest.raises(VocabularyError, match="290-piece tokenizer .* this one has 280 pieces"):
        store.check_tokenizer(smaller)
    other = _tokenizer(tmp_path / "other.model", 290, seed=1)
    assert other.sha256 != tokenizer.sha256
    with pytest.raises(VocabularyError, match="this tokenizer's file has sha256"):
        store.check_tokenizer(other)


def test_writer_refuses_wrong_kind_and_empty(tmp_path, tokenizer):
    writer = DocumentWriter(tmp_path / "t", "text")
    with pytest.raises(ValueError, match="cannot add an aligned document to a text dataset"):
        writer.add_aligned(_random_aligned(np.random.default_rng(0)))
    manifest = Manifest("text", joint_vocab(tokenizer).to_dict(),
                        TokenizerInfo("x", "y", 290), 502, None)
    with pytest.raises(StoreError, match="no documents to write"):
        writer.finalize(manifest)



@pytest.mark.parametrize("kind", ["aligned", "text"])
def test_writer_files_are_what_megatron_core_writes(tmp_path, tokenizer, kind):
    """The streamed index is byte for byte megatron.core's `IndexedDatasetBuilder`'s."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(3)
    documents = [_random_aligned(rng) for _ in range(50)]
    if kind == "text":
        documents = [doc.text_ids for doc in documents]  # some are empty
    _write(tmp_path / "ours", kind, documents, tokenizer)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for doc in documents:
        parts = ((doc.text_ids, doc.unit_ids, doc.seg_text_len, doc.seg_unit_len)
                 if kind == "aligned" else (doc,))
        builder.add_document(np.concatenate(parts).astype(np.int32), [len(p) for p in parts])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        ours = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours == (tmp_path / f"theirs{suffix}").read_bytes(), suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ours.bin", "ours.idx", "ours.json", "theirs.bin", "theirs.idx"]  # no spool left
    assert len(DocumentStore(tmp_path / "ours")) == 50


def test_writer_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer, monkeypatch):
    """Peak Python allocations while writing 4x the documents stay those of 1x: the sequence
    lengths are spooled to disk, not held in lists (megatron.core's builder holds ~300 bytes per
    aligned document until it writes the index). Blocks of 64 KiB, so both corpora span many."""
    import tracemalloc

    from megatron_lst.data import indexed

    monkeypatch.setattr(indexed, "_SPOOL_BUFFER", 1 << 16)
    doc = _random_aligned(np.random.default_rng(1))

    def peak_bytes(num_documents, name):
        counts = Counts(documents=num_documents, segments=num_documents * doc.num_segments,
                        text_pieces=num_documents * len(doc.text_ids),
                        units=num_documents * len(doc.unit_ids))
        manifest = Manifest("aligned", joint_vocab(tokenizer, NUM_UNITS).to_dict(),
                            TokenizerInfo(tokenizer.path, tokenizer.sha256, tokenizer.vocab_size),
                            NUM_UNITS, 25.0, counts, ["memory"])
        tracemalloc.start()
        try:
            writer = DocumentWriter(tmp_path / name, "aligned")
            for _ in range(num_documents):
                writer.add_aligned(doc)
            writer.finalize(manifest)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_bytes(20_000, "small"), peak_bytes(80_000, "large")
    assert len(DocumentStore(tmp_path / "large")) == 80_000
    assert large < small + 256 * 1024, (small, large)


def _sequence_views(prefix):
    """(writable int32 view of the .idx's sequence lengths, the .bin as a writable int32 array,
    the sequences' start in int32 elements)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    pointers = dataset.index.sequence_pointers // 4  # a copy: the index unmaps with `dataset`
    del dataset
    idx = np.memmap(str(prefix) + ".idx", dtype=np.uint8, mode="r+")
    count = int(idx[18:26].view(np.int64)[0])  # after the magic, version and dtype code
    lengths = idx[34:34 + 4 * count].view(np.int32)
    return lengths, np.memmap(str(prefix) + ".bin", dtype=np.int32, mode="r+"), pointers


def test_an_index_with_the_same_counts_in_another_order(aligned_store):
    prefix, documents = aligned_store
    lengths, _, _ = _sequence_views(prefix)
    first, second = lengths[0:4].copy(), lengths[4:8].copy()
    assert (first != second).any()
    lengths[0:4], lengths[4:8] = second, first  # documents 0 and 1 trade their lengths
    lengths.flush()
    with pytest.raises(StoreError, match=r"aligned.idx: sequence \d \(document 0\) starts at "
                                         r"byte \d+ of the .bin but the sequences before it end "
                                         r"at byte \d+: the index lists the sequences in another "
                                         r"order"):
        DocumentStore(prefix)


def test_a_negative_sequence_length_is_refused(aligned_store):
    """Lengths that still sum to the .bin and the manifest's counts, pointers moved to match:
    the store opened and document 0 read its units as text (a length of -5 read as empty)."""
    prefix, documents = aligned_store
    lengths, _, _ = _sequence_views(prefix)
    shift = int(lengths[1]) + 5
    lengths[0] += shift  # text ids take the units' place: units -5
    lengths[1] -= shift
    lengths.flush()
    idx = np.memmap(str(prefix) + ".idx", dtype=np.uint8, mode="r+")
    pointers = idx[34 + 4 * len(lengths):34 + 12 * len(lengths)].view(np.int64)
    pointers[1] += 4 * shift  # sequence 1 starts where the longer sequence 0 ends
    idx.flush()
    manifest = prefix.with_name(prefix.name + ".json")
    raw = json.loads(manifest.read_text())
    raw["counts"]["text_pieces"] += shift
    raw["counts"]["units"] -= shift
    manifest.write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=r"aligned.idx: sequence 1 \(document 0\) has length "
                                         r"-5; the index is damaged"):
        DocumentStore(prefix)


def _corrupt_and_index(prefix, document: int, sequence: int, value: int | None, change: int = 0):
    """Overwrite one stored value of `document` (its `sequence`-th array, first element), then
    build a row index over every document."""
    from megatron_lst.data.dataset import LSTDataset
    from megatron_lst.patching import Patcher, PatchingConfig

    _, data, pointers = _sequence_views(prefix)
    at = int(pointers[4 * document + sequence])
    data[at] = value if value is not None else data[at] + change
    data.flush()
    store = DocumentStore(prefix)
    LSTDataset(store, 200, 8, 24, Patcher(PatchingConfig("static", patch_size=3)), 0,
               index_workers=1)


@pytest.mark.parametrize("sequence, value, change, message", [
    (3, None, 1, r"segment unit lengths sum to \d+ but the document has \d+ units"),
    (2, None, 1, r"segment text lengths sum to \d+ but the document has \d+ text pieces"),
    (0, 290, 0, r"text id 290 is outside the tokenizer's 0..289"),
    (1, NUM_UNITS, 0, rf"speech unit {NUM_UNITS} is outside the codebook 0..{NUM_UNITS - 1}"),
])
def test_corrupt_documents_are_named_when_the_row_index_reads_them(aligned_store, sequence, value,
                                                                   change, message):
    prefix, documents = aligned_store
    victim = next(i for i, d in enumerate(documents) if len(d.text_ids) and len(d.unit_ids))
    with pytest.raises(DocumentError, match=rf"aligned.bin, document {victim}: {message}; the "
                                            rf"dataset is corrupt"):
        _corrupt_and_index(prefix, victim, sequence, value, change)


def test_out_of_range_text_ids_of_a_text_store_are_named(tmp_path, tokenizer):
    from megatron_lst.data.dataset import LSTDataset
    from megatron_lst.patching import Patcher, PatchingConfig

    documents = [np.array([5, 6, 7], dtype=np.int32), np.array([5, -3, 7], dtype=np.int32)]
    _write(tmp_path / "text", "text", documents, tokenizer)
    with pytest.raises(DocumentError, match=r"text.bin, document 1: text id -3 is outside"):
        LSTDataset(DocumentStore(tmp_path / "text"), 4, 4, 8,
                   Patcher(PatchingConfig("none")), 0, index_workers=1)


@pytest.mark.parametrize("special, name", [("eos_id", "EOS"), ("bos_id", "BOS")])
def test_bos_or_eos_among_the_text_pieces_is_named(tmp_path, tokenizer, special, name):
    """An EOS stored among a document's pieces (text spelling '</s>', kept as the special id by
    an older preprocessing) would end the document mid-way in a packed row: the row-index build
    names it instead, in text and aligned stores."""
    from megatron_lst.data.dataset import LSTDataset
    from megatron_lst.patching import Patcher, PatchingConfig

    special_id = getattr(tokenizer, special)
    documents = [np.array([5, 6, 7], dtype=np.int32), np.array([5, 6, special_id], dtype=np.int32)]
    _write(tmp_path / "text", "text", documents, tokenizer)
    with pytest.raises(DocumentError, match=rf"text.bin, document 1: text piece 2 is id "
                                            rf"{special_id}, the tokenizer's {name}; .* re-run"):
        LSTDataset(DocumentStore(tmp_path / "text"), 4, 4, 8,
                   Patcher(PatchingConfig("none")), 0, index_workers=1)
    aligned = [AlignedDocument(np.array([9, special_id], np.int32), np.array([1, 2], np.int32),
                               np.array([2, 0], np.int32), np.array([1, 1], np.int32))]
    _write(tmp_path / "aligned", "aligned", aligned, tokenizer)
    with pytest.raises(DocumentError, match=rf"aligned.bin, document 0: text piece 1 is id "
                                            rf"{special_id}, the tokenizer's {name}"):
        LSTDataset(DocumentStore(tmp_path / "aligned"), 4, 4, 8,
                   Patcher(PatchingConfig("static")), 0, index_workers=1)


def _megatron_lm_files(prefix, documents, dtype=np.int32, multimodal=False):
    """`documents` (lists of ids) as Megatron-LM's preprocess_data.py writes them, through
    megatron.core's `IndexedDatasetBuilder`: one sequence per document, no manifest."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    for document in documents:
        builder.add_item(torch.tensor(document, dtype=torch.int64), *([0] if multimodal else []))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def _text_manifest(prefix, tokenizer, documents):
    """A text manifest next to files another writer made (what copying one over would give)."""
    Manifest("text", joint_vocab(tokenizer, NUM_UNITS).to_dict(),
             TokenizerInfo(tokenizer.path, tokenizer.sha256, tokenizer.vocab_size), NUM_UNITS,
             None, Counts(documents=len(documents), text_pieces=sum(map(len, documents))),
             ["megatron-lm"]).save(prefix)


def test_megatron_lm_preprocess_output_is_named_with_the_way_to_convert_it(tmp_path, tokenizer):
    # Megatron-LM writes uint16 ids below 65500 tokens and no manifest.
    prefix = tmp_path / "corpus_text_document"
    documents = [[5, 6, 7], [8, 9]]
    _megatron_lm_files(prefix, documents, np.uint16)
    with pytest.raises(ManifestError, match=r"corpus_text_document.json: manifest not found; .*"
                                            r"corpus_text_document.bin/.idx are there without it, "
                                            r"as Megatron-LM's preprocess_data.py writes them: .*"
                                            r"run tools/preprocess_data.py on the source "
                                            r"documents \(text JSONL: --input-format text-jsonl\)"):
        DocumentStore(prefix)
    _text_manifest(prefix, tokenizer, documents)  # copied over: the ids are still uint16
    with pytest.raises(StoreError, match=r"corpus_text_document.idx: its header gives dtype code "
                                         r"8, not int32's 4 \(uint16 ids\): .* run "
                                         r"tools/preprocess_data.py on the source documents"):
        DocumentStore(prefix)


def test_a_megatron_int32_index_with_a_manifest_reads_as_written(tmp_path, tokenizer):
    prefix = tmp_path / "int32"
    documents = [[5, 6, 7], [], [8, 9]]  # a zero-length document among them
    _megatron_lm_files(prefix, documents)
    _text_manifest(prefix, tokenizer, documents)
    store = DocumentStore(prefix)
    assert [store[i].tolist() for i in range(3)] == documents


def test_a_multimodal_index_is_named_by_its_sequence_modes(tmp_path, tokenizer):
    # Its modes (one int8 per sequence) made the size check call it truncated.
    prefix = tmp_path / "multimodal"
    _megatron_lm_files(prefix, [[5, 6, 7], [8, 9]], multimodal=True)
    _text_manifest(prefix, tokenizer, [[5, 6, 7], [8, 9]])
    with pytest.raises(StoreError, match=r"multimodal.idx: holds a sequence mode for each of its 2 "
                                         r"sequences, a multimodal Megatron index"):
        DocumentStore(prefix)


@pytest.mark.parametrize("documents, message", [
    # Was "aligned.bin: is empty (0 bytes); the file is truncated": the files were whole.
    ([], r"empty.idx: holds no documents; a dataset needs at least one: leave it out of the "
         r"data paths"),
    ([[], []], r"empty.bin: holds no tokens: each of the 2 documents .*empty.idx lists is empty "
               r"\(no text pieces, no units\), nothing to train on"),
])
def test_a_dataset_with_nothing_in_it_is_named_as_such(tmp_path, tokenizer, documents, message,
                                                       capfd):
    prefix = tmp_path / "empty"
    _megatron_lm_files(prefix, documents)
    _text_manifest(prefix, tokenizer, documents)
    with pytest.raises(StoreError, match=message):
        DocumentStore(prefix)
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("block", [1, 3])
def test_opening_a_store_checks_it_block_by_block_with_memory_flat(aligned_store, monkeypatch,
                                                                   block):
    """The whole-index arrays of the check (cumulative byte offsets, one int64 a sequence) took
    640 MB to open a store of 10M aligned documents, on every rank: now a block at a time. An
    error in a later block is found and named as before."""
    from megatron_lst.data import indexed

    monkeypatch.setattr(indexed, "_VALIDATE_BLOCK", block)
    prefix, documents = aligned_store
    store = DocumentStore(prefix)
    assert len(store) == 30
    assert store.token_total() == sum(len(d.text_ids) + len(d.unit_ids) for d in documents)
    assert store.token_total(4, 9) == sum(len(d.text_ids) + len(d.unit_ids)
                                          for d in documents[4:9])
    del store
    lengths, _, pointers = _sequence_views(prefix)
    victim = 4 * 7 + 1  # document 7's units, in a later block
    lengths[victim] += 1
    lengths[victim + 1] -= 1  # the same total: only the next sequence's start moves
    lengths.flush()
    with pytest.raises(StoreError, match=rf"aligned.idx: sequence {victim + 1} \(document 7\) "
                                         rf"starts at byte {4 * int(pointers[victim + 1])} of the "
                                         rf".bin but the sequences before it end at byte "
                                         rf"{4 * int(pointers[victim + 1]) + 4}"):
        DocumentStore(prefix)
