"""Text tokenizers loaded from a path: a SentencePiece `.model` or a Hugging Face `tokenizer.json`.

LST stores text word by word: each word's pieces are kept apart so any text/speech layout can be
built later. That needs a tokenizer whose encoding of a space-joined run of words equals the
concatenation of each word's encoding, which holds for SentencePiece with a dummy prefix (Llama-2)
and for `tokenizers` models with a Metaspace pre-tokenizer; `load_text_tokenizer` checks it and
refuses tokenizers without it. A text run followed by another segment ends with a space, which the
tokenizer turns into one word-boundary piece: `space_id`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.data.input_files import checked_file_size, read_bounded_bytes
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

MAX_TOKENIZER_BYTES = 1 << 28
"""256 MiB: more than any tokenizer file (Llama-2's .model is 0.5 MB, Gemma 3's tokenizer.json with
its 262k pieces 33 MB)."""


# Cleared when full: word caches stay bounded on corpora with very many distinct words.
_WORD_CACHE_LIMIT = 1 << 20

# Words that exercise the word-by-word property: letters, digits, bytes outside the alphabet.
_PROBE_WORDS = ("the", "Quick", "brown", "fox's", "123", "jumps", "naïve", "über-cool")


class TextTokenizer(ABC):
    """A text tokenizer with the ids LST needs. `pad_id` is 0 (unk), as in the reference."""

    pad_id = 0

    def __init__(self, path: str | Path):
        self.path = str(path)
        data = read_bounded_bytes(path, VocabularyError, "tokenizer", MAX_TOKENIZER_BYTES)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._word_cache: dict[str, list[int]] = {}

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of piece ids (the leading word-boundary space is dropped, as when encoding)."""

    def encode_words(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pieces of the space-joined `words` ([T] int32) and each word's piece count ([W] int32).

        Each distinct word is encoded once and cached: speech corpora repeat words a lot.
        """
        cache = self._word_cache
        ids: list[int] = []
        lengths: list[int] = []
        for word in words:
            pieces = cache.get(word)
            if pieces is None:
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                pieces = cache[word] = self.encode(word)
            ids.extend(pieces)
            lengths.append(len(pieces))
        return np.array(ids, dtype=np.int32), np.array(lengths, dtype=np.int32)

    @property
    def space_id(self) -> int:
        """The piece a trailing space adds after a word (`▁` in SentencePiece)."""
        return self._space_id

    def _check_word_by_word(self) -> None:
        """Derive `space_id` and verify that encoding word by word equals encoding the run
        (and that BOS and EOS are two ids: a file that numbers both alike)."""
        if self.bos_id == self.eos_id:  # an EOS would also open a document, a BOS end one
            raise VocabularyError(f"{self.path}: its BOS and EOS are both id {self.bos_id}; a "
                                  f"tokenizer needs two ids for them (the file was edited or "
                                  f"damaged)")
        word = self.encode("the")
        with_space = self.encode("the ")
        if with_space[: len(word)] != word or len(with_space) != len(word) + 1:
            raise VocabularyError(
                f"{self.path}: encoding 'the ' gives {with_space}, which is not the encoding of "
                f"'the' ({word}) plus one word-boundary piece; LST needs a tokenizer that marks "
                f"word boundaries with a prefix piece (SentencePiece with a dummy prefix, or a "
                f"tokenizers model with a Metaspace pre-tokenizer)")
        self._space_id = with_space[-1]
        joined = self.encode(" ".join(_PROBE_WORDS))
        by_word = [i for w in _PROBE_WORDS for i in self.encode(w)]
        if joined != by_word:
            raise VocabularyError(
                f"{self.path}: encoding words one by one differs from encoding them joined by "
                f"spaces ({by_word} vs {joined}), so word-aligned text cannot be stored; use a "
                f"tokenizer with a word-boundary prefix (SentencePiece dummy prefix or Metaspace)")


class SentencePieceTokenizer(TextTokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece

        super().__init__(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        # UnicodeDecodeError: a piece of a damaged model that is not UTF-8
        except (RuntimeError, OSError, UnicodeDecodeError) as error:
            raise VocabularyError(f"{path}: not a SentencePiece model ({error}); pass a .model "
                                  f"file (tools/train_tokenizer.py makes one) or a tokenizers "
                                  f"tokenizer.json") from None
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise VocabularyError(f"{path}: the SentencePiece model has no BOS or EOS piece; "
                                  f"train it with bos_id and eos_id set (tools/train_tokenizer.py)")
        self._check_word_by_word()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# Special-token spellings of BOS/EOS, most common first (Llama-2/SentencePiece, Llama-3).
_HF_BOS_EOS = (("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>"))


class HFTokenizer(TextTokenizer):
    def __init__(self, path: str | Path):
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(f"loading {path} needs the Hugging Face `tokenizers` package: "
                              f"pip install megatron-lst[data]") from error
        super().__init__(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise VocabularyError(f"{path}: not a tokenizers tokenizer.json ({error}); pass one "
                                  f"or a SentencePiece .model file") from None
        # Text that spells a special token ("</s>" in a transcript) is encoded as the text it is:
        # by default `tokenizers` turns it into the special id, and an EOS inside a document
        # would end the document there in a packed row (--reset-attention-mask).
        if not hasattr(self._tok, "encode_special_tokens"):
            raise ImportError(f"loading {path} needs tokenizers >= 0.15.1 (it encodes text that "
                              f"spells a special token as plain text): pip install -U tokenizers")
        self._tok.encode_special_tokens = True
        # Ids index the joint vocabulary, whose text part is 0..vocab_size-1; a file whose ids
        # leave gaps (a hand-edited vocab) encodes to ids past it, which were stored as they came.
        largest = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if largest >= self.vocab_size:
            raise VocabularyError(f"{path}: holds token id {largest} among {self.vocab_size} "
                                  f"tokens, so its ids are not 0..{self.vocab_size - 1} (the "
                                  f"vocabulary has gaps) and would be stored past the text "
                                  f"vocabulary; number its tokens 0..{self.vocab_size - 1}")
        for bos, eos in _HF_BOS_EOS:
            bos_id, eos_id = self._tok.token_to_id(bos), self._tok.token_to_id(eos)
            if bos_id is not None and eos_id is not None:
                self._bos_id, self._eos_id = bos_id, eos_id
                break
        else:
            raise VocabularyError(f"{path}: found no BOS/EOS tokens among "
                                  f"{[t for pair in _HF_BOS_EOS for t in pair]}; add them as "
                                  f"special tokens when training the tokenizer")
        self._check_word_by_word()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """A SentencePiece model (`*.model`) or a Hugging Face `tokenizer.json` (`*.json`).

    FileNotFoundError when `path` is missing or not a regular file (a FIFO or a device would
    block or be read forever); VocabularyError when it is not a tokenizer, or larger than any."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: tokenizer not found; pass a SentencePiece .model or a "
                                f"tokenizers tokenizer.json (tools/train_tokenizer.py makes one)")
    checked_file_size(path, FileNotFoundError, "tokenizer")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def joint_vocab(tokenizer: TextTokenizer, num_units: int = 502) -> JointVocab:
    """The joint vocabulary of `tokenizer`'s pieces, the mode markers and `num_units` units."""
    return JointVocab(tokenizer.vocab_size, num_units, pad_id=tokenizer.pad_id,
                      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      tokenizer_sha256=tokenizer.sha256)


class VocabSizeError(VocabularyError):
    """The text cannot give as many pieces as the requested vocabulary size."""

    def __init__(self, requested: int, largest: int):
        super().__init__(f"vocabulary size {requested} is larger than this text allows: BPE on it "
                         f"yields at most {largest} pieces (bytes, characters and every merge of "
                         f"its words); pass a vocabulary size of {largest} or less, or train on "
                         f"more text")
        self.requested = requested
        self.largest = largest


def train_sentencepiece(sentences: Iterable[str], model_path: str | Path, vocab_size: int
                        ) -> Path:
    """Train a SentencePiece BPE with Llama-2's settings and write it to `model_path`.

    Byte fallback, split digits, a dummy prefix and no whitespace normalization (so word-by-word
    encoding equals encoding the run), unk 0 / bos 1 / eos 2, no pad piece, and sentences of any
    length (SentencePiece skips those over 4192 bytes by default). One thread, the input
    order as given and no output path inside the model make the file's bytes a function of the
    sentences and `vocab_size` alone. The file at `model_path` is replaced atomically. Raises `VocabSizeError` (with the largest size the text
    allows) when the text cannot give `vocab_size` pieces, and VocabularyError for a size below 1
    or too small for the text's characters.
    """
    if vocab_size < 1:  # SentencePiece's own check is a RuntimeError naming its source line
        raise VocabularyError(f"vocabulary size {vocab_size} is not a number of pieces; pass a "
                              f"positive one")
    sentences = list(sentences)  # trained on twice when the size is too large
    try:
        model = _train_bpe(sentences, vocab_size, hard_limit=True)
    except RuntimeError as error:
        needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if needed:
            raise VocabularyError(
                f"vocabulary size {vocab_size} is too small for this text: its characters, the "
                f"256 byte-fallback pieces and unk/bos/eos need {needed.group(2)} pieces before "
                f"any merge; pass a larger vocabulary size") from None
        # A soft limit makes SentencePiece stop when no merge is left: that is the largest size.
        largest = _piece_count(_train_bpe(sentences, vocab_size, hard_limit=False))
        if largest >= vocab_size:
            raise  # not a vocabulary size problem
        raise VocabSizeError(vocab_size, largest) from error
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Atomically: a disk that fills part way leaves the model that was there (a model cut short
    # can load, its normalizer lost, and tokenize otherwise).
    replace_file_durably(model_path, model)
    return model_path


def _train_bpe(sentences: list[str], vocab_size: int, hard_limit: bool) -> bytes:
    """The serialized model; with `hard_limit`, SentencePiece raises RuntimeError when the text
    gives fewer than `vocab_size` pieces."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        minloglevel=2,
        # Only the soft limit and a longer sentence limit are spelled out: the defaults leave
        # the model's bytes as they were.
        **({} if hard_limit else {"hard_vocab_limit": False}), **_sentence_limit(sentences))
    return model.getvalue()


# SentencePiece's default `max_sentence_length`: it skips, silently, every sentence of more bytes.
_SENTENCEPIECE_SENTENCE_BYTES = 4192


def _sentence_limit(sentences: list[str]) -> dict:
    """SentencePiece's `max_sentence_length` for `sentences`, when one is longer than its default:
    a text JSONL document of more than 4192 bytes (a story on one line) was left out of the
    training without a word, and its words with it."""
    longest = max((len(s.encode("utf-8", "surrogatepass")) for s in sentences), default=0)
    return {"max_sentence_length": longest} if longest > _SENTENCEPIECE_SENTENCE_BYTES else {}


def _piece_count(model: bytes) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=model).vocab_size()
