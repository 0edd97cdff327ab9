"""Chunked parallel reading for preprocessing: the input cut into chunks of lines or of
utterances (`line_chunks`, `utterance_chunks`) that worker processes parse (`parse_chunk`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_lst.data.corpus_lines import open_corpus_lines
from megatron_lst.data.document_parsing import parse_reference_line, parse_text_line
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.manifest import Counts
from megatron_lst.data.read_report import Document, ReadReport
from megatron_lst.data.textgrid_corpus import (
    Utterance,
    find_units_file,
    parse_textgrid_utterance,
    utterance_textgrid,
)
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer, load_text_tokenizer
from megatron_lst.tokenizer.vocab import VocabularyError

# Parallel reading: the input is cut into chunks (of lines, or of utterances) that worker
# processes parse with `parse_chunk`; everything a worker needs is picklable and importable here.

INPUT_FORMATS = ("reference-jsonl", "textgrid", "text-jsonl")


@dataclass(frozen=True)
class ReadOptions:
    input_format: str
    """One of INPUT_FORMATS."""
    tokenizer_path: str
    tokenizer_sha256: str
    """Workers refuse a tokenizer file that differs from the one the run started with."""
    num_units: int = 502
    frame_rate: float = 25.0
    json_key: str = "text"
    tier: str = "words"
    textgrid_dir: str | None = None
    units_dir: str | None = None
    skip_bad: bool = False

    def __post_init__(self):
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, "
                             f"got {self.input_format!r}")
        if self.input_format == "textgrid" and not (self.textgrid_dir and self.units_dir):
            raise ValueError("the textgrid input format needs textgrid_dir and units_dir")


@dataclass
class Chunk:
    items: list
    """(line number, line) pairs, or utterances (`Utterance`)."""
    source: str
    """The file the lines come from ("" for TextGrid utterances)."""
    size: int
    """Input bytes (lines) or utterances, for progress bars."""


@dataclass
class ChunkResult:
    documents: list[Document]
    counts: Counts
    report: ReadReport


def line_chunks(paths: list[str], chunk_size: int) -> Iterator[Chunk]:
    """The non-blank lines of `paths`, in order, `chunk_size` lines at a time. A chunk's size is
    the input bytes it covers, as the progress total counts them (the files' sizes): its lines
    encoded back (characters are not bytes beyond ASCII), the blank lines before them, and, for
    the last chunk of a file, the bytes no line's text holds (a byte-order mark); the sizes of a
    file's chunks add up to its size."""
    for path in paths:
        file_size, counted = Path(path).stat().st_size, 0
        with open_corpus_lines(path) as lines:
            chunk: list[tuple[int, str]] = []
            size = 0
            for number, line in enumerate(lines, 1):
                size += len(line.encode("utf-8", "surrogateescape"))  # the bytes read
                if line.strip():
                    chunk.append((number, line))
                if len(chunk) == chunk_size:
                    yield Chunk(chunk, str(path), size)
                    counted += size
                    chunk, size = [], 0
        rest = max(file_size - counted, 0)
        if chunk or rest:
            yield Chunk(chunk, str(path), rest)


def utterance_chunks(utterances: list[Utterance], chunk_size: int) -> Iterator[Chunk]:
    """Utterances, `chunk_size` at a time."""
    for start in range(0, len(utterances), chunk_size):
        chunk = utterances[start: start + chunk_size]
        yield Chunk(chunk, "", len(chunk))


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(path: str, sha256: str) -> TextTokenizer:
    # One tokenizer (and its word cache) per process for all the chunks it parses.
    tokenizer = load_text_tokenizer(path)
    if tokenizer.sha256 != sha256:
        raise VocabularyError(f"{path}: the tokenizer file changed during preprocessing "
                              f"(sha256 {tokenizer.sha256[:12]}..., expected {sha256[:12]}...)")
    return tokenizer


def _item_where(options: ReadOptions, item, source: str) -> str:
    """Where a chunk item comes from: its utterance's (first) TextGrid, or `file:line`."""
    return str(item[0]) if options.input_format == "textgrid" else f"{source}:{item[0]}"


def _parse_item(options: ReadOptions, tokenizer: TextTokenizer, item, source: str
                ) -> tuple[Document, Counts]:
    if options.input_format == "textgrid":
        path = utterance_textgrid(item)
        units_path = find_units_file(path, Path(options.textgrid_dir), Path(options.units_dir))
        return parse_textgrid_utterance(path, units_path, tokenizer, options.frame_rate,
                                        options.num_units, options.tier)
    number, line = item
    where = f"{source}:{number}"
    if options.input_format == "reference-jsonl":
        return parse_reference_line(line, tokenizer, options.num_units, where)
    return parse_text_line(line, tokenizer, options.json_key, where)


def parse_chunk(options: ReadOptions, chunk: Chunk) -> ChunkResult:
    """The documents of one chunk, in order; bad ones raise or (skip_bad) are counted."""
    tokenizer = _worker_tokenizer(options.tokenizer_path, options.tokenizer_sha256)
    result = ChunkResult([], Counts(), ReadReport())
    for item in chunk.items:
        try:
            document, counts = _parse_item(options, tokenizer, item, chunk.source)
        except (DocumentError, VocabularyError) as error:
            if not options.skip_bad:
                raise
            result.report.skip(_item_where(options, item, chunk.source), error)
            continue
        result.documents.append(document)
        result.counts.add(counts)
    result.counts.bad_skipped = result.report.bad_skipped
    return result
