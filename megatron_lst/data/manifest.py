"""The JSON manifest stored next to an indexed dataset as `<prefix>.json`.

It records what a reader needs to trust the `.bin/.idx` pair: the kind of documents, the joint
vocabulary layout, which tokenizer made the text ids (path, sha256, size), the speech codebook and
frame rate, and counts that the store checks against the index on open.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megatron_lst.data.documents import DocumentError
from megatron_lst.data.input_files import read_bounded_bytes

FORMAT_VERSION = 1
KINDS = ("aligned", "text")


class ManifestError(DocumentError):
    """A manifest is missing, unreadable or disagrees with the data it describes."""


@dataclass
class Counts:
    documents: int = 0
    segments: int = 0
    """Aligned segments (words and silences); 0 for text datasets."""
    words: int = 0
    """Whitespace-separated words in the text (for aligned data: in word segments)."""
    silences: int = 0
    text_pieces: int = 0
    units: int = 0
    bad_skipped: int = 0
    """Input lines or utterances skipped as malformed (only with skip-bad)."""
    empty_silences_dropped: int = 0
    """Silence segments with no units (a zero-frame `[SIL]`): they carry nothing and are dropped."""
    unknown_words: int = 0
    """TextGrid word intervals labelled `<unk>` or `spn` (the aligner's unknown word): kept as
    segments without text (dropped when they have no units), not in `words` or `silences`."""

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    space_id: int | None = None
    """The lone word-boundary piece a text run ends with before another segment (None if the
    tokenizer has none); interleaving needs it to lay out runs as the reference does."""


@dataclass
class Manifest:
    kind: str
    """"aligned" (4 sequences per document) or "text" (1 sequence per document)."""
    vocab: dict
    """`JointVocab.to_dict()` of the vocabulary the ids were made for."""
    tokenizer: TokenizerInfo
    num_units: int
    frame_rate: float | None
    """Unit frames per second of aligned data; None for text."""
    counts: Counts = field(default_factory=Counts)
    sources: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ManifestError(f"manifest kind must be one of {KINDS}, got {self.kind!r}")

    @staticmethod
    def path_for(prefix: str | Path) -> Path:
        return Path(str(prefix) + ".json")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, prefix: str | Path) -> Path:
        path = self.path_for(prefix)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, prefix: str | Path) -> Manifest:
        path = cls.path_for(prefix)
        if not path.exists():
            if cls.path_for(f"{prefix}.partial").is_file():
                raise ManifestError(
                    f"{path}: manifest not found, and {cls.path_for(f'{prefix}.partial')} is "
                    f"there: a tools/preprocess_data.py run was stopped while it moved its output "
                    f"into place, so {prefix}.bin/.idx may be of two runs; run it again")
            raise ManifestError(f"{path}: manifest not found; datasets must be written by "
                                f"tools/preprocess_data.py, which writes it next to .bin/.idx"
                                f"{_suffix_hint(prefix)}{_index_without_manifest_hint(prefix)}")
        try:
            raw = json.loads(read_bounded_bytes(path, ManifestError, "manifest").decode("utf-8"))
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got a {type(raw).__name__}")
            version = raw.get("format_version")  # true and 1.0 equal 1, yet no writer wrote them
            if type(version) is not int or version != FORMAT_VERSION:
                raise ManifestError(f"{path}: manifest format version {version!r} is not "
                                    f"{FORMAT_VERSION}; re-run tools/preprocess_data.py")
            if raw.get("kind") not in KINDS:  # Manifest's own error would not name the file
                raise TypeError(f"kind {raw.get('kind')!r} is not one of {KINDS}")
            raw["tokenizer"] = TokenizerInfo(**raw["tokenizer"])
            raw["counts"] = Counts(**raw["counts"])
            _check_integer_counts(raw["counts"])
            _check_tokenizer_fields(raw["tokenizer"])
            _check_space_id(raw["tokenizer"])
            _check_frame_rate(raw.get("kind"), raw.get("frame_rate"))
            return cls(**raw)
        except ManifestError:
            raise
        # ValueError: JSON and UTF-8 decoding
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise ManifestError(f"{path}: unreadable manifest ({error}); re-run "
                                f"tools/preprocess_data.py") from None


def _check_integer_counts(counts: Counts) -> None:
    not_integers = [f.name for f in fields(counts) if type(getattr(counts, f.name)) is not int]
    if not_integers:
        raise TypeError(f"counts {not_integers} are not integers")


def _check_tokenizer_fields(tokenizer: TokenizerInfo) -> None:
    wrong = [f"{name} {getattr(tokenizer, name)!r}" for name, kind in
             (("path", str), ("sha256", str), ("vocab_size", int))
             if type(getattr(tokenizer, name)) is not kind]
    if wrong:
        raise TypeError(f"tokenizer {', '.join(wrong)}: not what tools/preprocess_data.py writes")


def _check_frame_rate(kind: str, frame_rate) -> None:
    """Aligned data records its positive unit frame rate; text data records none."""
    if kind == "text" and frame_rate is None:
        return
    if type(frame_rate) not in (int, float) or not 0 < frame_rate < float("inf"):
        raise TypeError(f"frame_rate {frame_rate!r} is not a positive number of unit frames per "
                        f"second")


def _check_space_id(tokenizer: TokenizerInfo) -> None:
    space_id = tokenizer.space_id
    if space_id is not None and not (type(space_id) is int
                                     and 0 <= space_id < tokenizer.vocab_size):
        raise TypeError(f"tokenizer space_id {space_id!r} is not a piece of the "
                        f"{tokenizer.vocab_size}-piece tokenizer")


# What to do with data another tool wrote (Megatron-LM's preprocess_data.py, for one).
REPREPROCESS = ("run tools/preprocess_data.py on the source documents (text JSONL: "
                "--input-format text-jsonl)")


def _index_without_manifest_hint(prefix: str | Path) -> str:
    """Advice for a `.bin/.idx` pair with no manifest, as Megatron-LM's preprocess_data.py
    writes them."""
    if not (os.path.exists(f"{prefix}.idx") and os.path.exists(f"{prefix}.bin")):
        return ""
    return (f"; {prefix}.bin/.idx are there without it, as Megatron-LM's preprocess_data.py "
            f"writes them: its ids are of a text tokenizer alone (uint16 under 65500 tokens), "
            f"not of the joint text+speech vocabulary the manifest records; {REPREPROCESS}")


def _suffix_hint(prefix: str | Path) -> str:
    """Advice for a prefix given with a file suffix (`data/speech.bin` for `data/speech`), or
    naming a directory (`data` for `data/speech`)."""
    if os.path.isdir(prefix):
        found = sorted(str(path)[:-len(".json")] for path in Path(prefix).glob("*.json")
                       if path.with_suffix(".idx").exists())
        example = found[0] if found else os.path.join(str(prefix), "corpus")
        listing = f" ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
        return (f"; {prefix} is a directory: name a dataset in it by its prefix, the path of its "
                f"files without .bin/.idx/.json, e.g. {example}{listing}")
    stem, suffix = os.path.splitext(str(prefix))
    if suffix in (".bin", ".idx", ".json") and Manifest.path_for(stem).exists():
        return f"; a dataset is named by its prefix: pass {stem}, without {suffix}"
    return ""
