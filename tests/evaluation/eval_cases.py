"""Shared pieces of the evaluation tests: a tiny tokenizer, random items, tiny models, short\naligned utterances."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from training.training_cases import tiny_flags

from megatron_lst.data.documents import AlignedDocument
from megatron_lst.data.indexed import DocumentWriter
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.models.baseline import TokenBaselineModel
from megatron_lst.models.config import preset, with_windows
from megatron_lst.models.lst_model import LSTModel
from megatron_lst.tokenizer.text_tokenizer import (
    TextTokenizer,
    joint_vocab,
    load_text_tokenizer,
    train_sentencepiece,
)
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.checkpoint_save import save_checkpoint
from megatron_lst.training.model_provider import build_model_chunks

WORDS = ("the a girl boy dog cat ran sat home park rain sun happy sad ate cake then she he "
         "went found lost key door opened closed night day").split()
NUM_UNITS = 16


@functools.cache
def tokenizer() -> TextTokenizer:
    """A 320-piece SentencePiece BPE trained once per process (well under a second)."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    directory = Path(tempfile.mkdtemp(prefix="lst_eval_spm_"))
    return load_text_tokenizer(train_sentencepiece(sentences, directory / "spm.model", 320))


def vocab() -> JointVocab:
    return joint_vocab(tokenizer(), NUM_UNITS)


def _part(rng: np.random.Generator, num_words: int) -> dict:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), num_words)]
    segments = []
    for word in words:
        if rng.random() < 0.3:
            segments.append(["[SIL]", int(rng.integers(1, 4))])
        segments.append([word, int(rng.integers(2, 7))])
    units = rng.integers(0, NUM_UNITS, sum(n for _, n in segments)).tolist()
    return {"text": " ".join(words), "units": units, "segments": segments}


def random_records(seed: int, num_items: int, num_endings: int = 2) -> list[dict]:
    """Items in the JSONL form: contexts of 4-7 words, endings of 2-4 words, random labels."""
    rng = np.random.default_rng(seed)
    return [{"id": f"item-{seed}-{i}", "context": _part(rng, int(rng.integers(4, 8))),
             "endings": [_part(rng, int(rng.integers(2, 5))) for _ in range(num_endings)],
             "label": int(rng.integers(num_endings))} for i in range(num_items)]


def tiny_lst_config(vocab_size: int):
    """The tiny preset with windows short enough that they cut the scored sequences."""
    return with_windows(preset("tiny", vocab_size), 16, 4)


def tiny_model(kind: str, vocab_size: int, seed: int = 0, max_sequence_length: int = 4096,
               **megatron_overrides):
    """A tiny LST (`kind="lst"`) or token baseline (`"baseline"`) in eval mode, CPU kernels, whose
    context is `max_sequence_length` global positions."""
    config = dataclasses.replace(tiny_lst_config(vocab_size),
                                 max_sequence_length=max_sequence_length)
    megatron_config = config.transformer_config(**megatron_overrides)
    torch.manual_seed(seed)
    if kind == "lst":
        model = LSTModel(config, megatron_config, transformer_impl="local",
                         local_attention_backend="sdpa", kernel_backend="torch")
    else:
        model = TokenBaselineModel(config, megatron_config, transformer_impl="local")
    return model.eval()


class MemoryUtterances:
    """The `DocumentStore` interface over a list of aligned documents."""

    kind = "aligned"

    def __init__(self, documents):
        self.documents = documents
        self.vocab = vocab()

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, index):
        return self.documents[index]


def utterances(seed: int, count: int = 8, num_words: int = 3) -> list[AlignedDocument]:
    """`count` utterances of `num_words` words, 2..3 units a word, a silence before the last."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        words = [WORDS[i] for i in rng.choice(len(WORDS), num_words, replace=False)]
        text_ids, pieces = tokenizer().encode_words(words)
        units = rng.integers(2, 4, num_words)
        seg_text = np.insert(pieces, num_words - 1, 0).astype(np.int32)
        seg_units = np.insert(units, num_words - 1, 1).astype(np.int32)
        docs.append(AlignedDocument(text_ids.astype(np.int32),
                                    rng.integers(0, NUM_UNITS, int(seg_units.sum())).astype(np.int32),
                                    seg_text, seg_units))
    return docs


def write_utterances(prefix: Path, docs: list[AlignedDocument]) -> Path:
    """`docs` as an aligned dataset on disk (25 unit frames a second) of this module's vocab."""
    writer = DocumentWriter(prefix, "aligned")
    for doc in docs:
        writer.add_aligned(doc)
    info = TokenizerInfo(str(tokenizer().path), tokenizer().sha256, tokenizer().vocab_size,
                         tokenizer().space_id)
    counts = Counts(documents=len(docs), segments=sum(d.num_segments for d in docs),
                    text_pieces=sum(len(d.text_ids) for d in docs),
                    units=sum(len(d.unit_ids) for d in docs))
    writer.finalize(Manifest("aligned", vocab().to_dict(), info, NUM_UNITS, 25.0, counts,
                             ["test"]))
    return prefix


def save_tiny_checkpoint(directory: Path) -> tuple[Path, list, argparse.Namespace]:
    """A curriculum tiny-cpu model in `vocab()`, saved by lst-train's `save_checkpoint` under
    `directory` as iteration 3: (its checkpoint directory, the model chunks, the run's args).
    Call between `initialize_parallel` and `destroy_parallel`."""
    flags = tiny_flags(["unused"]) + ["--train-iters", "3", "--num-units", str(NUM_UNITS),
                                      "--tokenizer-model", tokenizer().path]
    args = validate_args(parse_args(flags), 1)
    chunks, _ = build_model_chunks(args, vocab().size, eos_id=vocab().eos_id)
    return save_checkpoint(3, chunks, None, None, args, {}, directory, vocab()), chunks, args
