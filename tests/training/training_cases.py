"""Tiny on-disk training data and `lst-train` flags for the training-loop tests.

Documents are random (tests/data/document_cases.py) and written through the real
`DocumentWriter`, so the loop reads them exactly as it reads preprocessed corpora.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from data.document_cases import VOCAB, random_aligned_document
from torch.distributed.checkpoint.metadata import (
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_lst.checkpoint.full_shapes import full_state_size
from megatron_lst.checkpoint.safe_pickle import DCP_METADATA_FILENAME
from megatron_lst.data.indexed import DocumentWriter
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.models.config import LSTConfig
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer, joint_vocab
from megatron_lst.training.checkpointing import METADATA_FILENAME


def write_store(prefix: Path, kind: str, num_documents: int, seed: int,
                tokenizer: TextTokenizer | None = None) -> Path:
    """`num_documents` random documents of `kind` ("aligned" or "text") at `prefix`; their
    manifest names `tokenizer` when given (its ids cover VOCAB's text ids), else none."""
    rng = np.random.default_rng(seed)
    writer = DocumentWriter(prefix, kind)
    counts = Counts()
    for _ in range(num_documents):
        if kind == "aligned":
            doc = random_aligned_document(rng, int(rng.integers(8, 40)))
            writer.add_aligned(doc)
            counts.add(Counts(documents=1, segments=doc.num_segments,
                              text_pieces=len(doc.text_ids), units=len(doc.unit_ids)))
        else:
            ids = rng.integers(4, VOCAB.text_size, int(rng.integers(10, 60))).astype(np.int32)
            writer.add_text(ids)
            counts.add(Counts(documents=1, text_pieces=len(ids)))
    if tokenizer is None:
        vocab, info = VOCAB, TokenizerInfo(path="none", sha256="0" * 64, vocab_size=VOCAB.text_size)
    else:
        vocab = joint_vocab(tokenizer, VOCAB.num_units)
        info = TokenizerInfo(str(tokenizer.path), tokenizer.sha256, tokenizer.vocab_size,
                             tokenizer.space_id)
    writer.finalize(Manifest(kind, vocab.to_dict(), info, VOCAB.num_units,
                             25.0 if kind == "aligned" else None, counts, ["random"]))
    return prefix


def write_corpus(directory: Path, tokenizer: TextTokenizer | None = None) -> list[str]:
    """A speech and a text store; returns the weighted `--data-path` values."""
    speech = write_store(directory / "speech", "aligned", 60, seed=1, tokenizer=tokenizer)
    text = write_store(directory / "text", "text", 60, seed=2, tokenizer=tokenizer)
    return ["0.5", str(speech), "0.5", str(text)]


def tiny_flags(data_path: list[str], patching_mode: str = "curriculum") -> list[str]:
    """A tiny fp32 run: preset tiny-cpu, 8 patches of up to 24 tokens, batches of 4."""
    flags = [
        "--preset", "tiny-cpu", "--patching-mode", patching_mode,
        "--seq-length", "8", "--max-position-embeddings", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--weight-decay", "0.01",
        "--num-units", str(VOCAB.num_units), "--split", "90,10,0", "--eval-iters", "1",
        "--num-workers", "0", "--log-interval", "1", "--no-progress-bar", "--seed", "7",
        "--data-path", *data_path,
    ]
    if patching_mode != "none":
        flags += ["--max-tokens", "24", "--kernel-backend", "torch",
                  "--curriculum-tau1", "2", "--curriculum-tau2", "6"]
    return flags


def write_model_index(path: Path, config: LSTConfig) -> None:
    """A torch.distributed.checkpoint index (`.metadata`) in the checkpoint directory `path`
    listing one model tensor of as many weights as `config` has, and no data file: what reads the
    index alone (the model record's weight count, `check_stored_weights`) finds a checkpoint of
    that model."""
    index = Metadata(state_dict_metadata={"model.weights": TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([full_state_size(config)]), [])})
    (path / DCP_METADATA_FILENAME).write_bytes(pickle.dumps(index))


def fake_checkpoint(root: Path, iteration: int, complete: bool = True) -> Path:
    """An `iter_XXXXXXX` directory holding the files that make a checkpoint complete (megatron's
    metadata.json, and ours unless `complete` is False), with no tensors."""
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if complete:
        (path / METADATA_FILENAME).write_text("{}")
    return path
