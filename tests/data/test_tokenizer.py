import errno
import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lst.tokenizer import InterleavedCodec, JointVocab, VocabularyError, joint_vocab
from megatron_lst.tokenizer.text_tokenizer import (
    VocabSizeError,
    load_text_tokenizer,
    train_sentencepiece,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference_lst"
SEP = "<LST MODE SEP>"

WORDS = ("the a of and to in is it speech text model unit word hello world time pleasant river "
         "stone light night sound").split()


def _tiny_corpus(seed: int = 0, lines: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Not registered in sys.modules, as other code loads the tools: they must work like that,
    # worker pools included.
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = train_sentencepiece(_tiny_corpus(), tmp_path_factory.mktemp("spm") / "spm.model", 300)
    return load_text_tokenizer(model)


@pytest.fixture(scope="module")
def reference_spm():
    if not FIXTURES.is_dir():
        pytest.skip("reference fixtures not present")
    return load_text_tokenizer(FIXTURES / "spm.model")


def _fixture_words() -> list[list[str]]:
    lines = (FIXTURES / "mls.chunk.00.on_the_fly").read_text().splitlines()
    out = []
    for line in lines:
        parts = json.loads(line)["interleaved"].split(SEP)[1:]
        out.append([p.split(" ", 1)[1].strip() for p in parts if p.startswith("TEXT")])
    return out


def test_reference_spm_ids(reference_spm):
    tok = reference_spm
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 1, 2)
    assert tok.space_id == 487  # '▁'
    vocab = joint_vocab(tok)
    assert (vocab.text_marker, vocab.speech_marker, vocab.unit_offset, vocab.size) == (
        516, 517, 518, 1020)


def test_word_by_word_equals_joined_run_on_fixture(reference_spm):
    tok = reference_spm
    for words in _fixture_words():
        words = [w for w in words if w != "[SIL]"]
        ids, lengths = tok.encode_words(words)
        assert ids.tolist() == tok.encode(" ".join(words))
        assert lengths.tolist() == [len(tok.encode(w)) for w in words]
        # A run followed by another segment: the reference encodes "w1 ... wn " (trailing space).
        assert tok.encode(" ".join(words) + " ") == ids.tolist() + [tok.space_id]


def test_encode_words_caches_and_handles_bytes(tiny):
    words = ["hello", "naïve", "123", "hello", ""]
    ids, lengths = tiny.encode_words(words)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert lengths[-1] == 0 and lengths[0] == lengths[3]
    assert ids.tolist() == tiny.encode("hello naïve 123 hello")
    assert tiny.decode(ids.tolist()) == "hello naïve 123 hello"
    assert set(tiny._word_cache) == set(words)


def test_training_is_deterministic(tmp_path):
    a = train_sentencepiece(_tiny_corpus(), tmp_path / "a.model", 300)
    b = train_sentencepiece(_tiny_corpus(), tmp_path / "b.model", 300)
    assert load_text_tokenizer(a).sha256 == load_text_tokenizer(b).sha256


def test_a_sentence_longer_than_sentencepiece_reads_by_default_is_trained_on(tmp_path):
    """SentencePiece skips every sentence of more than 4192 bytes, silently: a text JSONL story on
    one line was left out, so its words came out as byte pieces."""
    story = " ".join(["zebra"] * 1000)  # 5999 bytes, the corpus's only "z"
    tokenizer = load_text_tokenizer(
        train_sentencepiece(_tiny_corpus() + [story], tmp_path / "m.model", 300))
    pieces = [tokenizer._sp.id_to_piece(i) for i in tokenizer.encode("zebra")]
    assert not any(piece.startswith("<0x") for piece in pieces), pieces


def test_training_over_a_model_when_the_disk_fills_keeps_that_model(tmp_path, disk_full_at):
    """The model was written over the old one: a disk that filled part way left a model cut
    short in its place (and the tool stopped with a traceback)."""
    path = train_sentencepiece(_tiny_corpus(), tmp_path / "spm.model", 300)
    before = path.read_bytes()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(line + "\n" for line in _tiny_corpus(seed=1)))
    with disk_full_at(len(before) // 2), pytest.raises(OSError) as full:
        train_sentencepiece(_tiny_corpus(seed=1), path, 300)
    assert full.value.errno == errno.EFBIG, full.value  # the write the full disk stopped
    assert path.read_bytes() == before
    with (disk_full_at(len(before) // 2),
          pytest.raises(SystemExit, match=f"error: File too large; --output {path} is as it "
                                          f"was: free space, or write the model elsewhere")):
        _load_tool("train_tokenizer").main(["--input", str(corpus), "--vocab-size", "300",
                                            "--output", str(path)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "spm.model"]


def test_train_tool_reproduces_reference_pieces(tmp_path, reference_spm):
    tool = _load_tool("train_tokenizer")
    model = tool.main(["--input", str(FIXTURES / "mls.chunk.00.on_the_fly"), "--input-format",
                       "reference-jsonl", "--vocab-size", "512", "--output",
                       str(tmp_path / "spm.model")])
    ours, theirs = load_text_tokenizer(model)._sp, reference_spm._sp
    assert [ours.id_to_piece(i) for i in range(512)] == [theirs.id_to_piece(i) for i in range(512)]


def test_train_tool_text_jsonl(tmp_path):
    tool = _load_tool("train_tokenizer")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": line}) + "\n" for line in _tiny_corpus()))
    model = tool.main(["--input", str(corpus), "--input-format", "text-jsonl", "--json-key",
                       "body", "--vocab-size", "300", "--output", str(tmp_path / "t.model")])
    assert load_text_tokenizer(model).vocab_size == 300
    corpus.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit, match=r"c.jsonl:1: not a text-jsonl line"):
        tool.main(["--input", str(corpus), "--input-format", "text-jsonl", "--json-key", "body",
                   "--output", str(tmp_path / "u.model")])
    # Without --input-format text-jsonl, --json-key was ignored and the JSON lines trained it.
    with pytest.raises(SystemExit, match=r"--json-key body reads --input-format text-jsonl, not "
                                         r"text; add --input-format text-jsonl or drop it"):
        tool.main(["--input", str(corpus), "--json-key", "body", "--output",
                   str(tmp_path / "v.model")])
    assert not (tmp_path / "v.model").exists()


@pytest.mark.parametrize("input_format, line", [
    ("text", "{}"), ("text-jsonl", '{{"text": "{}"}}'),
    ("reference-jsonl", '{{"interleaved": "' + SEP + 'TEXT {}"}}')])
def test_train_tool_drops_a_byte_order_mark_and_the_cr_of_crlf(tmp_path, input_format, line):
    """A corpus saved with a byte-order mark: its first line was refused as JSON, or (plain text)
    trained U+FEFF as a character of the first word, a piece no preprocessed word ever uses.
    CRLF line ends train what LF ones do (no sentence ends in a CR)."""
    tool = _load_tool("train_tokenizer")
    lines = "".join(line.format(text) + "\n" for text in _tiny_corpus())
    plain, marked, crlf = tmp_path / "plain.txt", tmp_path / "marked.txt", tmp_path / "crlf.txt"
    plain.write_text(lines, encoding="utf-8")
    marked.write_text(lines, encoding="utf-8-sig")
    crlf.write_bytes(lines.replace("\n", "\r\n").encode("utf-8"))
    models = [tool.main(["--input", str(corpus), "--input-format", input_format,
                         "--vocab-size", "300", "--output", str(tmp_path / f"{corpus.stem}.model")])
              for corpus in (plain, marked, crlf)]
    assert models[0].read_bytes() == models[1].read_bytes() == models[2].read_bytes()


def test_train_tool_refuses_bad_inputs_and_keeps_the_corpus(tmp_path):
    """--output naming the corpus replaced it with the model; a missing or non-UTF-8 input and a
    JSON value that is no string were tracebacks (FileNotFoundError, UnicodeDecodeError,
    AttributeError)."""
    tool = _load_tool("train_tokenizer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_tiny_corpus()) + "\n")
    before = corpus.read_bytes()
    with pytest.raises(SystemExit, match=rf"--output {corpus} is the --input {corpus}, which "
                                         rf"the model would overwrite"):
        tool.main(["--input", str(corpus), "--vocab-size", "300", "--output", str(corpus)])
    assert corpus.read_bytes() == before
    with pytest.raises(SystemExit, match=rf"--input {tmp_path / 'missing.txt'}: no such file"):
        tool.main(["--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "m")])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"hello\n\ncaf\xe9\n")
    with pytest.raises(SystemExit, match=r"latin.txt:3: not UTF-8 text \(the byte 0xe9 at "
                                         r"character 3\); save the corpus as UTF-8"):
        tool.main(["--input", str(latin), "--output", str(tmp_path / "l.model")])
    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress(before))
    with pytest.raises(SystemExit, match=rf"error: {packed} is gzip-compressed, .*decompress it "
                                         rf"first \(gunzip -k {packed}\)"):
        tool.main(["--input", str(packed), "--output", str(tmp_path / "g.model")])
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(SystemExit, match=r"n.jsonl:2: not a text-jsonl line \('text' holds a "
                                         r"int, not text\)"):
        tool.main(["--input", str(numbers), "--input-format", "text-jsonl", "--output",
                   str(tmp_path / "n.model")])


def test_too_large_vocab_size_names_the_largest_possible(tmp_path):
    words = ["hello", "world", "the", "quick", "brown", "fox"]
    with pytest.raises(VocabSizeError) as raised:
        train_sentencepiece(words, tmp_path / "big.model", 32000)
    largest = raised.value.largest
    assert 259 < largest < 32000  # specials and bytes, plus characters and merges
    assert load_text_tokenizer(train_sentencepiece(words, tmp_path / "max.model",
                                                   largest)).vocab_size == largest
    with pytest.raises(VocabSizeError):
        train_sentencepiece(words, tmp_path / "over.model", largest + 1)
    assert not (tmp_path / "big.model").exists()

    word_list = tmp_path / "words.txt"
    word_list.write_text("\n".join(words) + "\n")
    with pytest.raises(SystemExit, match=rf"--vocab-size 32000 is larger than {word_list} "
                                         rf"allows: .* at most {largest} pieces; pass "
                                         rf"--vocab-size {largest} or less"):
        _load_tool("train_tokenizer").main(["--input", str(word_list), "--vocab-size", "32000",
                                            "--output", str(tmp_path / "tool.model")])



def test_too_small_vocab_size_names_the_pieces_the_text_needs(tmp_path):
    """Was sentencepiece's RuntimeError ('Vocabulary size is smaller than required_chars')."""
    word_list = tmp_path / "words.txt"
    word_list.write_text("hello\nworld\n")
    with pytest.raises(SystemExit, match=r"--vocab-size: vocabulary size 60 is too small for this "
                                         r"text: .* need \d+ pieces before any merge"):
        _load_tool("train_tokenizer").main(["--input", str(word_list), "--vocab-size", "60",
                                            "--output", str(tmp_path / "tool.model")])
    assert not (tmp_path / "tool.model").exists()
    # 0 and below were sentencepiece's RuntimeError naming its source line, a traceback
    for size in ("0", "-3"):
        with pytest.raises(SystemExit, match=rf"--vocab-size: vocabulary size {size} is not a "
                                             rf"number of pieces; pass a positive one"):
            _load_tool("train_tokenizer").main(["--input", str(word_list), "--vocab-size", size,
                                                "--output", str(tmp_path / "tool.model")])
    assert not (tmp_path / "tool.model").exists()

def _hf_tokenizer_json(tmp_path: Path, byte_level: bool) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzQ'ï-123"))
    tok.train_from_iterator(_tiny_corpus(), trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_with_metaspace(tmp_path):
    tok = load_text_tokenizer(_hf_tokenizer_json(tmp_path, byte_level=False).parent)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids, lengths = tok.encode_words(["hello", "world"])
    assert ids.tolist() == tok.encode("hello world")
    assert tok.encode("hello ") == tok.encode("hello") + [tok.space_id]
    assert tok.decode(ids) == "hello world"
    assert joint_vocab(tok, 10).size == tok.vocab_size + 6 + 10


def test_hf_tokenizer_encodes_special_token_spellings_as_text(tmp_path):
    """A transcript word "</s>" is text: tokenizers' default turned it into the EOS id, which ends
    a document in a packed row (--reset-attention-mask) in the middle of the real one."""
    tok = load_text_tokenizer(_hf_tokenizer_json(tmp_path, byte_level=False))
    for text in ("hello </s> world", "<s>", "world</s>"):
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.bos_id not in ids, (text, ids)
    ids, lengths = tok.encode_words(["hello", "</s>", "world"])
    assert tok.eos_id not in ids.tolist() and lengths.tolist()[1] > 1
    assert tok.encode("hello world") == tok.encode_words(["hello", "world"])[0].tolist()


def test_hf_tokenizer_without_word_prefix_is_refused(tmp_path):
    with pytest.raises(VocabularyError, match="one by one differs"):
        load_text_tokenizer(_hf_tokenizer_json(tmp_path, byte_level=True))


def test_hf_tokenizer_whose_ids_leave_gaps_is_refused(tmp_path):
    """A piece numbered past the vocabulary (5000 of 108 tokens) loaded, and its id was stored
    as a text id past the joint vocabulary's text part."""
    path = _hf_tokenizer_json(tmp_path, byte_level=False)
    content = json.loads(path.read_text())
    vocab = content["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 5000
    path.write_text(json.dumps(content))
    with pytest.raises(VocabularyError, match=r"tokenizer.json: holds token id 5000 among \d+ "
                                              r"tokens, so its ids are not 0\.\.\d+"):
        load_text_tokenizer(path)


def test_a_tokenizer_whose_bos_and_eos_share_an_id_is_refused(tmp_path):
    """`</s>` renumbered to `<s>`'s id loaded as BOS = EOS = 1: every BOS also ended a document
    (--reset-attention-mask) and generation, which never samples BOS, never stopped."""
    path = _hf_tokenizer_json(tmp_path, byte_level=False)
    content = json.loads(path.read_text())
    content["model"]["vocab"]["</s>"] = 1
    for token in content["added_tokens"]:
        token["id"] = 1 if token["content"] == "</s>" else token["id"]
    path.write_text(json.dumps(content))
    with pytest.raises(VocabularyError, match=r"tokenizer.json: its BOS and EOS are both id 1"):
        load_text_tokenizer(path)
    with pytest.raises(VocabularyError, match=r"bos and eos are both id 2"):  # a vocabulary record
        JointVocab.from_dict({"text_size": 10, "num_units": 4, "pad_id": 0, "bos_id": 2,
                              "eos_id": 2})


def test_hf_tokenizer_missing_package_names_extra(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install megatron-lst\[data\]"):
        load_text_tokenizer(path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model: tokenizer not found"):
        load_text_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: is a directory, not a file; pass "
                                                rf"the tokenizer as a regular file"):
        load_text_tokenizer(tmp_path)


def test_a_tokenizer_larger_than_any_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from megatron_lst.tokenizer import text_tokenizer

    monkeypatch.setattr(text_tokenizer, "MAX_TOKENIZER_BYTES", 100)
    path = tmp_path / "big.model"
    path.write_bytes(bytes(101))
    with pytest.raises(VocabularyError, match=r"big.model: is 101 bytes, more than any tokenizer"):
        load_text_tokenizer(path)


@pytest.fixture
def codec(tiny):
    return InterleavedCodec(tiny, joint_vocab(tiny, num_units=50))


def test_codec_layout_matches_reference_rule(codec, tiny):
    vocab = codec.vocab
    ids = codec.encode([("text", "hello world"), ("speech", np.array([3, 0, 49])),
                        ("text", "the river")])
    expected = ([vocab.bos_id, vocab.text_marker] + tiny.encode("hello world ")
                + [vocab.speech_marker] + [vocab.unit_offset + u for u in (3, 0, 49)]
                + [vocab.text_marker] + tiny.encode("the river") + [vocab.eos_id])
    assert ids.dtype == np.int32 and ids.tolist() == expected
    assert codec.encode([("speech", [1])], bos=False, eos=False).tolist() == [
        vocab.speech_marker, vocab.unit_offset + 1]


def test_codec_round_trip(codec):
    rng = random.Random(1)
    for _ in range(50):
        segments = []
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.5:
                segments.append(("text", " ".join(rng.choice(WORDS + ["42", "ü"])
                                                  for _ in range(rng.randint(1, 5)))))
            else:
                segments.append(("speech", np.array([rng.randrange(50)
                                                     for _ in range(rng.randint(0, 7))])))
        decoded = codec.decode(codec.encode(segments, bos=rng.random() < 0.5, eos=True))
        assert [kind for kind, _ in decoded] == [kind for kind, _ in segments]
        for (kind, got), (_, want) in zip(decoded, segments, strict=True):
            if kind == "text":
                assert got == want
            else:
                np.testing.assert_array_equal(got, want)


def test_codec_unit_out_of_range_names_position(codec):
    with pytest.raises(VocabularyError, match="segment 1, unit 2: speech unit 50 is outside"):
        codec.encode([("text", "a"), ("speech", np.array([1, 2, 50]))])
    with pytest.raises(VocabularyError, match="segment 0, unit 0: speech unit -1"):
        codec.encode([("speech", [-1])])


def test_codec_decode_errors(codec):
    vocab = codec.vocab
    with pytest.raises(VocabularyError, match=f"id {vocab.size} is not in the joint vocabulary"):
        codec.decode([vocab.bos_id, vocab.text_marker, vocab.size])
    with pytest.raises(VocabularyError, match="reserved"):
        codec.decode([vocab.text_marker, vocab.text_size + 1])
    unit = vocab.unit_offset + 4
    with pytest.raises(VocabularyError, match=f"position 3: id {unit} inside a text run"):
        codec.decode([vocab.bos_id, vocab.text_marker, 100, unit])
    with pytest.raises(VocabularyError, match="position 2: id 100 inside a speech run"):
        codec.decode([vocab.speech_marker, unit, 100])
    with pytest.raises(VocabularyError, match="position 1: id 100 comes before any mode marker"):
        codec.decode([vocab.bos_id, 100, vocab.text_marker])


def test_codec_refuses_mismatched_vocab(tiny):
    with pytest.raises(VocabularyError, match="300 pieces but the vocabulary expects 512"):
        InterleavedCodec(tiny, JointVocab(512))


def test_render(codec, tiny):
    vocab = codec.vocab
    ids = codec.encode([("speech", [12, 13, 9]), ("text", "hello world")])
    assert codec.render(ids) == "<bos> <s> [12 13 9] <t> hello world <eos>"
    assert codec.render([vocab.size + 3, vocab.text_marker]) == f"<?{vocab.size + 3}> <t>"


def test_joint_vocab_records_the_tokenizer_digest(tiny):
    vocab = joint_vocab(tiny, 10)
    assert vocab.tokenizer_sha256 == tiny.sha256
    assert JointVocab.from_dict(vocab.to_dict()).tokenizer_sha256 == tiny.sha256
    vocab.check_tokenizer(tiny, "dataset D")
    digest_free = JointVocab(tiny.vocab_size, 10)
    assert digest_free == vocab  # the layout is the same
    digest_free.check_tokenizer(tiny, "dataset D")  # old records: the size alone is checked
    other = JointVocab(tiny.vocab_size, 10, tokenizer_sha256="f" * 64)
    with pytest.raises(VocabularyError, match=r"is not the one dataset D was made with "
                                              r"\(sha256 ffffffffffff...\)"):
        other.check_tokenizer(tiny, "dataset D")
    with pytest.raises(VocabularyError, match="pieces but dataset D was made with"):
        JointVocab(tiny.vocab_size + 1, 10).check_tokenizer(tiny, "dataset D")


@pytest.mark.parametrize("name, content, message", [
    ("junk.model", b"not a model", r"junk.model: not a SentencePiece model"),
    ("tokenizer.json", b'{"model":', r"tokenizer.json: not a tokenizers tokenizer.json"),
])
def test_a_file_that_is_no_tokenizer_is_a_vocabulary_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VocabularyError, match=message):
        load_text_tokenizer(tmp_path / name)


def test_a_vocabulary_beyond_int32_ids_is_refused():
    JointVocab(300, 2**31 - 306)  # the largest: ids 0 .. 2**31 - 1
    with pytest.raises(VocabularyError, match=r"300 text pieces, 6 markers and 100000000000 speech "
                                              r"units .* more than int32 ids address"):
        JointVocab(300, 10**11)
