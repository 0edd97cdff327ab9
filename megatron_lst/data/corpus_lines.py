"""Opening a corpus file for its lines (`open_corpus_lines`): refusing what is no corpus (a
device, a compressed file), dropping a byte-order mark, and choosing the line ends."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import bounded_lines, checked_file_size

# The first bytes of a compressed file: (compressor, the command that decompresses it).
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
                     (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"BZh", "bzip2", "bunzip2 -k"))


def refuse_compressed(path: str | Path) -> None:
    """A DocumentError when `path` begins as a gzip, zstd, xz or bzip2 file does: read as text,
    its every line would be refused as not UTF-8 (and all of them skipped under --skip-bad).
    A pipe is not looked at: the bytes looked at would be gone from it."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as stream:
        start = stream.read(6)
    for magic, compressor, command in _COMPRESSED_MAGIC:
        if start.startswith(magic) and (compressor != "bzip2" or start[3:4].isdigit()):
            raise DocumentError(f"{path} is {compressor}-compressed, and corpora are read as "
                                f"UTF-8 text; decompress it first ({command} {path}) and pass "
                                f"the decompressed file")


def open_corpus_lines(path: str | Path):
    """A corpus file (JSONL, or plain text for tools/train_tokenizer.py) opened for its lines,
    a context manager giving them: a path that is neither a regular file nor a pipe (a device,
    a folder) and a compressed file are refused (`refuse_compressed`), and a line longer than
    any document's is refused at that line (`bounded_lines`); a leading byte-order mark (what
    Windows editors and some exporters write) is dropped, else the first line would not read
    as JSON, or its first word would begin with U+FEFF; a byte that is not UTF-8 is kept as a
    surrogate (U+DC80..U+DCFF), for the caller to name with its line. Lines end as
    `_newline_of` says, untranslated ("\r\n" stays)."""
    checked_file_size(path, DocumentError, "corpus", pipe_allowed=True)
    refuse_compressed(path)
    return _CorpusLines(path)


class _CorpusLines:
    """The lines of an opened corpus file (`open_corpus_lines`), closed on leaving `with`."""

    def __init__(self, path: str | Path):
        self._stream = open(path, encoding="utf-8-sig", errors="surrogateescape",  # noqa: SIM115
                            newline=_newline_of(path))
        self._path = path

    def __enter__(self) -> Iterator[str]:
        return bounded_lines(self._stream, self._path, functools.partial(
            DocumentError, kind="line too long"))

    def __exit__(self, *exc_info) -> None:
        self._stream.close()


_LINE_END_SAMPLE_BYTES = 1 << 16


def _newline_of(path: str | Path) -> str | None:
    """How to split the lines of the corpus file `path` (`open`'s `newline`): at LF only ("\n":
    a lone CR stays inside its line, as `sed -n` and `grep -n` count lines; read as a line end,
    it split a JSON line into two refused halves and shifted every later line number), or, for
    a file whose first 64 KiB hold a CR but no LF (classic Mac OS line ends), at CR too (None).
    A pipe is not looked at (`refuse_compressed`): it is split at LF."""
    if not Path(path).is_file():
        return "\n"
    with open(path, "rb") as stream:
        start = stream.read(_LINE_END_SAMPLE_BYTES)
    return None if b"\r" in start and b"\n" not in start else "\n"
