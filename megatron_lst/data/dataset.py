"""A Megatron-style dataset of fixed-patch-count rows over interleaved documents.

Document stream. Epoch e visits the store's documents in the order
`default_rng([seed, e, ORDER]).permutation(len(store))`; epochs follow each other, so the stream is
endless. A stream position q names (epoch q // D, document order_e[q % D]). Each document is
interleaved with `default_rng([seed, e, doc, LAYOUT])` (a new layout every epoch; text-only stores
give `BOS <t> pieces EOS`) and patched with the `Patcher`, drawing its rule (mixed, curriculum) from
`default_rng([seed, e, doc, PATCHING])` at the training step of the row where the document begins.
Patches are cut per whole document, as in the reference.

Rows. `seq_length` (P) counts patches: the global positions of every sample. Row r is

    head, then whole patches of the stream, in order

where the head is one token, a patch of length 1: the last token of the previous row (row 0: the
first document's BOS). So every token after the first is a target exactly once (Megatron's overlap
of one token between samples) and `patch_lengths[0] == 1` holds without splitting any patch. A row
takes patches while it has fewer than P and its tokens stay <= `max_tokens + 1` (N + 1): a row
whose next patch would not fit stops early, its remaining positions are zero-length patches, and
that patch opens the next row: no token is ever dropped, and the zero patches show it. A patch
longer than N tokens can never fit and raises `DatasetError`. Then `x = row[:-1]` and
`labels = row[1:]`, right-padded with id 0 to N, with the padding added to the row's last patch
(`megatron_lst.patching.contract` states the full contract).

Rows are not shuffled after cutting (documents are): a row's cut depends on the patching of every
document before it, and the curriculum must see each document at its true training step. The
cut of all `num_samples` rows is computed once, at construction, by one sequential pass that
interleaves and patches every document the rows cover (numpy per document, no per-token Python;
on the order of a thousand documents per second per CPU core); `__getitem__` repeats the same
deterministic work for one row. With `index_cache_dir`, a store on disk (one with a `prefix`) keeps
that row index in `lst_rows_<hash>.npy`, the hash covering the store's files (size, mtime, path),
its length and, for a view of part of a store, the view's `start`, and every setting the cut
depends on, so a restart or another rank loads it instead.

Curriculum step of row r: `sample_positions[r] // global_batch_size`, where `sample_positions`
maps the dataset's rows to their places in the training order (identity by default; a blend passes
the positions its rows take). With `training=False` the step is None (curriculum patching is then
static, as at inference).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatron_lst.data.documents import AlignedDocument
from megatron_lst.data.interleave import InterleaveConfig, InterleavedDocument, Interleaver
from megatron_lst.patching.curriculum import Patcher
from megatron_lst.tokenizer.vocab import MODALITY_TEXT, JointVocab

# Purpose tags that keep the generators of one (seed, epoch, document) independent.
_ORDER, _LAYOUT, _PATCHING = 0, 1, 2
# Bump when the row cut or the generators change, so cached row indices are not reused.
INDEX_FORMAT_VERSION = 2


class DatasetError(ValueError):
    """The dataset cannot be built from these documents and settings."""


class DocumentSource(Protocol):
    """What the dataset reads: `megatron_lst.data.indexed.DocumentStore` or any look-alike."""

    kind: str  # "aligned" or "text"
    vocab: JointVocab

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> AlignedDocument | np.ndarray: ...


@dataclass
class _PatchedDocument:
    doc: InterleavedDocument
    patch_ends: np.ndarray  # [K] int64 inclusive cumulative patch lengths
    patch_lengths: np.ndarray  # [K] int32

    @property
    def num_patches(self) -> int:
        return len(self.patch_lengths)

    def token_start(self, patch: int) -> int:
        return int(self.patch_ends[patch - 1]) if patch > 0 else 0


@dataclass(frozen=True)
class _Head:
    position: int  # stream position of the document holding the head token
    patch: int  # the head is the last token of this patch
    start_row: int  # row where that document began


@dataclass(frozen=True)
class _Piece:
    position: int
    start_row: int
    first_patch: int
    end_patch: int  # exclusive


class LSTDataset(torch.utils.data.Dataset):
    """`num_samples` rows of `seq_length` patches; each item is one row of the batch contract."""

    def __init__(
        self,
        store: DocumentSource,
        num_samples: int,
        seq_length: int,
        max_tokens: int,
        patcher: Patcher,
        seed: int,
        *,
        global_batch_size: int = 1,
        space_id: int | None = None,
        interleave: InterleaveConfig | None = None,
        sample_positions: np.ndarray | None = None,
        training: bool = True,
        index_cache_dir: str | Path | None = None,
    ):
        if store.kind not in ("aligned", "text"):
            raise DatasetError(f"document store kind must be 'aligned' or 'text', got {store.kind!r}")
        if len(store) == 0:
            raise DatasetError("the document store is empty")
        if num_samples < 0:
            raise DatasetError(f"num_samples must be >= 0, got {num_samples}")
        if seq_length < 2:
            raise DatasetError(f"seq_length counts patches and must be >= 2, got {seq_length}")
        if max_tokens < seq_length - 1:
            raise DatasetError(f"max_tokens ({max_tokens}) must be >= seq_length - 1 "
                               f"({seq_length - 1}): a row of P patches holds at least P tokens")
        if global_batch_size < 1:
            raise DatasetError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if sample_positions is None:
            sample_positions = np.arange(num_samples, dtype=np.int64)
        if len(sample_positions) != num_samples:
            raise DatasetError(f"sample_positions has {len(sample_positions)} entries for "
                               f"{num_samples} samples")
        self.store = store
        self.vocab = store.vocab
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.max_tokens = max_tokens
        self.patcher = patcher
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.training = training
        self.sample_positions = np.asarray(sample_positions, dtype=np.int64)
        if space_id is None and hasattr(store, "manifest"):
            space_id = store.manifest.tokenizer.space_id  # recorded by tools/preprocess_data.py
        self.interleaver = Interleaver(store.vocab, space_id, interleave or InterleaveConfig())
        self._orders: dict[int, np.ndarray] = {}
        self._documents: OrderedDict[tuple[int, int], _PatchedDocument] = OrderedDict()
        self._heads = self._load_or_build_row_heads(index_cache_dir)

    # ----- the stream of patched documents -----

    def _document_id(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.store))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng(
                [self.seed, epoch, _ORDER]).permutation(len(self.store))
        return epoch, int(self._orders[epoch][offset])

    def step_of_row(self, row: int) -> int | None:
        """Training step of a row (None when not training), which drives curriculum patching."""
        if not self.training:
            return None
        return int(self.sample_positions[row]) // self.global_batch_size

    def _patched(self, position: int, start_row: int) -> _PatchedDocument:
        key = (position, start_row)
        if key in self._documents:
            self._documents.move_to_end(key)
            return self._documents[key]
        epoch, doc_id = self._document_id(position)
        stored = self.store[doc_id]
        if self.store.kind == "text":
            doc = self.interleaver.text_document(stored)
        else:
            doc = self.interleaver(stored, np.random.default_rng([self.seed, epoch, doc_id, _LAYOUT]))
        rng = (np.random.default_rng([self.seed, epoch, doc_id, _PATCHING])
               if self.patcher.needs_rng else None)
        lengths = self.patcher.patch_lengths(doc, rng, self.step_of_row(start_row))
        if lengths.max() > self.max_tokens:
            raise DatasetError(
                f"document {doc_id} has a patch of {int(lengths.max())} tokens, more than "
                f"max_tokens={self.max_tokens} can hold; raise --max-tokens or use smaller patches")
        patched = _PatchedDocument(doc, np.cumsum(lengths, dtype=np.int64), lengths)
        self._documents[key] = patched
        if len(self._documents) > 8:
            self._documents.popitem(last=False)
        return patched

    # ----- cutting rows -----

    def _cut_row(self, row: int, head: _Head) -> tuple[list[_Piece], _Head]:
        """Patches of row `row` after its head, and the head of the next row."""
        slots = self.seq_length - 1
        budget = self.max_tokens  # N + 1 tokens, one of them the head
        position, start_row, patch = head.position, head.start_row, head.patch + 1
        pieces: list[_Piece] = []
        while slots > 0 and budget > 0:
            doc = self._patched(position, start_row)
            if patch == doc.num_patches:
                position, start_row, patch = position + 1, row, 0
                continue
            first = doc.token_start(patch)
            ends = doc.patch_ends[patch:patch + slots] - first  # tokens taken after each patch
            take = int(np.searchsorted(ends, budget, side="right"))
            if take == 0:
                break
            pieces.append(_Piece(position, start_row, patch, patch + take))
            slots -= take
            budget -= int(ends[take - 1])
            patch += take
        last = pieces[-1]
        return pieces, _Head(last.position, last.end_patch - 1, last.start_row)

    def _index_key(self) -> str | None:
        """Hash of everything the row cut depends on; None for a store without files on disk."""
        prefix = getattr(self.store, "prefix", None)
        if prefix is None:
            return None
        files = [Path(str(prefix) + suffix) for suffix in (".json", ".idx", ".bin")]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
        interleave = self.interleaver.config
        # A view of part of a store (training's train/valid/test document ranges) shares the
        # store's files: its length and first document tell the views apart.
        identity = repr((
            INDEX_FORMAT_VERSION, str(Path(prefix).resolve()), stats, self.store.kind,
            len(self.store), getattr(self.store, "start", 0), self.num_samples, self.seq_length, self.max_tokens, self.patcher.config, self.seed,
            self.global_batch_size, self.training, self.interleaver.space_id, interleave,
            hashlib.sha256(self.sample_positions.tobytes()).hexdigest()))
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def _load_or_build_row_heads(self, cache_dir: str | Path | None) -> np.ndarray:
        key = self._index_key() if cache_dir is not None else None
        if key is None:
            return self._build_row_heads()
        path = Path(cache_dir) / f"lst_rows_{key}.npy"
        if path.exists():
            heads = np.load(path)
            if heads.shape == (self.num_samples, 3) and heads.dtype == np.int64:
                return heads
        heads = self._build_row_heads()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several ranks may build the same index: each writes its own file, then renames it.
        partial = path.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, heads)
        os.replace(partial, path)
        return heads

    def _build_row_heads(self) -> np.ndarray:
        """[num_samples, 3] int64: (position, patch, start_row) of every row's head."""
        heads = np.empty((self.num_samples, 3), dtype=np.int64)
        head = _Head(position=0, patch=0, start_row=0)
        for row in range(self.num_samples):
            heads[row] = (head.position, head.patch, head.start_row)
            _, head = self._cut_row(row, head)
        return heads

    # ----- samples -----

    def __len__(self) -> int:
        return self.num_samples

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row `index` before padding: tokens [L+1] int64, modality [L+1] int64, patch lengths
        [P_row] int32 (P_row <= seq_length, sums to L+1)."""
        head = _Head(*(int(v) for v in self._heads[index]))
        pieces, _ = self._cut_row(index, head)
        head_doc = self._patched(head.position, head.start_row)
        head_at = int(head_doc.patch_ends[head.patch]) - 1
        tokens = [head_doc.doc.tokens[head_at:head_at + 1]]
        modality = [head_doc.doc.modality[head_at:head_at + 1]]
        lengths = [np.ones(1, dtype=np.int32)]
        for piece in pieces:
            doc = self._patched(piece.position, piece.start_row)
            a, b = doc.token_start(piece.first_patch), doc.token_start(piece.end_patch)
            tokens.append(doc.doc.tokens[a:b])
            modality.append(doc.doc.modality[a:b])
            lengths.append(doc.patch_lengths[piece.first_patch:piece.end_patch])
        return (np.concatenate(tokens).astype(np.int64), np.concatenate(modality).astype(np.int64),
                np.concatenate(lengths).astype(np.int32))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        tokens, modality, lengths = self.row(index)
        return pad_row(tokens, modality, lengths, self.max_tokens, self.seq_length, self.vocab.pad_id)


def pad_row(tokens: np.ndarray, modality: np.ndarray, patch_lengths: np.ndarray, max_tokens: int,
            seq_length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One row (tokens [L+1], modality [L+1], patch lengths summing to L+1) -> one sample of the
    batch contract with N = max_tokens and P = seq_length."""
    num_inputs = len(tokens) - 1
    if int(patch_lengths.sum()) != len(tokens):
        raise DatasetError(f"patch lengths sum to {int(patch_lengths.sum())} but the row has "
                           f"{len(tokens)} tokens")
    if num_inputs > max_tokens or len(patch_lengths) > seq_length:
        raise DatasetError(f"a row of {num_inputs} inputs in {len(patch_lengths)} patches does not "
                           f"fit max_tokens={max_tokens}, seq_length={seq_length}")
    x = np.full(max_tokens, pad_id, dtype=np.int64)
    y = np.full(max_tokens, pad_id, dtype=np.int64)
    mask = np.zeros(max_tokens, dtype=np.float32)
    mod = np.full(max_tokens, MODALITY_TEXT, dtype=np.int64)
    x[:num_inputs] = tokens[:-1]
    y[:num_inputs] = tokens[1:]
    mask[:num_inputs] = 1.0
    mod[:num_inputs] = modality[:-1]
    lengths = np.zeros(seq_length, dtype=np.int32)
    lengths[:len(patch_lengths)] = patch_lengths
    lengths[len(patch_lengths) - 1] += max_tokens - num_inputs  # padding joins the last patch
    return {
        "tokens": torch.from_numpy(x),
        "labels": torch.from_numpy(y),
        "loss_mask": torch.from_numpy(mask),
        "modality": torch.from_numpy(mod),
        "patch_lengths": torch.from_numpy(lengths),
    }
