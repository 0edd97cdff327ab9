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
cut of all `num_samples` rows is computed once, at construction: worker processes interleave and
patch the documents the rows cover, in stream order and in blocks, under every rule a document can
get (static and aligned for mixed and curriculum patching, with the document's rule draw), and one
sequential pass cuts the rows from their patch ends, picking each document's rule from the step of
the row where it begins. The result does not depend on the number of workers (`index_workers`,
default: every CPU this process may use; the first 512 documents are always done in-process, so
small datasets never start a pool). The build logs its progress every `PROGRESS_SECONDS` and
passes the line to `on_progress` when given. `__getitem__` repeats the same deterministic work
for one row. With `index_cache_dir`, a store on disk (one with a `prefix`) keeps that row index in
`lst_rows_<hash>.npy` (memory-mapped when loaded), the hash covering the store's files (size,
mtime, ctime, path), its length and, for a view of part of a store, the view's `start`, and every
setting the cut depends on, so a restart or another rank loads it instead. A cached index is
checked when loaded (`row_index_problem`: vectorised, what every cut holds) and built again when
unreadable or holding values no cut makes; a head past the end of its document, which only the
patching tells, is named when its row is read.

Curriculum step of row r: `sample_positions[r] // global_batch_size`, where `sample_positions`
maps the dataset's rows to their places in the training order (identity by default; a blend passes
the positions its rows take). With `training=False` the step is None (curriculum patching is then
static, as at inference).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
import tokenize
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatron_lst.checkpoint.durable_files import save_npy
from megatron_lst.checkpoint.stale_scratch import (
    WRITER_TAG_PATTERN,
    remove_stale_scratch,
    writer_tag,
)
from megatron_lst.data.documents import AlignedDocument, check_document_of, document_name
from megatron_lst.data.interleave import InterleaveConfig, InterleavedDocument, Interleaver
from megatron_lst.data.worker_pool import worker_pool
from megatron_lst.patching.curriculum import Patcher
from megatron_lst.tokenizer.vocab import MODALITY_TEXT, JointVocab

logger = logging.getLogger(__name__)

# Purpose tags that keep the generators of one (seed, epoch, document) independent.
_ORDER, _LAYOUT, _PATCHING = 0, 1, 2
# Bump when the row cut or the generators change, so cached row indices are not reused.
INDEX_FORMAT_VERSION = 3
# Row-index build: documents planned in-process before a worker pool starts, the largest block a
# pool round plans, and how often progress is logged.
IN_PROCESS_PLANS = 512
MAX_PLAN_BLOCK = 8192
PROGRESS_SECONDS = 30.0
# Rows of a cached row index checked at once (`row_index_problem`): 24 MB of int64 a block.
_CHECK_BLOCK = 1 << 20


class DatasetError(ValueError):
    """The dataset cannot be built from these documents and settings."""


class EpochOrders:
    """Stream position q of a store of `size` documents is document
    `default_rng([seed, q // size, ORDER]).permutation(size)[q % size]` of epoch q // size.

    The orders of the `KEPT` epochs used last are kept (int32 where the ids fit), not every
    epoch's: a permutation of 100M documents is 400 MB even as int32, and a run of many epochs
    kept one for each, in every loader worker of every rank. The row-index pass and the rows read the
    stream in order, so a position rarely reaches back further (tiny stores, many epochs a row,
    redraw their cheap orders).
    """

    KEPT = 4

    def __init__(self, seed: int, size: int):
        self.seed = seed
        self.size = size
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def document(self, position: int) -> tuple[int, int]:
        """(epoch, document id) at stream `position`."""
        epoch, offset = divmod(position, self.size)
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch, _ORDER]).permutation(self.size)
            if self.size <= np.iinfo(np.int32).max:
                order = order.astype(np.int32)
            self._orders[epoch] = order
            if len(self._orders) > self.KEPT:
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(epoch)
        return epoch, int(order[offset])


class DocumentSource(Protocol):
    """What the dataset reads: `megatron_lst.data.indexed.DocumentStore` or any look-alike."""

    kind: str  # "aligned" or "text"
    vocab: JointVocab

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> AlignedDocument | np.ndarray: ...

    # Optional: `describe(index) -> str` names where a document is stored (file and document)
    # in the errors of the row-index build's document check.


@dataclass
class _PatchedDocument:
    doc: InterleavedDocument
    patch_ends: np.ndarray  # [K] int64 inclusive cumulative patch lengths
    patch_lengths: np.ndarray  # [K] int32

    def token_start(self, patch: int) -> int:
        return int(self.patch_ends[patch - 1]) if patch > 0 else 0


@dataclass
class _PatchPlan:
    """What the row cut needs of one document: its rule draw (None for the fixed modes) and, per
    candidate rule, its patch ends and its longest patch."""

    doc_id: int
    draw: float | None
    patch_ends: dict[str, np.ndarray]  # rule -> [K] int64 inclusive cumulative patch lengths
    longest: dict[str, int]


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
        index_workers: int | None = None,
        on_progress: Callable[[str], None] | None = None,
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
        if index_workers is not None and index_workers < 0:
            raise DatasetError(f"index_workers must be >= 0, got {index_workers}")
        self.store = store
        self.vocab = store.vocab
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.max_tokens = max_tokens
        self.patcher = patcher
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.training = training
        self.sample_positions = checked_sample_positions(sample_positions, num_samples)
        self.index_workers = (len(os.sched_getaffinity(0)) if index_workers is None
                              else index_workers)
        if space_id is None and hasattr(store, "manifest"):
            space_id = store.manifest.tokenizer.space_id  # recorded by tools/preprocess_data.py
        self.interleaver = Interleaver(store.vocab, space_id, interleave or InterleaveConfig())
        self.on_progress = on_progress
        self._orders = EpochOrders(seed, len(store))
        self._documents: OrderedDict[tuple[int, int], _PatchedDocument] = OrderedDict()
        self._cached_index: Path | None = None  # the file `_heads` was loaded from
        self._heads = self._load_or_build_row_heads(index_cache_dir)

    # ----- the stream of patched documents -----

    def _document_id(self, position: int) -> tuple[int, int]:
        return self._orders.document(position)

    def step_of_row(self, row: int) -> int | None:
        """Training step of a row (None when not training), which drives curriculum patching."""
        if not self.training:
            return None
        return int(self.sample_positions[row]) // self.global_batch_size

    def _interleaved(self, position: int, check: bool = False
                     ) -> tuple[int, int, InterleavedDocument]:
        """(epoch, document id, interleaved document) at a stream position. `check`: first check
        the stored document (`check_stored_document`), as the row-index build does for every
        document it reads."""
        epoch, doc_id = self._document_id(position)
        stored = self.store[doc_id]
        if check:
            check_document_of(self.store, doc_id, stored, self.vocab)
        if self.store.kind == "text":
            return epoch, doc_id, self.interleaver.text_document(stored)
        layout_rng = np.random.default_rng([self.seed, epoch, doc_id, _LAYOUT])
        return epoch, doc_id, self.interleaver(stored, layout_rng)

    def _patching_rng(self, epoch: int, doc_id: int) -> np.random.Generator | None:
        if not self.patcher.needs_rng:
            return None
        return np.random.default_rng([self.seed, epoch, doc_id, _PATCHING])

    def _check_longest(self, doc_id: int, longest: int, rule: str) -> None:
        """Refuse a document whose longest patch under `rule` no row can hold, naming where it
        is stored."""
        if longest <= self.max_tokens:
            return
        named = document_name(self.store, doc_id)
        if rule == "aligned":
            what, other = ("the units of one word or silence", "; or patch speech statically "
                           "(--patching-mode static), or leave that utterance out of the data")
        else:
            what, other = f"{rule} patching", " or give a smaller --patch-size"
        raise DatasetError(
            f"{named}: a patch of {longest} tokens ({what}) is more than a row of --max-tokens "
            f"{self.max_tokens} holds; raise --max-tokens to at least {longest}{other}")

    def _patched(self, position: int, start_row: int) -> _PatchedDocument:
        key = (position, start_row)
        if key in self._documents:
            self._documents.move_to_end(key)
            return self._documents[key]
        epoch, doc_id, doc = self._interleaved(position)
        rule = self.patcher.rule(self._patching_rng(epoch, doc_id), self.step_of_row(start_row))
        lengths = self.patcher.lengths_for_rule(doc, rule)
        self._check_longest(doc_id, int(lengths.max()), rule)
        patched = _PatchedDocument(doc, np.cumsum(lengths, dtype=np.int64), lengths)
        self._documents[key] = patched
        if len(self._documents) > 8:
            self._documents.popitem(last=False)
        return patched

    def _patch_plan(self, position: int) -> _PatchPlan:
        """The document at `position`, checked, patched under every rule it can get (see
        `_PlanSource`)."""
        epoch, doc_id, doc = self._interleaved(position, check=True)
        rng = self._patching_rng(epoch, doc_id)
        draw = None if rng is None else float(rng.random())  # what `Patcher.rule` draws first
        lengths = {rule: self.patcher.lengths_for_rule(doc, rule)
                   for rule in self.patcher.candidate_rules}
        return _PatchPlan(doc_id, draw,
                          {rule: np.cumsum(x, dtype=np.int64) for rule, x in lengths.items()},
                          {rule: int(x.max()) for rule, x in lengths.items()})

    # ----- cutting rows -----

    def _cut_row(self, row: int, head: _Head,
                 patch_ends: Callable[[int, int], np.ndarray]) -> tuple[list[_Piece], _Head]:
        """Patches of row `row` after its head, and the head of the next row.

        `patch_ends(position, start_row)`: the inclusive cumulative patch lengths of the document
        at that stream position when it begins in row `start_row`."""
        slots = self.seq_length - 1
        budget = self.max_tokens  # N + 1 tokens, one of them the head
        position, start_row, patch = head.position, head.start_row, head.patch + 1
        pieces: list[_Piece] = []
        while slots > 0 and budget > 0:
            doc_ends = patch_ends(position, start_row)
            if patch == len(doc_ends):
                position, start_row, patch = position + 1, row, 0
                continue
            first = int(doc_ends[patch - 1]) if patch > 0 else 0
            ends = doc_ends[patch:patch + slots] - first  # tokens taken after each patch
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
        # The change time too: rewriting a file in place and setting its old mtime back (cp -p,
        # rsync -t, os.utime) keeps size and mtime but always moves st_ctime.
        stats = [(f.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                 for f in files if f.exists() for stat in (f.stat(),)]
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
        heads = self._cached_row_heads(path)
        if heads is not None:
            return heads
        heads = self._build_row_heads()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The scratch of builds that were killed (SIGKILL: no cleanup ran), never a live one's.
        remove_stale_scratch(
            path.parent.iterdir(),
            rf"lst_rows_[0-9a-f]{{32}}\.{WRITER_TAG_PATTERN}\.[0-9a-f]{{16}}\.partial\.npy",
            "row-index scratch files", path.parent)
        # Several processes may build the same index, on several hosts of a shared file system
        # (where process ids repeat): each writes a file of a name no other has (its process,
        # host and a random part), then renames it. Created as np.save creates files (the
        # umask's permissions, not mkstemp's owner-only ones), so that whoever else may read the
        # --save directory can read the index too.
        partial = path.with_name(f"{path.stem}.{writer_tag()}.{secrets.token_hex(8)}.partial.npy")
        try:
            with open(partial, "xb") as stream:
                save_npy(stream, heads)  # OSError when the disk fills, not a file cut short
            os.replace(partial, path)
        except BaseException as error:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise DatasetError(f"cannot write the row index {path} ({error.strerror or error}"
                                   f"): free space on its filesystem or make {path.parent} "
                                   f"writable, then start the run again") from None
            raise
        return heads

    def _cached_row_heads(self, path: Path) -> np.ndarray | None:
        """The row index cached at `path` (recorded as `_cached_index`), or None when there is
        none or it is damaged: unreadable, of another shape or dtype, or holding values no cut
        makes (`row_index_problem`). A damaged one is then rebuilt and replaced."""
        if not path.exists():
            return None
        try:  # mapped, not read: the ranks of a node share its pages (24 bytes a row)
            heads = np.load(path, mmap_mode="r")
        # EOFError: an empty file; SyntaxError, TokenError: a damaged header (its first byte
        # flipped was a TokenError out of the dataset's build, not a rebuilt index)
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as error:
            logger.warning("%s: damaged row index (%s); building it again", path, error)
            return None
        if heads.shape != (self.num_samples, 3) or heads.dtype != np.int64:
            return None
        problem = row_index_problem(heads, self.seq_length)
        if problem is not None:
            logger.warning("%s: damaged row index (%s); building it again", path, problem)
            return None
        self._cached_index = path
        return heads

    def _build_row_heads(self) -> np.ndarray:
        """[num_samples, 3] int64: (position, patch, start_row) of every row's head."""
        heads = np.empty((self.num_samples, 3), dtype=np.int64)
        head = _Head(position=0, patch=0, start_row=0)
        started = last_report = time.monotonic()
        with _PlanSource(self) as plans:
            for row in range(self.num_samples):
                heads[row] = (head.position, head.patch, head.start_row)
                _, head = self._cut_row(row, head, plans.patch_ends)
                plans.release_before(head.position)
                if time.monotonic() - last_report > PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    message = (f"row index of {getattr(self.store, 'prefix', 'the documents')}: "
                               f"{row + 1} of {self.num_samples} rows, {head.position} "
                               f"documents, {head.position / (last_report - started):.0f} "
                               f"documents/s")
                    logger.info("%s", message)
                    if self.on_progress is not None:
                        self.on_progress(message)
        return heads

    def _stored_patch_ends(self, position: int, start_row: int) -> np.ndarray:
        return self._patched(position, start_row).patch_ends

    # ----- samples -----

    def __len__(self) -> int:
        return self.num_samples

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row `index` before padding: tokens [L+1] int64, modality [L+1] int64, patch lengths
        [P_row] int32 (P_row <= seq_length, sums to L+1)."""
        head = _Head(*(int(v) for v in self._heads[index]))
        head_doc = self._patched(head.position, head.start_row)
        if head.patch >= len(head_doc.patch_ends):  # only a damaged cached index says so
            raise DatasetError(
                f"{self._cached_index}: damaged row index: row {index} starts after patch "
                f"{head.patch} of a document of {len(head_doc.patch_ends)} patches; delete the "
                f"file and start again (the index is built anew)")
        pieces, _ = self._cut_row(index, head, self._stored_patch_ends)
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


_PLAN_DATASET: LSTDataset | None = None  # what a forked plan worker serves


def _plan_in_worker(positions: range) -> list[_PatchPlan | Exception]:
    """A worker's plans of `positions`, each the plan or the error planning raised: blocks are
    planned ahead of need, so an error is raised only if the rows reach that position (as
    without workers)."""
    plans: list[_PatchPlan | Exception] = []
    for position in positions:
        try:
            plans.append(_PLAN_DATASET._patch_plan(position))
        except Exception as error:  # noqa: BLE001 - re-raised in the parent when the plan is used
            plans.append(error)
    return plans


class _PlanSource:
    """Patch plans of a dataset's stream positions, in order, for the row-index pass.

    The first `IN_PROCESS_PLANS` positions are planned here; later ones, with `index_workers` > 1,
    in blocks by a pool of forked workers (they inherit the dataset: nothing is pickled but
    positions and plans), each block twice the last up to `MAX_PLAN_BLOCK`. The pool plans the
    next block while this process cuts rows from the current one; leaving drops the parts of it
    no worker has started (`worker_pool`: no `Pool.terminate()`, which can hang). A document's rule is chosen
    from its plan at the step of the row where it begins, as `_patched` would choose it.
    """

    def __init__(self, dataset: LSTDataset):
        self.dataset = dataset
        self.plans: dict[int, _PatchPlan | Exception] = {}
        self.lowest = 0  # plans below this position are released
        self.planned = 0  # positions below this are planned
        self.block = dataset.index_workers * 16
        self.pool = None
        self.pending = None  # (positions, [Future]) of the block the pool is planning
        self._pool_scope = contextlib.ExitStack()

    def __enter__(self) -> _PlanSource:
        return self

    def __exit__(self, *exc_info) -> None:
        global _PLAN_DATASET
        if self.pool is not None:
            self._pool_scope.close()  # also drops the block planned ahead and never needed
            self.pool = None
            _PLAN_DATASET = None

    def patch_ends(self, position: int, start_row: int) -> np.ndarray:
        while position >= self.planned:
            self._plan_more()
        plan = self.plans[position]
        if isinstance(plan, Exception):
            raise plan
        rule = self.dataset.patcher.rule_for_draw(plan.draw, self.dataset.step_of_row(start_row))
        self.dataset._check_longest(plan.doc_id, plan.longest[rule], rule)
        return plan.patch_ends[rule]

    def release_before(self, position: int) -> None:
        while self.lowest < position:
            self.plans.pop(self.lowest, None)
            self.lowest += 1

    def _plan_more(self) -> None:
        global _PLAN_DATASET
        if self.dataset.index_workers <= 1 or self.planned < IN_PROCESS_PLANS:
            self.plans[self.planned] = self.dataset._patch_plan(self.planned)
            self.planned += 1
            return
        if self.pool is None:
            _PLAN_DATASET = self.dataset
            self.pool = self._pool_scope.enter_context(
                worker_pool(self.dataset.index_workers, "fork"))
            self.pending = self._submit(self.planned)
        positions, parts = self.pending
        plans = (plan for part in parts for plan in part.result())
        self.plans.update(zip(positions, plans, strict=True))
        self.planned = positions.stop
        self.pending = self._submit(self.planned)

    def _submit(self, first: int):
        positions = range(first, first + self.block)
        self.block = min(2 * self.block, MAX_PLAN_BLOCK)
        chunk = max(1, len(positions) // (4 * self.dataset.index_workers))
        parts = [self.pool.submit(_plan_in_worker, positions[i:i + chunk])
                 for i in range(0, len(positions), chunk)]
        return positions, parts


def row_index_problem(heads: np.ndarray, seq_length: int) -> str | None:
    """What rules out `heads` [R, 3] int64 (position, patch, start_row) as a row index cut of
    rows of `seq_length` patches, or None. Checked block by block, vectorised, against what
    every cut holds: row 0 starts at (0, 0, 0), and each row takes 1 to `seq_length - 1`
    patches, so the next head is further on in the same document (same start row) or at patch
    0..seq_length - 2 of one of the next seq_length - 1 documents, which began in this row.
    Whether a patch exists in its document needs the patching; `LSTDataset.row` checks that."""
    if len(heads) == 0:
        return None
    if tuple(int(v) for v in heads[0]) != (0, 0, 0):
        return f"row 0 starts at {tuple(int(v) for v in heads[0])}, not (0, 0, 0)"
    for start in range(0, len(heads) - 1, _CHECK_BLOCK):
        pairs = np.asarray(heads[start:start + _CHECK_BLOCK + 1])  # [B + 1, 3]: B successions
        before, after = pairs[:-1], pairs[1:]
        rows = np.arange(start, start + len(before))  # [B] the row of each `before`
        step = after[:, 0] - before[:, 0]
        taken = after[:, 1] - before[:, 1]
        same_document = (step == 0) & (after[:, 2] == before[:, 2]) & (taken >= 1) & (
            taken <= seq_length - 1)
        next_documents = (step >= 1) & (step <= seq_length - 1) & (after[:, 2] == rows) & (
            after[:, 1] >= 0) & (after[:, 1] <= seq_length - 2)
        wrong = np.flatnonzero(~(same_document | next_documents))
        if len(wrong):
            row = int(rows[wrong[0]])
            return (f"row {row + 1} starts at {tuple(int(v) for v in after[wrong[0]])}, which no "
                    f"cut of {seq_length}-patch rows puts after row {row}'s "
                    f"{tuple(int(v) for v in before[wrong[0]])}")
    return None


def checked_sample_positions(sample_positions: np.ndarray | None, num_samples: int
                             ) -> np.ndarray:
    """`[num_samples]` int64 places of a dataset's rows in the training order (0, 1, ... when
    None): their curriculum step is `position // global_batch_size`."""
    if sample_positions is None:
        return np.arange(num_samples, dtype=np.int64)
    if len(sample_positions) != num_samples:
        raise DatasetError(f"sample_positions has {len(sample_positions)} entries for "
                           f"{num_samples} samples")
    return np.asarray(sample_positions, dtype=np.int64)


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
