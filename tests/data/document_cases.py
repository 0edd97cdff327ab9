"""Random aligned documents and an in-memory document store, for interleaving and dataset tests."""

import numpy as np

from megatron_lst.data.documents import AlignedDocument
from megatron_lst.tokenizer.vocab import JointVocab

VOCAB = JointVocab(text_size=50, num_units=20)
SPACE_ID = 3  # stands in for the tokenizer's lone word-boundary piece


def random_aligned_document(rng: np.random.Generator, num_segments: int,
                            silence_rate: float = 0.4, vocab: JointVocab = VOCAB
                            ) -> AlignedDocument:
    """Words of 1..3 pieces (ids >= 4) and 0..6 units; silences of 1..7 units."""
    silence = rng.random(num_segments) < silence_rate
    seg_text_len = np.where(silence, 0, rng.integers(1, 4, num_segments)).astype(np.int32)
    seg_unit_len = np.where(silence, rng.integers(1, 8, num_segments),
                            rng.integers(0, 7, num_segments)).astype(np.int32)
    doc = AlignedDocument(
        text_ids=rng.integers(4, vocab.text_size, int(seg_text_len.sum())).astype(np.int32),
        unit_ids=rng.integers(0, vocab.num_units, int(seg_unit_len.sum())).astype(np.int32),
        seg_text_len=seg_text_len,
        seg_unit_len=seg_unit_len,
    )
    doc.validate(vocab.num_units)
    return doc


class MemoryStore:
    """The `DocumentStore` interface over a list of documents."""

    def __init__(self, kind: str, documents: list, vocab: JointVocab = VOCAB):
        self.kind = kind
        self.vocab = vocab
        self.documents = documents

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int):
        return self.documents[index]


def aligned_store(seed: int, num_documents: int, max_segments: int = 80) -> MemoryStore:
    rng = np.random.default_rng(seed)
    return MemoryStore("aligned", [
        random_aligned_document(rng, int(rng.integers(1, max_segments)))
        for _ in range(num_documents)])


def text_store(seed: int, num_documents: int, max_pieces: int = 60) -> MemoryStore:
    rng = np.random.default_rng(seed)
    return MemoryStore("text", [
        rng.integers(4, VOCAB.text_size, int(rng.integers(1, max_pieces))).astype(np.int32)
        for _ in range(num_documents)])
