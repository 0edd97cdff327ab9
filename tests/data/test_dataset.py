"""LSTDataset: the batch contract in every mode, an unbroken token stream, determinism, early-stopped
rows, curriculum steps, and text-only stores."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from document_cases import SPACE_ID, VOCAB, MemoryStore, aligned_store, text_store

from megatron_lst.data import dataset as dataset_module
from megatron_lst.data.dataset import DatasetError, LSTDataset
from megatron_lst.data.documents import AlignedDocument
from megatron_lst.data.interleave import Interleaver
from megatron_lst.patching.contract import check_batch
from megatron_lst.patching.curriculum import Patcher, PatchingConfig
from megatron_lst.patching.patchers import aligned_patch_lengths, static_patch_lengths

P, N = 24, 64
MODES = {
    "none": PatchingConfig(mode="none"),
    "static": PatchingConfig(mode="static", patch_size=4),
    "aligned": PatchingConfig(mode="aligned"),
    "aligned-merged": PatchingConfig(mode="aligned", silence="merged"),
    "mixed": PatchingConfig(mode="mixed", prob_static=0.5),
    "curriculum": PatchingConfig(mode="curriculum", aligned_until_step=2, static_from_step=6),
}


def dataset(config, store=None, num_samples=40, seq_length=P, max_tokens=N, seed=11, **kwargs):
    store = store if store is not None else aligned_store(0, 10)
    return LSTDataset(store, num_samples, seq_length, max_tokens, Patcher(config), seed,
                      space_id=SPACE_ID, **kwargs)


def stream(ds):
    """Rows glued back together (each row's head is the previous row's last token), with the
    index of the row each token came from and the patch lengths (heads dropped)."""
    tokens, rows, lengths = [], [], []
    for r in range(len(ds)):
        row_tokens, _, row_lengths = ds.row(r)
        if r:
            assert row_tokens[0] == tokens[-1]  # the head is the previous row's last token
            row_tokens, row_lengths = row_tokens[1:], row_lengths[1:]
        tokens += row_tokens.tolist()
        rows += [r] * len(row_tokens)
        lengths += row_lengths.tolist()
    return np.array(tokens), np.array(rows), np.array(lengths)


def documents_of(tokens):
    """Split a stream at EOS: [(start, end)] of its complete documents."""
    ends = np.flatnonzero(tokens == VOCAB.eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return list(zip(starts, ends, strict=True))


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_meets_the_batch_contract(mode):
    ds = dataset(MODES[mode])
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    for batch in loader:
        assert batch["tokens"].shape == (8, N) and batch["patch_lengths"].shape == (8, P)
        check_batch(batch, VOCAB)


def identify(store, seed, epoch, doc_tokens):
    """(index, layout) of the store document whose (seed, epoch, document) layout is `doc_tokens`."""
    interleaver = Interleaver(VOCAB, SPACE_ID)
    layouts = [interleaver(store[d], np.random.default_rng([seed, epoch, d, 1]))
               for d in range(len(store))]
    matches = [(d, doc) for d, doc in enumerate(layouts) if np.array_equal(doc.tokens, doc_tokens)]
    assert len(matches) == 1, "a document of the stream is no interleaving of the store"
    return matches[0]


def test_stream_holds_every_document_whole_in_shuffled_epochs():
    store = aligned_store(1, 6)
    seed = 3
    ds = dataset(MODES["static"], store, num_samples=60, seed=seed)
    tokens, _, lengths = stream(ds)
    docs = documents_of(tokens)
    assert len(docs) >= 2 * len(store)  # the rows cover more than two epochs
    expected_lengths, order = [], []
    for k, (a, b) in enumerate(docs):
        # Each document is laid out by its (seed, epoch, document) generator (module docstring).
        index, doc = identify(store, seed, k // len(store), tokens[a:b])
        order.append(index)
        expected_lengths.append(static_patch_lengths(doc, 4))
    # Each epoch visits every document once, in a new order.
    epochs = [order[e * len(store):(e + 1) * len(store)] for e in range(2)]
    assert all(sorted(e) == list(range(len(store))) for e in epochs)
    assert epochs[0] != epochs[1]
    # Rows are made of the documents' own whole-document patches, with nothing dropped.
    full = np.concatenate(expected_lengths)
    np.testing.assert_array_equal(lengths[:len(full)], full)


def test_rows_stop_early_when_the_next_patch_does_not_fit():
    ds = dataset(PatchingConfig(mode="static", patch_size=8), aligned_store(2, 8, 120),
                 num_samples=50, seq_length=16, max_tokens=24)
    stopped = 0
    for r in range(len(ds) - 1):
        row_tokens, _, row_lengths = ds.row(r)
        assert len(row_tokens) <= 24 + 1 and len(row_lengths) <= 16
        if len(row_lengths) < 16:
            stopped += 1
            # The next row opens with the patch that did not fit.
            next_patch = ds.row(r + 1)[2][1]
            assert len(row_tokens) + next_patch > 24 + 1
            sample = ds[r]
            assert (sample["patch_lengths"][len(row_lengths):] == 0).all()
    assert stopped > 0
    stream(ds)  # still one unbroken stream


def test_samples_are_deterministic_and_depend_on_the_seed():
    a, b = dataset(MODES["mixed"]), dataset(MODES["mixed"])
    c = dataset(MODES["mixed"], seed=12)
    for i in (0, 7, 39):
        for key in a[i]:
            torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(10))
    # Random access gives what sequential access gives.
    late_first = dataset(MODES["mixed"])[39]
    assert torch.equal(late_first["tokens"], a[39]["tokens"])


@pytest.mark.parametrize("positions_scale", [1, 3])
def test_curriculum_follows_the_training_step_of_each_document(positions_scale):
    gbs, switch, seed = 4, 3, 11  # aligned through step 3, static after it
    config = PatchingConfig(mode="curriculum", aligned_until_step=switch, static_from_step=switch)
    store = aligned_store(4, 10)
    positions = np.arange(30) * positions_scale
    ds = dataset(config, store, num_samples=30, seed=seed, global_batch_size=gbs,
                 sample_positions=positions)
    tokens, rows, lengths = stream(ds)
    starts = np.cumsum(lengths) - lengths
    seen = {"aligned": 0, "static": 0}
    for k, (a, b) in enumerate(documents_of(tokens)):
        _, doc = identify(store, seed, k // len(store), tokens[a:b])
        # The rule is drawn at the step of the row holding the document's BOS.
        rule = "aligned" if positions[rows[a]] // gbs <= switch else "static"
        expected = aligned_patch_lengths(doc) if rule == "aligned" else static_patch_lengths(doc, 4)
        np.testing.assert_array_equal(lengths[(starts >= a) & (starts < b)], expected)
        if not np.array_equal(aligned_patch_lengths(doc), static_patch_lengths(doc, 4)):
            seen[rule] += 1
    assert seen["aligned"] and seen["static"]


def test_text_store_rows_count_tokens():
    store = text_store(5, 7)
    ds = dataset(MODES["static"], store, num_samples=25, seq_length=P, max_tokens=P - 1)
    for i in range(len(ds)):
        sample = ds[i]
        # Every patch is one token, so P patches are exactly N + 1 = P tokens: no padding.
        assert (sample["patch_lengths"] == 1).all() and (sample["loss_mask"] == 1).all()
        assert (sample["modality"] == 0).all()
    tokens, _, _ = stream(ds)
    for a, b in documents_of(tokens):
        assert tokens[a] == VOCAB.bos_id and tokens[a + 1] == VOCAB.text_marker
        assert any(np.array_equal(tokens[a + 2:b - 1], d) for d in store.documents)


@pytest.mark.parametrize("mode", ["curriculum", "mixed"])
def test_validation_mode_patches_as_at_inference(mode):
    """Validation rows are static for curriculum and mixed models (mixed ones drew aligned
    patching for half of their documents)."""
    ds = dataset(MODES[mode], training=False)
    reference = dataset(MODES["static"])
    for i in range(len(ds)):
        assert torch.equal(ds[i]["patch_lengths"], reference[i]["patch_lengths"])
        assert ds.step_of_row(i) is None


class DescribedStore(MemoryStore):
    """A store that names where its documents are stored, as DocumentStore does."""

    def describe(self, index: int) -> str:
        return f"corpus.bin, document {index}"


def test_a_patch_longer_than_max_tokens_is_an_error():
    long_silence = AlignedDocument(np.array([7], np.int32), np.zeros(81, np.int32),
                                   np.array([1, 0], np.int32), np.array([1, 80], np.int32))
    with pytest.raises(DatasetError, match="document 0: a patch of 80 tokens .* is more than a "
                                           "row of --max-tokens 64 holds"):
        dataset(MODES["aligned"], MemoryStore("aligned", [long_silence]), num_samples=3)


@pytest.mark.parametrize("config, message", [
    (MODES["aligned"], r"80 tokens \(the units of one word or silence\) is more than a row of --max-tokens 64 "
                       r"holds; raise --max-tokens to at least 80; or patch speech statically "
                       r"\(--patching-mode static\), or leave that utterance out"),
    (PatchingConfig(mode="static", patch_size=100), r"82 tokens \(static patching\) is more than "
                                                    r"a row of --max-tokens 64 holds; raise "
                                                    r"--max-tokens to at least 82 or give a smaller "
                                                    r"--patch-size"),
])
def test_a_patch_longer_than_max_tokens_names_the_stored_document_and_the_fix(config, message):
    """The refusal named only 'document 1' (no file) and told an aligned run to 'use smaller
    patches', which no aligned flag does."""
    fits = AlignedDocument(np.array([7], np.int32), np.zeros(8, np.int32),
                           np.array([1, 0], np.int32), np.array([1, 7], np.int32))
    long_silence = AlignedDocument(np.array([7], np.int32), np.zeros(81, np.int32),
                                   np.array([1, 0], np.int32), np.array([1, 80], np.int32))
    store = DescribedStore("aligned", [fits, long_silence])
    with pytest.raises(DatasetError, match=r"^corpus.bin, document 1: a patch of "
                                           + message):
        dataset(config, store, num_samples=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(store=MemoryStore("aligned", [])), "store is empty"),
    (dict(store=MemoryStore("audio", [np.zeros(3)])), "kind must be 'aligned' or 'text'"),
    (dict(seq_length=1), "seq_length counts patches and must be >= 2"),
    (dict(max_tokens=10), r"max_tokens \(10\) must be >= seq_length - 1 \(23\)"),
    (dict(global_batch_size=0), "global_batch_size must be >= 1"),
    (dict(sample_positions=np.arange(3)), "sample_positions has 3 entries for 40 samples"),
    (dict(index_workers=-1), "index_workers must be >= 0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(DatasetError, match=message):
        dataset(MODES["static"], **kwargs)


@pytest.fixture
def pool_after_a_few_documents(monkeypatch):
    """Start the row-index worker pool after 5 in-process documents, in small blocks, and record
    whether a pool ran."""
    monkeypatch.setattr(dataset_module, "IN_PROCESS_PLANS", 5)
    monkeypatch.setattr(dataset_module, "MAX_PLAN_BLOCK", 16)
    pools = []
    exit_plans = dataset_module._PlanSource.__exit__

    def recording_exit(self, *exc_info):
        pools.append(self.pool is not None)
        return exit_plans(self, *exc_info)

    monkeypatch.setattr(dataset_module._PlanSource, "__exit__", recording_exit)
    return pools


@pytest.mark.parametrize("mode", ["static", "aligned", "mixed", "curriculum", "text"])
def test_row_index_does_not_depend_on_the_worker_count(mode, pool_after_a_few_documents):
    store = text_store(0, 12) if mode == "text" else aligned_store(2, 12)
    config = MODES["static" if mode == "text" else mode]
    kwargs = dict(num_samples=120, global_batch_size=8)
    serial = dataset(config, store, index_workers=0, **kwargs)
    parallel = dataset(config, store, index_workers=2, **kwargs)
    assert pool_after_a_few_documents == [False, True]
    assert parallel._heads[-1, 0] > 40  # the pool planned most of the stream
    np.testing.assert_array_equal(serial._heads, parallel._heads)
    for r in (0, 57, 119):
        for a, b in zip(serial.row(r), parallel.row(r), strict=True):
            np.testing.assert_array_equal(a, b)


def test_worker_pool_reports_a_patch_longer_than_max_tokens(pool_after_a_few_documents):
    fits = AlignedDocument(np.array([7], np.int32), np.zeros(8, np.int32),
                           np.array([1, 0], np.int32), np.array([1, 7], np.int32))
    long_silence = AlignedDocument(np.array([7], np.int32), np.zeros(81, np.int32),
                                   np.array([1, 0], np.int32), np.array([1, 80], np.int32))
    store = MemoryStore("aligned", [fits] * 30 + [long_silence])
    with pytest.raises(DatasetError, match="document 30: a patch of 80 tokens .* is more than a "
                                           "row of --max-tokens 64 holds"):
        dataset(MODES["aligned"], store, num_samples=400, index_workers=2)
    assert pool_after_a_few_documents == [True]


class UnreadableDocument(MemoryStore):
    """A store whose document `bad` cannot be read."""

    def __init__(self, base: MemoryStore, bad: int):
        super().__init__(base.kind, base.documents)
        self.bad = bad

    def __getitem__(self, index: int):
        if index == self.bad:
            raise DatasetError(f"document {index} is unreadable")
        return super().__getitem__(index)


@pytest.mark.parametrize("bad_position, needed", [(30, False), (7, True)])
def test_an_error_planning_ahead_counts_only_where_the_rows_reach(
        bad_position, needed, pool_after_a_few_documents):
    """Workers plan blocks ahead of need: a bad document the rows never reach must not fail the
    build (it would not without workers); one they reach fails it the same way."""
    seed, base = 11, aligned_store(3, 200)
    bad = int(np.random.default_rng([seed, 0, 0]).permutation(200)[bad_position])  # epoch 0 order
    for workers in (0, 2):
        store = UnreadableDocument(base, bad)
        if needed:
            with pytest.raises(DatasetError, match=f"document {bad} is unreadable"):
                dataset(MODES["static"], store, num_samples=20, seed=seed, index_workers=workers)
        else:
            ds = dataset(MODES["static"], store, num_samples=20, seed=seed, index_workers=workers)
            # The rows end inside the pool's first block (positions 5..36), which the pool
            # planned whole, bad document included.
            assert 5 < ds._heads[-1, 0] < bad_position
    assert pool_after_a_few_documents == [False, True]


def test_index_out_of_range():
    ds = dataset(MODES["static"], num_samples=2)
    with pytest.raises(IndexError, match="outside 0..1"):
        ds[2]


FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"


def test_store_of_the_reference_sample_meets_the_contract(tmp_path):
    """End to end on real files: reference JSONL -> indexed store -> dataset -> batches."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    indexed = pytest.importorskip("megatron_lst.data.indexed")
    manifest = pytest.importorskip("megatron_lst.data.manifest")
    jsonl_corpus = pytest.importorskip("megatron_lst.data.jsonl_corpus")
    text_tokenizer = pytest.importorskip("megatron_lst.tokenizer.text_tokenizer")
    tokenizer = text_tokenizer.load_text_tokenizer(FIXTURES / "spm.model")
    vocab = text_tokenizer.joint_vocab(tokenizer)
    writer = indexed.DocumentWriter(tmp_path / "mls", "aligned")
    counts = manifest.Counts()
    for source in jsonl_corpus.read_reference_jsonl(FIXTURES / "mls.chunk.00.on_the_fly", tokenizer):
        writer.add_aligned(source.document)
        counts.add(source.counts)
    writer.finalize(manifest.Manifest(
        "aligned", vocab.to_dict(),
        manifest.TokenizerInfo(str(tokenizer.path), tokenizer.sha256, tokenizer.vocab_size),
        vocab.num_units, 25.0, counts, ["mls.chunk.00.on_the_fly"]))
    store = indexed.DocumentStore(tmp_path / "mls")
    for config in MODES.values():
        ds = LSTDataset(store, 24, 64, 256, Patcher(config), 0, global_batch_size=4,
                        space_id=tokenizer.space_id, index_cache_dir=tmp_path / "rows")
        for batch in torch.utils.data.DataLoader(ds, batch_size=8):
            check_batch(batch, vocab)
    assert len(list((tmp_path / "rows").glob("lst_rows_*.npy"))) == len(MODES)


def test_mode_none_counts_tokens():
    ds = dataset(MODES["none"], num_samples=10)
    for i in range(len(ds)):
        sample = ds[i]
        assert int(sample["loss_mask"].sum()) == P - 1  # P tokens in the row, P - 1 inputs
        assert (sample["patch_lengths"][:-1] == 1).all()
        assert sample["patch_lengths"][-1] == 1 + N - (P - 1)  # the padding joins the last


def test_row_index_cache(tmp_path, monkeypatch):
    store = aligned_store(6, 8)
    store.prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.json").write_text("{}")
    cache = tmp_path / "cache"
    built = dataset(MODES["curriculum"], store, index_cache_dir=cache, global_batch_size=2)
    assert len(list(cache.glob("lst_rows_*.npy"))) == 1

    def no_build(self):
        raise AssertionError("the cached row index was not used")
    with monkeypatch.context() as patch:
        patch.setattr(LSTDataset, "_build_row_heads", no_build)
        loaded = dataset(MODES["curriculum"], store, index_cache_dir=cache, global_batch_size=2)
    # Mapped, not read into each rank's memory (24 bytes a row: 1.2 GB for 50M rows).
    assert isinstance(loaded._heads, np.memmap)
    for i in (0, 17, 39):
        assert torch.equal(loaded[i]["tokens"], built[i]["tokens"])
        assert torch.equal(loaded[i]["patch_lengths"], built[i]["patch_lengths"])
    # Any setting of the cut, or a rewritten store, gives another index file.
    dataset(MODES["curriculum"], store, index_cache_dir=cache, global_batch_size=3)
    dataset(MODES["static"], store, index_cache_dir=cache, global_batch_size=2)
    (tmp_path / "corpus.json").write_text('{"changed": 1}')
    dataset(MODES["curriculum"], store, index_cache_dir=cache, global_batch_size=2)
    assert len(list(cache.glob("lst_rows_*.npy"))) == 4
    assert not list(cache.glob("*.partial.npy"))



def test_row_index_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    """The store rewritten in place with segments of the same lengths in another order (same
    .bin size, same .idx) and its old mtime set back, as `cp -p` or `rsync -t` leave it: the
    cached index of the old segments would cut the new documents at the wrong patches."""
    store = aligned_store(6, 8)
    store.prefix = str(tmp_path / "corpus")
    data = tmp_path / "corpus.bin"
    data.write_bytes(b"old segments")
    cache = tmp_path / "cache"
    dataset(MODES["aligned"], store, index_cache_dir=cache)
    before = data.stat()
    store.documents = [AlignedDocument(doc.text_ids, doc.unit_ids, doc.seg_text_len[::-1].copy(),
                                       doc.seg_unit_len[::-1].copy()) for doc in store.documents]
    data.write_bytes(b"new segments")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    cached = dataset(MODES["aligned"], store, index_cache_dir=cache)
    fresh = dataset(MODES["aligned"], store)
    assert not np.array_equal(cached._heads, dataset(MODES["aligned"], aligned_store(6, 8))._heads)
    np.testing.assert_array_equal(cached._heads, fresh._heads)
    assert len(list(cache.glob("lst_rows_*.npy"))) == 2


def _cached_static_dataset(tmp_path):
    """(store on disk, cache directory, the dataset built, its cached row index file)."""
    store = aligned_store(6, 8)
    store.prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.json").write_text("{}")
    cache = tmp_path / "cache"
    built = dataset(MODES["static"], store, index_cache_dir=cache)
    (cached,) = cache.glob("lst_rows_*.npy")
    return store, cache, built, cached


def test_row_index_cache_leaves_another_hosts_partial_file_alone(tmp_path):
    """Ranks on several hosts of a shared file system may share a process id: a writer must not
    take over (and rename away) a file another process is still writing."""
    store, cache, built, cached = _cached_static_dataset(tmp_path)
    cached.unlink()
    foreign = cache / f"{cached.stem}.{os.getpid()}.partial.npy"  # what the old names were
    foreign.write_bytes(b"another host is writing this")
    rebuilt = dataset(MODES["static"], store, index_cache_dir=cache)
    assert foreign.read_bytes() == b"another host is writing this"
    # with the permissions of any new file (mkstemp's were owner-only: another user resuming
    # the run found the index unreadable, called it damaged and built it again)
    umask = os.umask(0o022)
    os.umask(umask)
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask
    np.testing.assert_array_equal(np.load(cached), built._heads)
    np.testing.assert_array_equal(rebuilt._heads, built._heads)
    assert sorted(cache.iterdir()) == sorted([cached, foreign])


@pytest.mark.parametrize("damage", [lambda raw: raw[:50], lambda raw: b"garbage",
                                    lambda raw: raw[:-8]])  # a whole header, a row short
def test_a_damaged_row_index_cache_is_rebuilt(tmp_path, caplog, damage):
    store, cache, built, cached = _cached_static_dataset(tmp_path)
    intact = cached.read_bytes()
    cached.write_bytes(damage(intact))
    rebuilt = dataset(MODES["static"], store, index_cache_dir=cache)
    assert "damaged row index" in caplog.text
    assert not isinstance(rebuilt._heads, np.memmap)
    assert torch.equal(rebuilt[5]["tokens"], built[5]["tokens"])
    assert cached.read_bytes() == intact


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("seq_length", [2, 5, P])
def test_every_row_index_cut_passes_the_cached_index_check(mode, seq_length):
    """The check of a cached index holds for every index a cut makes (else a sound cache would
    be rebuilt at every start)."""
    for store in (aligned_store(6, 8), text_store(3, 8)):
        built = dataset(MODES[mode], store, num_samples=60, seq_length=seq_length,
                        global_batch_size=2)
        assert dataset_module.row_index_problem(built._heads, seq_length) is None


def _set(at, value):
    def damage(heads):
        heads[at] = value
    return damage


@pytest.mark.parametrize("check_block", [dataset_module._CHECK_BLOCK, 3])
@pytest.mark.parametrize(("damage", "said"), [
    (_set((7, 0), 1 << 40), "row 7 starts at (1099511627776, "),  # a document beyond the stream
    (_set((3, 1), -5), "row 3 starts at ("),  # a negative patch
    (_set((39, 2), 48), "row 39 starts at ("),  # a start row after the row
    (_set((0, 1), 2), "row 0 starts at (0, 2, 0), not (0, 0, 0)"),
    (_set(slice(10, 20), np.arange(30).reshape(10, 3)), "row 10 starts at (0, 1, 2)"),
])
def test_a_row_index_cache_of_impossible_values_is_rebuilt(tmp_path, caplog, monkeypatch,
                                                          check_block, damage, said):
    """Right shape and dtype, values no cut makes: found by vectorised bounds checks (block by
    block: 3 checks successions across blocks) when the cache is loaded, and the index is built
    again (it is derived data; the rebuilt one replaces the damaged file)."""
    store, cache, built, cached = _cached_static_dataset(tmp_path)
    heads = np.load(cached)
    damage(heads)
    np.save(cached, heads)
    monkeypatch.setattr(dataset_module, "_CHECK_BLOCK", check_block)
    rebuilt = dataset(MODES["static"], store, index_cache_dir=cache)
    assert f"{cached}: damaged row index ({said}" in caplog.text
    np.testing.assert_array_equal(rebuilt._heads, built._heads)
    np.testing.assert_array_equal(np.load(cached), built._heads)


def _head_to_push_past_its_document(built, heads):
    """(row, patches of its head's document) of a row whose head patch can be set to that
    count within the load check's bounds: the row after it starts in another document, and
    the row takes the head into a new document (patch up to P - 2) or moves on in its own."""
    for row in range(len(heads) - 1, 0, -1):
        position, _, start_row = (int(v) for v in heads[row])
        if row + 1 < len(heads) and heads[row + 1, 0] == position:
            continue
        patches = len(built._patched(position, start_row).patch_ends)
        same_document = position == heads[row - 1, 0]
        highest = int(heads[row - 1, 1]) + P - 1 if same_document else P - 2
        if highest >= patches:
            return row, patches
    raise AssertionError("no row to craft: the store's documents are too long")


def test_a_cached_head_past_its_documents_patches_is_named_when_read(tmp_path):
    """A head patch within the bounds of the load check but past the end of its document
    (telling that needs the patching): reading the row names the cache file and what to do."""
    store, cache, built, cached = _cached_static_dataset(tmp_path)
    heads = np.load(cached)
    row, patches = _head_to_push_past_its_document(built, heads)
    heads[row, 1] = patches
    np.save(cached, heads)
    loaded = dataset(MODES["static"], store, index_cache_dir=cache)
    assert dataset_module.row_index_problem(loaded._heads, P) is None
    with pytest.raises(DatasetError, match=rf"{cached}: damaged row index: row {row} starts "
                                           rf"after patch {patches} of a document of {patches} "
                                           rf"patches; delete the file"):
        loaded[row]


def test_a_row_index_the_disk_cannot_hold_is_an_error_naming_it(tmp_path, disk_full_at):
    """np.save dropped the error of a full disk: a row index cut short was published as the
    cache, and the next run had to find it damaged and build it again."""
    store, cache, _, cached = _cached_static_dataset(tmp_path)
    size = cached.stat().st_size
    cached.unlink()
    with (disk_full_at(size - 24),
          pytest.raises(DatasetError, match=f"cannot write the row index {cached} \\(the disk "
                                            f"took {size - 24} of the array's {size} bytes\\): "
                                            f"free space on its filesystem")):
        dataset(MODES["static"], store, index_cache_dir=cache)
    assert list(cache.iterdir()) == []


class _StoreRange:
    """Documents [start, stop) of a store, sharing its files (as training's splits do)."""

    def __init__(self, store, start, stop):
        self.kind, self.vocab, self.prefix = store.kind, store.vocab, store.prefix
        self.store, self.start, self.stop = store, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, index):
        return self.store[self.start + index]


def test_row_index_cache_tells_ranges_of_one_store_apart(tmp_path):
    store = aligned_store(6, 12)
    store.prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.json").write_text("{}")
    cache = tmp_path / "cache"
    for start, stop in ((0, 4), (4, 8), (8, 10)):  # equal lengths too: only `start` differs
        view = _StoreRange(store, start, stop)
        cached = dataset(MODES["static"], view, index_cache_dir=cache)
        fresh = dataset(MODES["static"], view)
        for i in (0, 17, 39):
            assert torch.equal(cached[i]["tokens"], fresh[i]["tokens"])
    assert len(list(cache.glob("lst_rows_*.npy"))) == 3


def test_epoch_orders_keep_a_few_epochs_and_answer_as_the_formula():
    # Every epoch's permutation was kept: 400 MB an epoch for 100M documents, per loader worker.
    from megatron_lst.data.dataset import EpochOrders

    orders = EpochOrders(seed=5, size=7)
    for position in [*range(70), 3, 68, 10, 69]:  # ten epochs forward, then back and forth
        epoch, offset = divmod(position, 7)
        expected = int(np.random.default_rng([5, epoch, 0]).permutation(7)[offset])
        assert orders.document(position) == (epoch, expected)
        assert len(orders._orders) <= EpochOrders.KEPT


def test_row_index_progress_names_the_store_and_reaches_on_progress(monkeypatch, caplog):
    import logging

    from megatron_lst.data import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "PROGRESS_SECONDS", -1.0)  # a line after every row
    store = text_store(3, 20)
    store.prefix = "data/text"
    lines = []
    with caplog.at_level(logging.INFO, logger=dataset_module.__name__):
        LSTDataset(store, 6, 8, 8, Patcher(PatchingConfig("none")), 0, index_workers=1,
                   on_progress=lines.append)
    assert len(lines) == 6
    assert lines[0].startswith("row index of data/text: 1 of 6 rows, ")
    assert lines[-1].startswith("row index of data/text: 6 of 6 rows, ")
    assert [r.getMessage() for r in caplog.records if "row index of" in r.getMessage()] == lines
