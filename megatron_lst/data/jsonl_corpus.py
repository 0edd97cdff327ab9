"""Readers of JSONL corpora, one document per non-blank line: the reference "on the fly" format
(`read_reference_jsonl`, aligned documents) and text JSONL (`read_text_jsonl`, int32 text ids).
Blank lines are passed over silently. A bad line raises `DocumentError` naming `file:line`; with
`skip_bad=True` it is skipped instead and recorded in the `ReadReport` passed in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from megatron_lst.data.corpus_lines import open_corpus_lines
from megatron_lst.data.document_parsing import parse_reference_line, parse_text_line
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.read_report import ReadReport, SourceDocument
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer
from megatron_lst.tokenizer.vocab import VocabularyError


def _read_lines(path: Path, parse, skip_bad: bool, report: ReadReport | None
                ) -> Iterator[SourceDocument]:
    with open_corpus_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc, counts = parse(line, where)
            except (DocumentError, VocabularyError) as error:
                if not skip_bad:
                    raise
                (report or ReadReport()).skip(where, error)
                continue
            yield SourceDocument(doc, where, counts)


def read_reference_jsonl(path: str | Path, tokenizer: TextTokenizer, num_units: int = 502,
                         skip_bad: bool = False, report: ReadReport | None = None
                         ) -> Iterator[SourceDocument]:
    """Aligned documents of a reference "on the fly" JSONL file, one per non-blank line."""
    return _read_lines(Path(path),
                       lambda line, where: parse_reference_line(line, tokenizer, num_units, where),
                       skip_bad, report)


def read_text_jsonl(path: str | Path, tokenizer: TextTokenizer, key: str = "text",
                    skip_bad: bool = False, report: ReadReport | None = None
                    ) -> Iterator[SourceDocument]:
    """Text-only documents ([T] int32 text ids) of a JSONL file, one per non-blank line."""
    return _read_lines(Path(path),
                       lambda line, where: parse_text_line(line, tokenizer, key, where),
                       skip_bad, report)
