"""Documents stored as Megatron indexed datasets (`.bin/.idx`) plus a JSON manifest.

Layout inside `megatron.core.datasets.indexed_dataset` (int32 everywhere):

    aligned   one Megatron document per aligned document, made of 4 sequences:
              text_ids [T], unit_ids [U], seg_text_len [S], seg_unit_len [S]
    text      one Megatron document per text document, made of 1 sequence: text_ids [T]

so document i is sequences 4i..4i+3 (aligned) or sequence i (text), read with one mmap slice.
`<prefix>.json` is the `Manifest`; `DocumentStore` checks it against the index on open.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    get_bin_path,
    get_idx_path,
)

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.input_files import checked_file_size
from megatron_lst.data.manifest import REPREPROCESS, Manifest, ManifestError
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

SEQUENCES_PER_DOCUMENT = {"aligned": 4, "text": 1}
_DTYPE = np.int32
# The head of a Megatron `.idx` (megatron.core.datasets.indexed_dataset, version 1): magic,
# version, dtype code, sequence count, document count; then int32 sequence lengths, int64
# sequence pointers and int64 document indices.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEAD = struct.Struct("<9sQBQQ")
_INT32_CODE = DType.int32.value  # the only dtype DocumentWriter writes (Megatron-LM's
# preprocess_data.py picks uint16 for vocabularies under 65500 tokens, else int32)
_MEGATRON_LM_ADVICE = ("LST datasets hold int32 ids of the joint text+speech vocabulary with a "
                       f"manifest (a Megatron-LM preprocess_data.py output does not): {REPREPROCESS}")
_SPOOL_BUFFER = 1 << 20  # bytes: DocumentWriter's write buffer and index block
_VALIDATE_BLOCK = 1 << 20  # documents DocumentStore checks at a time when it opens a store


class StoreError(DocumentError):
    """A stored dataset is missing, truncated or inconsistent with its manifest."""


class DocumentWriter:
    """Streams documents to `<prefix>.bin`; `finalize(manifest)` writes `.idx` and `.json`.

    Memory does not grow with the corpus: each document's bytes go straight to the `.bin` and its
    sequence lengths to a spool file next to it (`<prefix>.lengths.tmp`, int32), which `finalize`
    turns, block by block, into the index megatron.core's `IndexedDatasetBuilder` would write
    (byte for byte: lengths, then int64 byte offsets, then document boundaries).
    """

    def __init__(self, prefix: str | Path, kind: str):
        if kind not in SEQUENCES_PER_DOCUMENT:
            raise ValueError(f"kind must be one of {tuple(SEQUENCES_PER_DOCUMENT)}, got {kind!r}")
        self.prefix = str(prefix)
        self.kind = kind
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._spool_path = Path(self.prefix + ".lengths.tmp")
        self._data = open(get_bin_path(self.prefix), "wb", buffering=_SPOOL_BUFFER)  # noqa: SIM115
        self._lengths = open(self._spool_path, "wb", buffering=_SPOOL_BUFFER)  # noqa: SIM115
        self.num_documents = 0

    def _add(self, parts: tuple[np.ndarray, ...]) -> None:
        for part in parts:
            self._data.write(np.ascontiguousarray(part, dtype=_DTYPE).tobytes())
        self._lengths.write(np.array([len(part) for part in parts], dtype=_DTYPE).tobytes())
        self.num_documents += 1

    def add_aligned(self, doc: AlignedDocument) -> None:
        if self.kind != "aligned":
            raise ValueError(f"{self.prefix}: cannot add an aligned document to a text dataset")
        self._add((doc.text_ids, doc.unit_ids, doc.seg_text_len, doc.seg_unit_len))

    def add_text(self, text_ids: np.ndarray) -> None:
        if self.kind != "text":
            raise ValueError(f"{self.prefix}: cannot add a text document to an aligned dataset")
        self._add((np.asarray(text_ids),))

    def abort(self) -> None:
        """Close and delete whatever this writer has written."""
        self._data.close()
        self._lengths.close()
        for path in (get_bin_path(self.prefix), get_idx_path(self.prefix),
                     Manifest.path_for(self.prefix), self._spool_path):
            Path(path).unlink(missing_ok=True)

    def finalize(self, manifest: Manifest) -> None:
        if self.num_documents == 0:
            raise StoreError(f"{self.prefix}: no documents to write (every input was empty or "
                             f"skipped as bad)")
        if manifest.kind != self.kind or manifest.counts.documents != self.num_documents:
            raise ValueError(f"{self.prefix}: manifest says {manifest.counts.documents} "
                             f"{manifest.kind} documents, the writer holds {self.num_documents} "
                             f"{self.kind} documents")
        self._data.close()
        self._lengths.close()
        self._write_index()
        self._spool_path.unlink()
        manifest.save(self.prefix)

    def _write_index(self) -> None:
        per_doc = SEQUENCES_PER_DOCUMENT[self.kind]
        num_sequences = per_doc * self.num_documents
        itemsize = np.dtype(_DTYPE).itemsize
        with open(get_idx_path(self.prefix), "wb") as index:
            index.write(_INDEX_HEAD.pack(_INDEX_MAGIC, 1, _INT32_CODE, num_sequences,
                                         self.num_documents + 1))
            with open(self._spool_path, "rb") as spool:  # [num_sequences] int32 lengths
                shutil.copyfileobj(spool, index, _SPOOL_BUFFER)
            with open(self._spool_path, "rb") as spool:  # [num_sequences] int64 byte offsets
                offset = 0
                while block := spool.read(_SPOOL_BUFFER):
                    ends = offset + np.cumsum(np.frombuffer(block, dtype=_DTYPE),
                                              dtype=np.int64) * itemsize
                    index.write(np.concatenate([[offset], ends[:-1]]).astype(np.int64).tobytes())
                    offset = int(ends[-1])
            step = _SPOOL_BUFFER // 8  # [num_documents + 1] int64 first sequence of each document
            for first in range(0, self.num_documents + 1, step):
                last = min(first + step, self.num_documents + 1)
                index.write((np.arange(first, last, dtype=np.int64) * per_doc).tobytes())


def _check_index_file(idx_path: str) -> None:
    """Raise StoreError unless `idx_path` starts like a version-1 Megatron index and is exactly
    as long as the counts in its head say (checked before megatron.core reads it)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(_INDEX_HEAD.size)
    advice = "the file is truncated or not a Megatron index (re-run tools/preprocess_data.py)"
    if len(head) < _INDEX_HEAD.size:
        raise StoreError(f"{idx_path}: {size} bytes, shorter than an index header; {advice}")
    magic, version, dtype_code, num_sequences, num_documents = _INDEX_HEAD.unpack(head)
    if magic != _INDEX_MAGIC or version != 1:
        raise StoreError(f"{idx_path}: does not start with a version-1 Megatron index header; "
                         f"{advice}")
    if dtype_code != _INT32_CODE:  # megatron.core fails on an unknown code, noisily
        dtype = (f"{DType(dtype_code).name} ids" if dtype_code in DType._value2member_map_
                 else "no dtype")
        raise StoreError(f"{idx_path}: its header gives dtype code {dtype_code}, not int32's "
                         f"{_INT32_CODE} ({dtype}): the data was not written by "
                         f"tools/preprocess_data.py; {_MEGATRON_LM_ADVICE}")
    expected = _INDEX_HEAD.size + 12 * num_sequences + 8 * num_documents
    if num_sequences and size == expected + num_sequences:  # an int8 mode after each sequence
        raise StoreError(f"{idx_path}: holds a sequence mode for each of its {num_sequences} "
                         f"sequences, a multimodal Megatron index, which tools/preprocess_data.py "
                         f"never writes; {_MEGATRON_LM_ADVICE}")
    if size != expected:
        raise StoreError(f"{idx_path}: is {size} bytes but its header lists {num_sequences} "
                         f"sequences and {num_documents} document indices ({expected} bytes); "
                         f"{advice}")
    if num_documents == 0:
        raise StoreError(f"{idx_path}: its header lists no document indices; {advice}")
    if num_documents == 1:  # just the leading 0: megatron.core cannot map the empty .bin
        raise StoreError(f"{idx_path}: holds no documents; a dataset needs at least one: leave "
                         f"it out of the data paths, or re-run tools/preprocess_data.py on "
                         f"inputs that have documents")
    with open(idx_path, "rb") as stream:  # the document boundaries: 0 first, the count last
        stream.seek(_INDEX_HEAD.size + 12 * num_sequences)
        first = int.from_bytes(stream.read(8), "little", signed=True)
        stream.seek(size - 8)
        last = int.from_bytes(stream.read(8), "little", signed=True)
    if (first, last) != (0, num_sequences):
        raise StoreError(f"{idx_path}: its document boundaries run from sequence {first} to "
                         f"{last}, not from 0 to its {num_sequences} sequences; the index is "
                         f"damaged (re-run tools/preprocess_data.py)")


def _refuse_empty_bin(prefix: str) -> None:
    """Raise StoreError for a `.bin` of 0 bytes (megatron.core cannot map it): documents that
    all hold nothing, or a truncated file, whichever the `.idx` (checked) says."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    with open(idx_path, "rb") as stream:
        _, _, _, num_sequences, num_documents = _INDEX_HEAD.unpack(stream.read(_INDEX_HEAD.size))
        lengths = np.fromfile(stream, dtype=np.int32, count=num_sequences)
    if not lengths.any():
        raise StoreError(f"{bin_path}: holds no tokens: each of the {num_documents - 1} "
                         f"documents {idx_path} lists is empty (no text pieces, no units), "
                         f"nothing to train on; re-run tools/preprocess_data.py on inputs with "
                         f"text or speech")
    raise StoreError(f"{bin_path}: is empty (0 bytes); the file is truncated or was never "
                     f"written (re-run tools/preprocess_data.py)")


def _vocab_disagreements(vocab: JointVocab, manifest: Manifest) -> list[str]:
    """How the vocabulary layout of `manifest` disagrees with the tokenizer (size, digest,
    word-boundary piece) and the codebook size the manifest records beside it, one phrase each;
    empty when it agrees (tools/preprocess_data.py writes them from one tokenizer and one
    --num-units, and a word-boundary piece is never a special id: an EOS as the piece between
    two blocks would end the document there in a packed row)."""
    tokenizer = manifest.tokenizer
    found = []
    if vocab.text_size != tokenizer.vocab_size:
        found.append(f"vocab text_size {vocab.text_size}, tokenizer vocab_size "
                     f"{tokenizer.vocab_size}")
    if vocab.num_units != manifest.num_units:
        found.append(f"vocab num_units {vocab.num_units}, num_units {manifest.num_units!r}")
    if vocab.tokenizer_sha256 is not None and vocab.tokenizer_sha256 != tokenizer.sha256:
        found.append(f"vocab tokenizer_sha256 {vocab.tokenizer_sha256[:12]}..., tokenizer sha256 "
                     f"{tokenizer.sha256[:12]}...")
    specials = {vocab.pad_id: "pad_id", vocab.bos_id: "bos_id", vocab.eos_id: "eos_id"}
    if tokenizer.space_id in specials:  # interleaving puts it inside documents
        found.append(f"tokenizer space_id {tokenizer.space_id}, vocab "
                     f"{specials[tokenizer.space_id]} {tokenizer.space_id}")
    return found


class _MappedView:
    """The `__array_interface__` of a view of a mapped `.bin`, and the `IndexedDataset` that
    maps it: numpy keeps this object as the `.base` of the array made from it, so the mapping
    stays open while the array lives."""

    def __init__(self, view: np.ndarray, dataset: IndexedDataset):
        self.__array_interface__ = view.__array_interface__
        self._view, self._dataset = view, dataset


class DocumentStore:
    """Random access to the documents at `prefix` (`.bin`, `.idx`, `.json`), validated on open.

    `store[i]` is an `AlignedDocument` (kind "aligned") or an int32 array of text ids (kind
    "text"); arrays are read-only views of the memory-mapped `.bin`, each holding the mapping
    open while it lives.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.manifest = Manifest.load(self.prefix)
        self.kind = self.manifest.kind
        # The manifest's tokenizer digest travels with the vocabulary into checkpoints.
        self.vocab = dataclasses.replace(self._manifest_vocab(),
                                         tokenizer_sha256=self.manifest.tokenizer.sha256)
        self._per_doc = SEQUENCES_PER_DOCUMENT[self.kind]
        for path in (get_idx_path(self.prefix), get_bin_path(self.prefix)):
            if not os.path.exists(path):
                raise StoreError(f"{path}: not found; the manifest {self.prefix}.json has no data "
                                 f"next to it (re-run tools/preprocess_data.py)")
            checked_file_size(path, StoreError, "dataset file")  # a FIFO would block reading
        _check_index_file(get_idx_path(self.prefix))
        if os.path.getsize(get_bin_path(self.prefix)) == 0:  # megatron.core cannot map it
            _refuse_empty_bin(self.prefix)
        try:
            self._dataset = IndexedDataset(self.prefix, mmap=True)
        except (AssertionError, ValueError, struct.error) as error:
            raise StoreError(f"{get_idx_path(self.prefix)}: unreadable index ({error}); the file "
                             f"is truncated or not a Megatron index (re-run "
                             f"tools/preprocess_data.py)") from error
        self._validate()
        self._tokens = self._pinned_tokens()  # [tokens] int32, the .bin

    def _manifest_vocab(self) -> JointVocab:
        """The manifest's vocabulary layout, which must agree with the tokenizer and codebook
        the manifest records beside it."""
        path = Manifest.path_for(self.prefix)
        try:
            vocab = JointVocab.from_dict(self.manifest.vocab)
        except VocabularyError as error:
            raise ManifestError(f"{path}: unreadable vocabulary ({error}); re-run "
                                f"tools/preprocess_data.py") from None
        disagreements = _vocab_disagreements(vocab, self.manifest)
        if disagreements:
            raise ManifestError(f"{path}: contradicts itself ({'; '.join(disagreements)}): the "
                                f"manifest was edited or damaged, and which of its fields the "
                                f"ids were made with is unknown; re-run tools/preprocess_data.py")
        return vocab

    def _validate(self) -> None:
        """The index against itself, the `.bin` and the manifest, in blocks of
        `_VALIDATE_BLOCK` sequences: memory stays flat however large the corpus (every rank opens
        every store)."""
        lengths = self._dataset.sequence_lengths  # [num_sequences] int32, memory-mapped
        pointers = self._dataset.index.sequence_pointers  # [num_sequences] int64
        doc_bounds = self._dataset.document_indices
        idx_path = get_idx_path(self.prefix)
        num_docs = len(doc_bounds) - 1
        if num_docs != self.manifest.counts.documents:
            raise StoreError(f"{idx_path}: holds {num_docs} documents but {self.prefix}.json "
                             f"says {self.manifest.counts.documents}")
        for first in range(0, num_docs, _VALIDATE_BLOCK):
            if (np.diff(doc_bounds[first:first + _VALIDATE_BLOCK + 1]) != self._per_doc).any():
                raise StoreError(f"{idx_path}: a {self.kind} document must hold {self._per_doc} "
                                 f"sequences; this index was not written by DocumentWriter")
        itemsize = np.dtype(_DTYPE).itemsize
        end = 0  # byte of the .bin where the sequences checked so far end
        per_column = np.zeros(self._per_doc, dtype=np.int64)
        block_size = _VALIDATE_BLOCK * self._per_doc  # whole documents
        for first in range(0, len(lengths), block_size):
            block = lengths[first:first + block_size]
            negative = np.flatnonzero(block < 0)
            if len(negative):
                bad = first + int(negative[0])
                raise StoreError(f"{idx_path}: sequence {bad} (document {bad // self._per_doc}) "
                                 f"has length {int(lengths[bad])}; the index is damaged (re-run "
                                 f"tools/preprocess_data.py)")
            # DocumentWriter appends sequences back to back: each starts where the one before ends.
            ends = end + np.cumsum(block, dtype=np.int64) * itemsize
            starts = np.concatenate([[end], ends[:-1]])
            moved = np.flatnonzero(pointers[first:first + block_size] != starts)
            if len(moved):
                bad = first + int(moved[0])
                raise StoreError(f"{idx_path}: sequence {bad} (document "
                                 f"{bad // self._per_doc}) starts at byte {int(pointers[bad])} of "
                                 f"the .bin but the sequences before it end at byte "
                                 f"{int(starts[moved[0]])}: the index lists the sequences in "
                                 f"another order or is from another run (re-run "
                                 f"tools/preprocess_data.py)")
            end = int(ends[-1])
            per_column += block.reshape(-1, self._per_doc).sum(axis=0, dtype=np.int64)
        bin_path = get_bin_path(self.prefix)
        actual = os.path.getsize(bin_path)
        if actual != end:
            cause = ("truncated" if actual < end else
                     "longer: written to after its index, or a .bin of another run")
            raise StoreError(f"{bin_path}: is {actual} bytes but {idx_path} describes "
                             f"{end} bytes; the file is {cause} (re-run "
                             f"tools/preprocess_data.py)")
        stored = {"text_pieces": int(per_column[0])}
        if self.kind == "aligned":
            stored.update(units=int(per_column[1]), segments=int(per_column[2]))
        for name, value in stored.items():
            if value != getattr(self.manifest.counts, name):
                raise StoreError(f"{idx_path}: holds {value} {name} but {self.prefix}.json says "
                                 f"{getattr(self.manifest.counts, name)}")

    def __len__(self) -> int:
        return self.manifest.counts.documents

    def __getitem__(self, i: int) -> AlignedDocument | np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        first = self._per_doc * (int(i) % n)  # the document's sequences, back to back (checked)
        start = int(self._dataset.index.sequence_pointers[first]) // np.dtype(_DTYPE).itemsize
        parts = []
        for length in self._dataset.index.sequence_lengths[first:first + self._per_doc].tolist():
            parts.append(self._tokens[start:start + length])
            start += length
        return parts[0] if self.kind == "text" else AlignedDocument(*parts)

    def _pinned_tokens(self) -> np.ndarray:
        """[tokens] int32: the whole mapped `.bin`, as an array that holds this store's reader
        alive; documents are slices of it. megatron.core unmaps the `.bin` when its reader is
        collected, whatever views of it remain (numpy holds no buffer export that would stop
        it): a document read from a store that was then dropped (`DocumentStore(prefix)[0]`)
        crashed the interpreter (SIGSEGV) when read."""
        tokens = os.path.getsize(get_bin_path(self.prefix)) // np.dtype(_DTYPE).itemsize
        return np.asarray(_MappedView(self._dataset.bin_reader.read(_DTYPE, tokens, 0),
                                      self._dataset))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_tokens"]  # a view of the mapping: pickled, it would be a copy of the .bin
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)  # the IndexedDataset maps the .bin again
        self._tokens = self._pinned_tokens()

    def describe(self, i: int) -> str:
        """Where document `i` is stored, for error messages."""
        return f"{get_bin_path(self.prefix)}, document {i}"

    def token_counts(self) -> np.ndarray:
        """[D] int64: text pieces + units of each document (no specials), from the index only."""
        parts = self.part_lengths()
        return parts[:, 0] if self.kind == "text" else parts[:, 0] + parts[:, 1]

    def token_total(self, start: int = 0, stop: int | None = None) -> int:
        """Text pieces + units of documents `[start, stop)` (no specials), from the index only,
        without a per-document array."""
        columns = 1 if self.kind == "text" else 2  # text ids (and unit ids)
        lengths = self._dataset.sequence_lengths.reshape(-1, self._per_doc)
        return int(lengths[start:stop, :columns].sum(dtype=np.int64))

    def part_lengths(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """[D, 4] int64 (aligned) or [D, 1] (text): the length of each sequence of documents
        `[start, stop)` (text ids, unit ids, the two segment tables), from the index only."""
        lengths = self._dataset.sequence_lengths.reshape(-1, self._per_doc)
        return lengths[start:stop].astype(np.int64)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise VocabularyError unless `tokenizer` is the one the text ids were made with."""
        info = self.manifest.tokenizer
        if tokenizer.vocab_size != info.vocab_size:
            raise VocabularyError(
                f"{self.prefix}: was tokenized with a {info.vocab_size}-piece tokenizer "
                f"({info.path}) but this one has {tokenizer.vocab_size} pieces; use the tokenizer "
                f"the dataset was made with or re-run tools/preprocess_data.py")
        if tokenizer.sha256 != info.sha256:
            raise VocabularyError(
                f"{self.prefix}: was tokenized with {info.path} (sha256 {info.sha256[:12]}...) "
                f"but this tokenizer's file has sha256 {tokenizer.sha256[:12]}...; use the same "
                f"tokenizer or re-run tools/preprocess_data.py")

