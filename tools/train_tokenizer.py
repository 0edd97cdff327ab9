"""Train a small SentencePiece BPE text tokenizer with Llama-2's settings.

    python tools/train_tokenizer.py --input corpus.jsonl --input-format text-jsonl \
        --vocab-size 512 --output tokenizers/spm.model

writes `tokenizers/spm.model`. Inputs: plain text (one sentence per line), text
JSONL (`--json-key`), or the reference "on the fly" JSONL (the words of each line, without
`[SIL]`). The same inputs give the same model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_lst.data.readers import SEGMENT_SEP, SILENCE_WORD
from megatron_lst.tokenizer.text_tokenizer import VocabSizeError, train_sentencepiece
from megatron_lst.tokenizer.vocab import VocabularyError

FORMATS = ("text", "text-jsonl", "reference-jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH")
    parser.add_argument("--input-format", choices=FORMATS, default="text")
    parser.add_argument("--json-key", default="text", help="text-jsonl: the text field")
    parser.add_argument("--vocab-size", type=int, default=512)
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
    """The training sentences of `paths`, in order; blank lines are skipped."""
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if input_format == "text":
                    yield line.rstrip("\n")
                    continue
                try:
                    record = json.loads(line)
                    text = (record[json_key] if input_format == "text-jsonl"
                            else _reference_words(record["interleaved"]))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                    raise SystemExit(f"{path}:{number}: not a {input_format} line ({error!r})") from None
                if text.strip():
                    yield text


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
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
    print(f"wrote {model} ({args.vocab_size} pieces)")
    return model


if __name__ == "__main__":
    main()
