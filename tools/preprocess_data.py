"""Convert speech-text and text corpora into Megatron indexed datasets for megatron-lst.

    python tools/preprocess_data.py --input mls.chunk.00.on_the_fly \
        --input-format reference-jsonl --tokenizer-model spm.model --output-prefix data/mls \
        --workers 4

writes `data/mls.bin`, `data/mls.idx` (`megatron.core.datasets.indexed_dataset`) and
`data/mls.json` (the manifest; see megatron_lst/data/indexed.py for the layout). Workers parse and
tokenize chunks of lines (or utterances) in parallel; the main process writes them in input order,
so the output is byte-identical for any --workers. Bad input stops the run with the file and line;
--skip-bad skips such documents, lists each in `PREFIX.skipped.tsv` and tallies them by kind.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import fcntl
import functools
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from megatron_lst.audio.units_record import check_units_fit
from megatron_lst.data.corpus_lines import refuse_compressed
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.indexed import DocumentWriter
from megatron_lst.data.input_files import checked_file_size
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.data.read_chunks import (
    INPUT_FORMATS,
    Chunk,
    ChunkResult,
    ReadOptions,
    line_chunks,
    parse_chunk,
    utterance_chunks,
)
from megatron_lst.data.read_report import Skip
from megatron_lst.data.textgrid_corpus import textgrid_utterances, unit_files_without_textgrid
from megatron_lst.data.worker_pool import worker_pool
from megatron_lst.tokenizer.text_tokenizer import joint_vocab, load_text_tokenizer
from megatron_lst.tokenizer.vocab import VocabularyError

TEXTGRID_TIER = "words"  # MFA's word tier
JSON_KEY = "text"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", default=[], metavar="PATH",
                       help="JSONL files (reference-jsonl, text-jsonl), read in the given order")
    group.add_argument("--input-format", choices=INPUT_FORMATS, required=True,
                       help="reference-jsonl: the reference's speech-text lines; textgrid: MFA "
                            "word tiers with unit files; text-jsonl: text-only documents "
                            "(docs/data.md#input-formats)")
    group.add_argument("--textgrid-dir", type=Path, help="textgrid: MFA output (*.TextGrid)")
    group.add_argument("--units-dir", type=Path,
                       help="textgrid: per-utterance units (.npy or text), matched by path/stem")
    group.add_argument("--textgrid-tier", default=TEXTGRID_TIER,
                       help=f"textgrid: the tier of words to read (default: {TEXTGRID_TIER})")
    group.add_argument("--json-key", default=JSON_KEY,
                       help=f"text-jsonl: the text field (default: {JSON_KEY})")
    group = parser.add_argument_group("vocabulary")
    group.add_argument("--tokenizer-model", required=True, type=Path,
                       help="SentencePiece .model or tokenizers tokenizer.json")
    group.add_argument("--num-units", type=int, default=502,
                       help="speech codebook size (default 502: HuBERT's 500 clusters and 2 spare "
                            "slots); every dataset of a run needs the same")
    group.add_argument("--frame-rate", type=float, default=25.0, help="unit frames per second (default 25)")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.json")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="parsing processes (default 1; the output is the same for any number)")
    group.add_argument("--chunk-size", type=int, default=64,
                       help="lines or utterances per worker task (default 64)")
    group.add_argument("--skip-bad", action="store_true",
                       help="skip malformed documents instead of stopping: each is listed in "
                            "PREFIX.skipped.tsv, and the summary counts them by kind")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="when stderr is not a terminal, print a progress line every this "
                            "many documents (default 1000; a terminal gets a progress bar)")
    return parser


class Progress:
    """Progress on stderr: a tqdm bar on a terminal, else a line every `log_interval` documents
    (as Megatron-LM's preprocessing prints), so logs of batch jobs show it too."""

    def __init__(self, total: int, unit: str, log_interval: int, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.unit, self.log_interval = total, unit, log_interval
        self.done = self.documents = 0
        self.next_line = log_interval
        self.start = time.perf_counter()
        self.bar = (tqdm(total=total, unit=unit, unit_scale=True, desc="preprocess",
                         file=self.stream) if self.stream.isatty() else None)

    def update(self, size: int, documents: int) -> None:
        """`size` more of the input done (bytes or utterances), holding `documents` documents."""
        self.done += size
        self.documents += documents
        if self.bar is not None:
            self.bar.update(size)
        elif self.documents >= self.next_line:
            self.next_line = (self.documents // self.log_interval + 1) * self.log_interval
            self.print_line()

    def print_line(self) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        if self.unit == "B":
            done = f"{self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB"
            rate = f"{self.done / 1e6 / seconds:,.2f} MB/s"
        else:
            done = f"{self.done:,} of {self.total:,} utterances"
            rate = f"{self.done / seconds:,.0f} utterances/s"
        share = 100.0 * self.done / self.total if self.total else 100.0
        print(f"preprocess: {self.documents:,} documents, {done} ({share:.1f}%) in "
              f"{seconds:,.0f}s, {self.documents / seconds:,.0f} documents/s, {rate}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_args(args: argparse.Namespace) -> None:
    if args.input_format == "textgrid":
        if not (args.textgrid_dir and args.units_dir):
            raise SystemExit("--input-format textgrid needs --textgrid-dir and --units-dir")
        if args.input:
            raise SystemExit("--input-format textgrid reads --textgrid-dir/--units-dir, "
                             "not --input")
        for flag, folder in (("--textgrid-dir", args.textgrid_dir),
                             ("--units-dir", args.units_dir)):
            if not folder.is_dir():  # else every utterance was refused (or, --skip-bad, skipped)
                raise SystemExit(f"{flag} {folder}: "
                                 + ("not a directory" if folder.exists() else "no such directory"))
    elif not args.input:
        raise SystemExit(f"--input-format {args.input_format} needs --input")
    # Flags of another format were ignored: a corpus read as another format than meant, unsaid.
    other_format = {flag: reads for flag, given, reads in (
        ("--textgrid-dir", args.textgrid_dir is not None, "textgrid"),
        ("--units-dir", args.units_dir is not None, "textgrid"),
        ("--textgrid-tier", args.textgrid_tier != TEXTGRID_TIER, "textgrid"),
        ("--json-key", args.json_key != JSON_KEY, "text-jsonl"))
        if given and reads != args.input_format}
    if other_format:
        formats = sorted(set(other_format.values()))
        raise SystemExit(f"{' and '.join(other_format)} "
                         f"{'applies' if len(other_format) == 1 else 'apply'} only to "
                         f"--input-format {' and '.join(formats)}, not {args.input_format}: "
                         f"drop {'it' if len(other_format) == 1 else 'them'} or give the "
                         f"format they read")
    for number, path in enumerate(args.input):
        if not os.path.exists(path):
            raise SystemExit(f"--input {path}: no such file")
        # a FIFO (<(zcat ...)) or a device: named as what it is, not as missing
        checked_file_size(path, lambda message: SystemExit(f"--input {message}"), "corpus")
        try:
            refuse_compressed(path)
        except DocumentError as error:
            raise SystemExit(f"--input {error}") from None
        again = next((other for other in args.input[:number] if os.path.samefile(other, path)),
                     None)
        if again is not None:  # allowed (to repeat a corpus on purpose), but said
            print(f"warning: --input names {again} twice (also as {path}): its documents are "
                  f"stored twice", file=sys.stderr)
    if not os.path.exists(args.tokenizer_model):
        raise SystemExit(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if not os.path.basename(args.output_prefix):
        raise SystemExit(f"--output-prefix {args.output_prefix} names a directory; give a path "
                         f"and a name, e.g. {os.path.join(args.output_prefix, 'corpus')}, for "
                         f"corpus.bin/.idx/.json there")
    _check_outputs_spare_inputs(args)
    if not (math.isfinite(args.frame_rate) and args.frame_rate > 0):
        raise SystemExit(f"--frame-rate must be a positive number of unit frames per second "
                         f"(HuBERT's is 25), got {args.frame_rate}")
    if args.num_units < 1:
        raise SystemExit(f"--num-units is the speech codebook size (HuBERT's 500 clusters and 2 "
                         f"spare slots: 502), at least 1; got {args.num_units}")
    if args.input_format == "textgrid":
        try:  # a codebook larger than --num-units, another frame rate: before any work
            check_units_fit(args.units_dir, args.num_units, args.frame_rate)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    if args.workers < 1 or args.chunk_size < 1 or args.log_interval < 1:
        raise SystemExit("--workers, --chunk-size and --log-interval must be at least 1")


def _check_outputs_spare_inputs(args: argparse.Namespace) -> None:
    """Refuse an --output-prefix whose files would replace an input or the tokenizer (a corpus
    named `corpus.json` with prefix `corpus`), or are directories (found only at the end, after
    the whole corpus was read)."""
    inputs = [*args.input, args.tokenizer_model]
    outputs = [args.output_prefix + middle + suffix for middle in ("", ".partial")
               for suffix in (".bin", ".idx", ".json", SKIP_LIST)]
    blocked = next((output for output in outputs if os.path.isdir(output)), None)
    if blocked is not None:
        raise SystemExit(f"--output-prefix {args.output_prefix}: {blocked} is a directory, where "
                         f"the dataset writes a file; choose another prefix")
    for output in filter(os.path.exists, outputs):
        replaced = next((path for path in inputs if os.path.samefile(output, path)), None)
        if replaced is not None:
            raise SystemExit(f"--output-prefix {args.output_prefix} would overwrite "
                             f"{replaced} with {output}; choose another prefix")


def _parsing_workers(workers: int):
    """Worker processes for the block, or no pool (None) to parse in this process. Entered
    before any other thread starts; leaving it early (bad input) waits only for the chunks in hand."""
    return worker_pool(workers) if workers > 1 else contextlib.nullcontext()


def _results(chunks: Iterator[Chunk], options: ReadOptions, pool, workers: int
             ) -> Iterator[tuple[Chunk, ChunkResult]]:
    """Parsed chunks in input order, from the worker pool or in this process."""
    parse = functools.partial(parse_chunk, options)
    if pool is None:
        for chunk in chunks:
            yield chunk, parse(chunk)
        return
    # A bounded window of chunks in flight keeps memory flat on corpora of any size.
    in_flight: deque = deque()
    for chunk in chunks:
        in_flight.append((chunk, pool.submit(parse, chunk)))
        if len(in_flight) >= 4 * workers:
            done, result = in_flight.popleft()
            yield done, result.result()
    while in_flight:
        done, result = in_flight.popleft()
        yield done, result.result()


def _warn_of_units_without_textgrid(args: argparse.Namespace, utterances: list[Path]) -> None:
    """Say which unit files no TextGrid reads: their utterances are not in the dataset."""
    left_out = unit_files_without_textgrid(args.textgrid_dir, args.units_dir, utterances)
    if left_out:
        examples = ", ".join(str(path) for path in left_out[:3])
        print(f"warning: {len(left_out)} unit files under {args.units_dir} have no TextGrid under "
              f"{args.textgrid_dir}, so their utterances are left out of the dataset ({examples}"
              f"{', ...' if len(left_out) > 3 else ''}); the aligner may have failed on them "
              f"(MFA lists those in unalignable.txt): align them again to include them",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> Manifest:
    args = build_parser().parse_args(argv)
    _check_args(args)
    tokenizer = load_text_tokenizer(args.tokenizer_model)
    vocab = joint_vocab(tokenizer, args.num_units)
    options = ReadOptions(
        input_format=args.input_format, tokenizer_path=str(args.tokenizer_model),
        tokenizer_sha256=tokenizer.sha256,
        num_units=args.num_units, frame_rate=args.frame_rate, json_key=args.json_key,
        tier=args.textgrid_tier,
        textgrid_dir=str(args.textgrid_dir) if args.textgrid_dir else None,
        units_dir=str(args.units_dir) if args.units_dir else None, skip_bad=args.skip_bad)
    if args.input_format == "textgrid":
        utterances = textgrid_utterances(args.textgrid_dir, args.units_dir)
        _warn_of_units_without_textgrid(args, utterances)
        chunks = utterance_chunks(utterances, args.chunk_size)
        total, unit = len(utterances), "utt"
        sources = [str(args.textgrid_dir), str(args.units_dir)]
    else:
        chunks = line_chunks(args.input, args.chunk_size)
        total, unit = sum(os.path.getsize(p) for p in args.input), "B"
        sources = list(args.input)
    kind = "text" if args.input_format == "text-jsonl" else "aligned"

    partial = args.output_prefix + ".partial"
    counts, skips = Counts(), SkipList(partial + SKIP_LIST)
    start = time.perf_counter()
    with _sole_writer(args.output_prefix):
        # a killed run's list, which `_publish` would take for this run's
        Path(skips.path).unlink(missing_ok=True)
        writer = DocumentWriter(partial, kind)
        add = writer.add_text if kind == "text" else writer.add_aligned
        try:
            progress = Progress(total, unit, args.log_interval)
            with (_parsing_workers(args.workers) as pool, contextlib.closing(progress),
                  contextlib.closing(skips)):
                for chunk, result in _results(chunks, options, pool, args.workers):
                    for document in result.documents:
                        add(document)
                    counts.add(result.counts)
                    skips.add(result.report.skipped)
                    progress.update(chunk.size, len(result.documents))
            if writer.num_documents == 0:
                raise DocumentError(_nothing_to_write(args, skips))
            manifest = Manifest(
                kind=kind, vocab=vocab.to_dict(),
                tokenizer=TokenizerInfo(str(args.tokenizer_model), tokenizer.sha256,
                                        tokenizer.vocab_size, tokenizer.space_id),
                num_units=args.num_units,
                frame_rate=None if kind == "text" else args.frame_rate,
                counts=counts, sources=sources)
            writer.finalize(manifest)
        except BaseException:
            writer.abort()
            skips.discard()
            raise
        try:
            _publish(partial, args.output_prefix)
        except KeyboardInterrupt:
            raise Interrupted(_publish_stopped(partial, args.output_prefix)) from None
    try:
        _print_summary(args, counts, skips, time.perf_counter() - start)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {args.output_prefix}.{{bin,idx,json}} were "
                          f"written whole") from None
    return manifest


SKIP_LIST = ".skipped.tsv"
"""The suffix of the list of documents a --skip-bad run skipped, beside its dataset."""


class SkipList:
    """Every document a --skip-bad run skipped: written to `path` as the run goes (a TSV with a
    header, one row per document: where, kind, message; none when nothing was skipped), and
    tallied by kind with the first few messages of each kind for the summary."""

    EXAMPLES_PER_KIND = 3

    def __init__(self, path: str):
        self.path = path
        self.by_kind: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._stream = self._rows = None

    @property
    def total(self) -> int:
        return self.by_kind.total()

    def add(self, skipped: list[Skip]) -> None:
        if skipped and self._stream is None:
            # backslashreplace: a path's undecodable bytes must not stop the run here
            self._stream = open(self.path, "w", encoding="utf-8", newline="",
                                errors="backslashreplace")
            self._rows = csv.writer(self._stream, delimiter="\t", lineterminator="\n")
            self._rows.writerow(["where", "kind", "message"])
        for skip in skipped:
            self._rows.writerow([skip.where, skip.kind, skip.message])
            self.by_kind[skip.kind] += 1
            examples = self.examples.setdefault(skip.kind, [])
            if len(examples) < self.EXAMPLES_PER_KIND:
                examples.append(skip.message)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def discard(self) -> None:
        """Close and delete the list (the run wrote no dataset)."""
        self.close()
        Path(self.path).unlink(missing_ok=True)

    def tally(self) -> str:
        """"N kind, M kind, ...", the most frequent kind first."""
        return ", ".join(f"{number} {kind}" for kind, number in self.by_kind.most_common())


def _nothing_to_write(args: argparse.Namespace, skips: SkipList) -> str:
    """Why a run read no documents, naming the output it did not write (the writer only knows
    its .partial scratch prefix)."""
    why = "every input was empty"
    if skips.total:
        first = next(iter(skips.examples.values()))[0]
        why = (f"every input was empty or skipped as bad ({skips.total} skipped by --skip-bad: "
               f"{skips.tally()}; e.g. {first})")
    return (f"--output-prefix {args.output_prefix}: no documents to write ({why}); nothing "
            f"was written: check the inputs")


@contextlib.contextmanager
def _sole_writer(prefix: str) -> Iterator[None]:
    """Hold a lock on `PREFIX.partial.lock` while this run writes and publishes the dataset at
    `prefix`. A second run on the same --output-prefix (a job submitted twice) wrote into the same
    `PREFIX.partial.*` files, and the dataset published mixed the two runs' bytes: one run's text
    ids read under the other's index are valid ids of wrong documents. It is refused instead. The
    lock is the kernel's, so a killed run's goes with it; the file is removed when the run ends.
    On a filesystem without POSIX locks nothing is locked (a warning says so)."""
    path = prefix + ".partial.lock"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_file(path, prefix)
    try:
        yield
    finally:
        if fd is not None:
            Path(path).unlink(missing_ok=True)
            os.close(fd)  # releases the lock


def _lock_file(path: str, prefix: str) -> int | None:
    """A descriptor of `path` holding an exclusive POSIX lock on it (None: this filesystem has
    no locks). A file the run that held it removed before this one locked it is not the lock any
    more: the file now at `path` is locked instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise SystemExit(f"--output-prefix {prefix}: another tools/preprocess_data.py run "
                                 f"is writing this dataset (it holds the lock {path}); wait for "
                                 f"it to end, or give this run another --output-prefix") from None
            print(f"warning: cannot lock {path} ({error.strerror}): nothing stops another run "
                  f"from writing --output-prefix {prefix} at the same time", file=sys.stderr)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C after the output began to move into place: says what it left."""


def _publish_stopped(partial: str, prefix: str) -> str:
    """What a Ctrl-C during `_publish` left: the files already renamed, and that the dataset is
    incomplete until a re-run. Read from the disk: a rename may have finished just before it."""
    suffixes = (".bin", ".idx", ".json")
    moved = [suffix for suffix in suffixes if not os.path.exists(partial + suffix)]
    if len(moved) == len(suffixes):
        return f"interrupted after {prefix}.{{bin,idx,json}} were written whole"
    published = ", ".join(prefix + suffix for suffix in moved) or "none of its files"
    left = ", ".join(partial + suffix for suffix in suffixes if suffix not in moved)
    return (f"interrupted while moving the output into place: published {published}; "
            f"{left} not yet. The dataset at {prefix} is incomplete (it has no manifest, which "
            f"readers refuse): run the same command again")


def _publish(partial: str, prefix: str) -> None:
    """Rename the finished `partial.*` files to `prefix.*`. A dataset is whole only with its
    manifest, so an older manifest at `prefix` goes first and the new one comes last: a run
    stopped between the renames leaves no manifest (an error that says to re-run) rather than
    new data under an old manifest. The list of skipped documents moves before the data; an
    older one, of the dataset replaced, is removed when this run skipped none."""
    Path(prefix + ".json").unlink(missing_ok=True)
    if os.path.exists(partial + SKIP_LIST):
        os.replace(partial + SKIP_LIST, prefix + SKIP_LIST)
    else:
        Path(prefix + SKIP_LIST).unlink(missing_ok=True)
    for suffix in (".bin", ".idx", ".json"):
        os.replace(partial + suffix, prefix + suffix)


def _print_summary(args, counts: Counts, skips: SkipList, seconds: float) -> None:
    print(f"wrote {args.output_prefix}.{{bin,idx,json}} in {seconds:.2f}s with "
          f"{args.workers} worker(s)")
    print(f"  documents {counts.documents}  segments {counts.segments}  words {counts.words}  "
          f"silences {counts.silences}  text pieces {counts.text_pieces}  units {counts.units}")
    if counts.units:
        print(f"  {counts.units / seconds:,.0f} units/s")
    if counts.empty_silences_dropped:
        print(f"  dropped {counts.empty_silences_dropped} silences with no units")
    if counts.unknown_words:
        print(f"warning: {counts.unknown_words} word intervals are labelled <unk> or spn, the "
              f"aligner's out-of-vocabulary word: their speech is kept without text (as a "
              f"silence's), since the word is unknown; to train their text, add the words to the "
              f"aligner's dictionary (MFA: mfa find_oovs / mfa g2p) and align again",
              file=sys.stderr)
    if skips.total:
        print(f"  skipped {skips.total} bad documents (--skip-bad; counted in the manifest, "
              f"each listed in {args.output_prefix}{SKIP_LIST}), by kind:")
        for kind, number in skips.by_kind.most_common():
            print(f"    {number} {kind}, e.g.:")
            for example in skips.examples[kind]:
                print(f"      {example}")


if __name__ == "__main__":
    try:
        main()
    except (DocumentError, VocabularyError, OSError) as error:
        sys.exit(f"error: {error}")
    except Interrupted as stop:  # the output had begun to move into place
        print(stop, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # main() has removed its partial files
        print("interrupted: nothing written (the partial output was removed)", file=sys.stderr)
        sys.exit(130)
