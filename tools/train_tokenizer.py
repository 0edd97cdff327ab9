"""Train a small SentencePiece BPE text tokenizer with Llama-2's settings.

    python tools/train_tokenizer.py --input corpus.jsonl --input-format text-jsonl \
        --vocab-size 512 --output tokenizers/spm.model

writes `tokenizers/spm.model`. Inputs: plain text (one sentence per line), text
JSONL (`--json-key`), or the reference "on the fly" JSONL (the words of each line, without
`[SIL]`). The same inputs give the same model.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_lst.data.corpus_lines import open_corpus_lines
from megatron_lst.data.document_parsing import SEGMENT_SEP, SILENCE_WORD
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import checked_file_size
from megatron_lst.data.json_objects import RepeatedKeyError, loads_unique_keys
from megatron_lst.tokenizer.text_tokenizer import VocabSizeError, train_sentencepiece
from megatron_lst.tokenizer.vocab import VocabularyError

FORMATS = ("text", "text-jsonl", "reference-jsonl")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="the training text files")
    parser.add_argument("--input-format", choices=FORMATS, default="text",
                        help="text: lines of text; text-jsonl: --json-key of each line; "
                             "reference-jsonl: the words of the reference's speech-text lines (default: "
                             "text)")
    parser.add_argument("--json-key", default=None,
                        help="text-jsonl: the text field (default: text; refused with another "
                             "--input-format)")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="pieces of the tokenizer; one the text cannot reach is refused "
                             "with the largest it can (default 512)")
    parser.add_argument("--output", required=True, type=Path, help="the .model file to write")
    return parser


def _reference_words(interleaved: str) -> str:
    words = []
    for part in interleaved.split(SEGMENT_SEP):
        head, _, payload = part.partition(" ")
        if head == "TEXT":
            words += [w for w in payload.split() if w != SILENCE_WORD]
    return " ".join(words)


def sentences(paths: Sequence[str], input_format: str, json_key: str = "text") -> Iterator[str]:
    """The training sentences of `paths`, in order; blank lines and a byte-order mark at the
    start of a file are skipped."""
    for path in paths:
        try:
            yield from _file_sentences(path, input_format, json_key)
        except DocumentError as error:  # compressed, or a line longer than any sentence
            raise SystemExit(f"error: {error}") from None


def _file_sentences(path: str, input_format: str, json_key: str) -> Iterator[str]:
    """The training sentences of one corpus file, in order."""
    # A byte that is no UTF-8 reads as a lone surrogate U+DC80..U+DCFF: the line is named.
    with open_corpus_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            bad = _NOT_UTF8.search(line)
            if bad:
                raise SystemExit(f"{path}:{number}: not UTF-8 text (the byte "
                                 f"0x{ord(bad.group()) - 0xDC00:02x} at character "
                                 f"{bad.start()}); save the corpus as UTF-8")
            if line.strip():
                yield from _line_text(line, input_format, json_key, f"{path}:{number}")


def _line_text(line: str, input_format: str, json_key: str, where: str) -> Iterator[str]:
    """The training sentence of one non-blank line, if it holds text."""
    if input_format == "text":
        yield line.rstrip("\n")
        return
    try:
        record = loads_unique_keys(line)
        text = (record[json_key] if input_format == "text-jsonl"
                else _reference_words(record["interleaved"]))
    except RepeatedKeyError as error:
        raise SystemExit(f"{where}: {error}") from None
    # ValueError: not JSON, or an integer literal past Python's digit limit
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise SystemExit(f"{where}: not a {input_format} line ({error!r})") from None
    if not isinstance(text, str):
        raise SystemExit(f"{where}: not a {input_format} line ({json_key!r} holds a "
                         f"{type(text).__name__}, not text)")
    if text.strip():
        yield text


def _check_files(args: argparse.Namespace) -> None:
    """Every input is a file, and --output is none of them (training reads the corpus before
    writing the model: the corpus would be replaced by it)."""
    for path in args.input:
        if not os.path.exists(path):
            raise SystemExit(f"--input {path}: no such file")
        # a FIFO or a device: named as what it is, not as missing
        checked_file_size(path, lambda message: SystemExit(f"--input {message}"), "corpus")
    if args.output.exists():
        replaced = next((path for path in args.input if os.path.samefile(path, args.output)),
                        None)
        if replaced is not None:
            raise SystemExit(f"--output {args.output} is the --input {replaced}, which the model "
                             f"would overwrite; write the model to another file")


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.json_key is not None and args.input_format != "text-jsonl":
        # It was ignored: the JSON lines themselves, braces and keys, trained the tokenizer.
        raise SystemExit(f"--json-key {args.json_key} reads --input-format text-jsonl, not "
                         f"{args.input_format}; add --input-format text-jsonl or drop it")
    if args.json_key is None:
        args.json_key = "text"
    _check_files(args)
    try:
        model = train_sentencepiece(sentences(args.input, args.input_format, args.json_key),
                                    args.output, args.vocab_size)
    except VocabSizeError as error:
        raise SystemExit(f"error: --vocab-size {error.requested} is larger than "
                         f"{' '.join(args.input)} allows: BPE on it yields at most "
                         f"{error.largest} pieces; pass --vocab-size {error.largest} or less, or "
                         f"train on more text") from None
    except VocabularyError as error:
        raise SystemExit(f"error: --vocab-size: {error}") from None
    except OSError as error:  # a full disk, a read-only folder: the model is replaced atomically
        where = f" ({error.filename})" if error.filename else ""
        raise SystemExit(f"error: {error.strerror or error}{where}; --output {args.output} is as "
                         f"it was: free space, or write the model elsewhere") from None
    print(f"wrote {model} ({args.vocab_size} pieces)")
    return model


if __name__ == "__main__":
    main()
