"""Utterance lists of the common corpus layouts, and the Montreal Forced Aligner's input layout.

Every reader returns `Utterance`s whose `id` is the audio file's path relative to the corpus root,
without its suffix (`103/1240/103-1240-0000`). Unit files (`<units-dir>/<id>.npy`), the aligner's
corpus (`<mfa-dir>/<id>.lab` beside the audio) and hence its TextGrids (`<out>/<id>.TextGrid`)
all use that id, which is how `tools/preprocess_data.py --input-format textgrid` pairs them.

Layouts:

- `audio-dir`: every `.wav`/`.flac` under a folder (no transcripts: units only);
- `transcripts`: LibriSpeech (`<spk>/<chapter>/<spk>-<chapter>.trans.txt`, lines `ID TEXT`,
  audio `ID.flac` beside it) and Multilingual LibriSpeech (`transcripts.txt`, lines `ID<TAB>TEXT`
  with ID = `<spk>_<book>_<n>`, audio `audio/<spk>/<book>/ID.flac` beside it);
- `tsv`: lines `PATH<TAB>TEXT`, PATH relative to the TSV's folder (or absolute).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_lst.audio.audio_io import AUDIO_SUFFIXES
from megatron_lst.data.folder_walk import files_under
from megatron_lst.data.input_files import MAX_LARGE_TEXT_BYTES, read_bounded_bytes


class CorpusError(ValueError):
    """A corpus listing is malformed or names audio that is not there."""


@dataclass(frozen=True)
class Utterance:
    id: str
    """Relative path without suffix, '/'-separated: names the unit and TextGrid files."""
    audio: Path
    text: str | None = None
    """The transcript, when the layout has one."""


def _relative_id(audio: Path, root: Path) -> str:
    # Lexically first: a file reached through a linked folder keeps the link's place.
    relative = Path(os.path.relpath(audio, root))
    if ".." in relative.parts:
        try:
            relative = audio.resolve().relative_to(root.resolve())
        except ValueError:
            relative = Path(audio.name)  # outside the root (absolute TSV paths): the file name
    return relative.with_suffix("").as_posix()


def _unique(utterances: list[Utterance], source: str) -> list[Utterance]:
    seen: dict[str, Path] = {}
    for utterance in utterances:
        if utterance.id in seen:
            raise CorpusError(f"{source}: two audio files share the id {utterance.id!r} "
                              f"({seen[utterance.id]} and {utterance.audio}); their unit files "
                              f"would overwrite each other")
        seen[utterance.id] = utterance.audio
    return sorted(utterances, key=lambda u: u.id)


def read_audio_dir(root: str | Path) -> list[Utterance]:
    """Every audio file under `root`, sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: no such folder")
    paths = [p for p in files_under(root, CorpusError)
             if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
    if not paths:
        raise CorpusError(f"{root}: no {'/'.join(AUDIO_SUFFIXES)} files found")
    return _unique([Utterance(_relative_id(p, root), p) for p in paths], str(root))


def _read_lines(path: Path) -> list[str]:
    data = read_bounded_bytes(path, CorpusError, "file", MAX_LARGE_TEXT_BYTES)
    try:
        # utf-8-sig: a byte-order mark (Excel, Notepad) would otherwise start the first path or id
        return data.decode("utf-8-sig").split("\n")  # as iterating the file splits
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: not UTF-8 text ({error}); convert it, e.g. with "
                          f"iconv -t utf-8") from None


def _transcript_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) < 2:
            raise CorpusError(f"{path}:{number}: expected 'ID TEXT', found {line.strip()!r}")
        yield number, parts[0], parts[1]


def _find_audio(folder: Path, utterance_id: str) -> Path | None:
    candidates = [folder]
    pieces = utterance_id.split("_")
    if len(pieces) >= 3:  # MLS: audio/<spk>/<book>/<spk>_<book>_<n>.flac
        candidates.append(folder / "audio" / pieces[0] / pieces[1])
    for directory in candidates:
        for suffix in AUDIO_SUFFIXES:
            path = directory / f"{utterance_id}{suffix}"
            if path.is_file():
                return path
    return None


def read_transcripts(root: str | Path) -> list[Utterance]:
    """LibriSpeech `*.trans.txt` and MLS `transcripts.txt` files under `root`, sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: no such folder")
    files = sorted(p for p in files_under(root, CorpusError)
                   if p.name.endswith(".trans.txt") or p.name == "transcripts.txt")
    if not files:
        raise CorpusError(f"{root}: no LibriSpeech *.trans.txt or MLS transcripts.txt files")
    utterances = []
    for path in files:
        for number, utterance_id, text in _transcript_lines(path):
            audio = _find_audio(path.parent, utterance_id)
            if audio is None:
                raise CorpusError(
                    f"{path}:{number}: no audio for {utterance_id!r}: looked for "
                    f"{utterance_id}{{{','.join(AUDIO_SUFFIXES)}}} beside the transcript and "
                    f"under audio/<speaker>/<book>/")
            utterances.append(Utterance(_relative_id(audio, root), audio, text))
    return _unique(utterances, str(root))


def read_tsv(path: str | Path) -> list[Utterance]:
    """Lines `PATH<TAB>TEXT` (a `path<TAB>text` header line is skipped), sorted by id."""
    path = Path(path)
    root = path.parent
    utterances = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        audio_name, tab, text = line.partition("\t")
        if not tab or not audio_name.strip():
            raise CorpusError(f"{path}:{number}: expected 'PATH<TAB>TEXT', found {line!r}")
        if number == 1 and audio_name.strip().lower() == "path":
            continue
        audio = Path(audio_name.strip())
        audio = audio if audio.is_absolute() else root / audio
        if not audio.is_file():
            raise CorpusError(f"{path}:{number}: no audio file {audio}")
        utterances.append(Utterance(_relative_id(audio, root), audio, text.strip()))
    if not utterances:
        raise CorpusError(f"{path}: lists no utterances")
    return _unique(utterances, str(path))


CORPUS_READERS: dict[str, Callable[[str | Path], list[Utterance]]] = {
    "audio-dir": read_audio_dir,
    "transcripts": read_transcripts,
    "tsv": read_tsv,
}


def write_mfa_corpus(utterances: list[Utterance], out_dir: str | Path) -> int:
    """The aligner's input: `<out_dir>/<id><audio suffix>` (a symlink to the audio) and
    `<out_dir>/<id>.lab` (the transcript) per utterance. Returns how many were written.

    `mfa align <out_dir> <dictionary> <acoustic model> <textgrid dir>` then writes
    `<textgrid dir>/<id>.TextGrid`. Speakers are the folders holding the files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusError(f"--mfa-corpus-dir {out_dir} is a file; pass a folder (it is created "
                          f"when missing)")
    links = [_mfa_link(utterance, out_dir) for utterance in utterances]
    for utterance, link in zip(utterances, links, strict=True):
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()  # an earlier run's link
        os.symlink(utterance.audio.resolve(), link)
        link.with_suffix(".lab").write_text(utterance.text + "\n", encoding="utf-8")
    return len(links)


def _mfa_link(utterance: Utterance, out_dir: Path) -> Path:
    """Where the aligner's link to `utterance`'s audio goes; refuses a place that holds a file
    (the corpus' own audio, when `out_dir` is the corpus: replacing it would delete it)."""
    if utterance.text is None:
        raise CorpusError(f"{utterance.audio}: no transcript; the aligner needs one per "
                          f"utterance (use the transcripts or tsv layout)")
    if not utterance.text.strip():  # the aligner skips it: no TextGrid, the utterance lost
        raise CorpusError(f"{utterance.audio}: its transcript is empty; the aligner needs the "
                          f"words spoken: fill them in, or leave the utterance out of the list")
    link = out_dir / f"{utterance.id}{utterance.audio.suffix.lower()}"
    is_the_audio = link.parent.resolve() / link.name == utterance.audio.parent.resolve() / (
        utterance.audio.name)
    if is_the_audio or (link.exists() and not link.is_symlink()):
        raise CorpusError(f"{link}: the aligner's link to {utterance.audio} would replace this "
                          f"file; write the aligner's corpus to a folder outside the corpus "
                          f"(--mfa-corpus-dir)")
    return link
