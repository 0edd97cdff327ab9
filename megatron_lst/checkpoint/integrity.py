"""File manifest of a dist checkpoint, and the checks every loader runs before reading one.

At save time, once every rank has written its files, the files of the checkpoint directory are
hashed (SHA-256; the ranks share the work) and rank 0 writes `lst_manifest.json` (JSON, no
pickle) before the checkpoint is marked complete:

    {"format_version": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"size": 592203, "sha256": "9f2c..."}, ".metadata": {...}, ...}}

`verify_checkpoint` (what `load_checkpoint`, the conversion tools and `lst-convert verify` call
before anything of a checkpoint is unpickled) checks, naming every file at fault:

    manifest    every listed file exists with its recorded size and digest (the ranks share the
                hashing), is no symbolic link, and no other file is there; a checkpoint written
                before manifests existed is checked without it, bar the links: none of its
                files may be a symbolic link
    index       `.metadata` reads under the restricted unpickler (`safe_pickle`), and every
                `.distcp` file it points into is long enough (a truncated file is named)
    objects     byte items and common.pt load under torch's `weights_only` unpickler
    config      megatron's `metadata.json` is a JSON object, and the common state file it
                names (common.pt) is there

The digests catch damage (a truncated or altered file), not a forger: whoever crafts a
checkpoint can write a matching manifest. Safety against crafted files comes from the restricted
reading, which holds with or without a manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_lst.data.input_files import kind_of_irregular, streamed_sha256
from megatron_lst.parallel import has_other_ranks
from megatron_lst.rank_failures import one_line, outcome, share_or_stop, step_failed

from . import safe_pickle
from .durable_files import write_file_durably
from .errors import CheckpointError, CheckpointIntegrityError
from .record_files import read_record_file

logger = logging.getLogger(__name__)

MANIFEST_FILENAME = "lst_manifest.json"
MANIFEST_FORMAT_VERSION = 1
MEGATRON_CONFIG_FILENAME = "metadata.json"
# Written after the manifest (lst_checkpoint.json) or describing the directory as a whole: not
# listed in it.
UNLISTED_FILENAMES = frozenset({MANIFEST_FILENAME, "lst_checkpoint.json"})
T = TypeVar("T")


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


def digest_file(path: Path) -> FileRecord:
    """Size and SHA-256 of one file, read in blocks (`streamed_sha256`)."""
    return FileRecord(*streamed_sha256(path))


def _listed_files(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.is_file() and entry.name not in UNLISTED_FILENAMES)


def _my_share(names: list[str]) -> list[str]:
    """The names this rank hashes: every world_size-th one, or all of them in one process."""
    if not has_other_ranks():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


class CheckpointUnreadableError(CheckpointIntegrityError):
    """A check of a checkpoint could not read it (EIO, a permission, a file that changed during
    the check): unlike damage the check found, the fault may be the storage's and pass."""


def _on_every_rank(checkpoint: Path, find: Callable[[], T], what: str) -> list[T]:
    """Collective when torch.distributed is initialized: every rank's `find()` (its part of a
    check of `checkpoint`), in rank order, on every rank. When `find` raises on any rank (a
    file it cannot read: EIO, a permission), every rank raises CheckpointUnreadableError naming
    each such rank and its error: a rank that stopped alone left the others waiting for it."""
    def error(failed: list[tuple[int, str]]) -> CheckpointUnreadableError:
        ranks = "; ".join(f"rank {rank} could not {what} ({message})" for rank, message in failed)
        return CheckpointUnreadableError(
            f"checkpoint {checkpoint} could not be checked and is not loaded: {ranks}")

    if has_other_ranks():
        return share_or_stop(*outcome(find), error)
    part, failure = outcome(find)
    if failure is not None:
        raise error([(0, failure)])
    return [part]


def _union_of_shares(checkpoint: Path, find: Callable[[], dict[str, Any]],
                     what: str) -> dict[str, Any]:
    """`_on_every_rank`, the ranks' parts (each a share of the check's results) merged."""
    return {key: value for part in _on_every_rank(checkpoint, find, what)
            for key, value in part.items()}


def record_checkpoint_files(directory: str | os.PathLike) -> dict[str, FileRecord]:
    """Collective when torch.distributed is initialized: size and digest of every file in
    `directory` (bar the manifest and lst_checkpoint.json), rank 0 listing them (one listing,
    however the filesystem caches directory entries on other nodes) and the ranks hashing a
    share each. When a rank fails to (a file it cannot read), every rank raises
    `rank_failures.RankStepError` naming that rank and its error: a rank that stopped alone
    left the others waiting for it in the next collective."""
    directory = Path(directory)
    if not has_other_ranks():
        return {name: digest_file(directory / name) for name in _listed_files(directory)}
    failure = step_failed(f"record the files of {directory.name}")
    listing = share_or_stop(*outcome(
        lambda: _listed_files(directory) if dist.get_rank() == 0 else None), failure)
    shares = share_or_stop(*outcome(
        lambda: {name: digest_file(directory / name) for name in _my_share(listing[0])}), failure)
    return {name: record for share in shares for name, record in share.items()}


def write_manifest(directory: str | os.PathLike, records: dict[str, FileRecord]) -> None:
    """Write `lst_manifest.json` durably (one process: rank 0)."""
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "algorithm": "sha256",
                "files": {name: {"size": r.size, "sha256": r.sha256}
                          for name, r in sorted(records.items())}}
    write_file_durably(Path(directory) / MANIFEST_FILENAME, json.dumps(manifest, indent=1))


def read_manifest(directory: str | os.PathLike) -> dict[str, FileRecord] | None:
    """The records of `directory`'s manifest, or None when it has none (written before
    manifests existed, or by another tool). CheckpointIntegrityError naming it when it is not a
    regular file of at most `MAX_RECORD_FILE_BYTES` (`record_files.read_record_file`), cannot be
    read (its storage's fault: EIO, a permission), or is damaged."""
    path = Path(directory) / MANIFEST_FILENAME
    if not path.exists():
        return None
    data = read_record_file(path, CheckpointIntegrityError, "checkpoint file manifest")
    try:
        manifest = json.loads(data.decode("utf-8"))
        version = manifest.get("format_version")  # true and 1.0 equal 1, yet no save writes them
        if type(version) is not int or version != MANIFEST_FORMAT_VERSION or \
                manifest.get("algorithm") != "sha256":
            raise ValueError(f"format {version!r}, algorithm "
                             f"{manifest.get('algorithm')!r}; this code reads format "
                             f"{MANIFEST_FORMAT_VERSION}, sha256")
        return {name: _file_record(name, record) for name, record in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        # RecursionError: JSON nested deeper than the parser recurses (a crafted file)
        raise CheckpointIntegrityError(f"cannot read {path}: {err}; the manifest is damaged: "
                                       f"load another checkpoint of the run, or restore this "
                                       f"one from a copy") from None


def _file_record(name: str, record: Any) -> FileRecord:
    """The FileRecord of the manifest's entry `record` for the file `name`, as `write_manifest`
    writes it: a size that is a non-negative integer (not 5.7, "5", true, or Infinity, whose
    `int()` was an OverflowError) and a SHA-256 of 64 hex digits. ValueError otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"the entry of {name!r} is a {type(record).__name__}, not an object")
    size, sha256 = record.get("size"), record.get("sha256")
    if type(size) is not int or size < 0:
        raise ValueError(f"the size of {name!r} is {size!r}, not a number of bytes")
    if not (isinstance(sha256, str) and len(sha256) == 64
            and all(c in "0123456789abcdef" for c in sha256)):
        raise ValueError(f"the sha256 of {name!r} is {sha256!r}, not 64 hex digits")
    return FileRecord(size, sha256)


@dataclass(frozen=True)
class VerificationReport:
    """What `inspect_checkpoint` found; `problems` is empty for a sound checkpoint."""

    checkpoint: Path
    files_checked: int
    bytes_checked: int
    has_manifest: bool
    problems: tuple[str, ...]


def inspect_checkpoint(checkpoint: str | os.PathLike) -> VerificationReport:
    """Collective when torch.distributed is initialized: run every check of the module
    docstring on `checkpoint` (an iter_XXXXXXX directory) and report what they find. Raises
    CheckpointIntegrityError, on every rank, for a manifest or a file that a rank cannot read
    (naming the rank, the file and the error). Nothing of the checkpoint is unpickled
    unrestricted."""
    directory = Path(checkpoint)
    problems: list[str] = []
    # rank 0's, on every rank: the ranks split the files it lists between them
    manifest = _on_every_rank(directory, lambda: read_manifest(directory), "read its manifest")[0]
    files_checked = bytes_checked = 0
    if manifest is not None:
        outside = _names_outside(directory, manifest)
        if outside:  # hashing them would read files beyond the checkpoint
            return VerificationReport(directory, 0, 0, True, (outside,))
        found = _union_of_shares(directory, lambda: _share_of_file_problems(directory, manifest),
                                 "read its files")
        problems += [found[name] for name in sorted(found) if found[name] is not None]
        files_checked = len(manifest)
        bytes_checked = sum(r.size for r in manifest.values())
    problems += _found_by_rank0(directory, lambda: _listing_problems(directory, manifest),
                                "list its files")
    if problems:  # a damaged index is named above; reading it would only add noise
        return VerificationReport(directory, files_checked, bytes_checked,
                                  manifest is not None, tuple(problems))
    (index_problems, object_keys), state_problems = _found_by_rank0(
        directory, lambda: (_index_problems(directory), _state_problems(directory)),
        "read its index, common state and config")
    problems += index_problems
    if not problems:  # each rank reads the index it shares rank 0's byte items of
        found = _union_of_shares(
            directory, lambda: _share_of_byte_item_problems(directory, object_keys),
            "read its objects")
        problems += [found[key] for key in sorted(found)]
    problems += state_problems
    return VerificationReport(directory, files_checked, bytes_checked, manifest is not None,
                              tuple(problems))


def _found_by_rank0(checkpoint: Path, find: Callable[[], T], what: str) -> T:
    """Collective when torch.distributed is initialized: rank 0's `find()` (a check of one fact
    of `checkpoint` that every rank would find alike, such as its listing), on every rank, so
    that a rank with another view of the directory (a stale cache of a network filesystem)
    takes the same path as the others; raises as `_on_every_rank` does when rank 0's `find`
    raises."""
    is_rank0 = not has_other_ranks() or dist.get_rank() == 0
    return _on_every_rank(checkpoint, find if is_rank0 else lambda: None, what)[0]


def _listing_problems(directory: Path, manifest: dict[str, FileRecord] | None) -> list[str]:
    """Problems the directory listing shows: files the manifest does not list or, without a
    manifest to list them, symbolic links (refused, as the manifest would)."""
    if manifest is not None:
        unrecorded = sorted(set(_listed_files(directory)) - manifest.keys())
        return [f"{directory} holds files its {MANIFEST_FILENAME} does not list, added or "
                f"renamed after the save: {unrecorded}"] if unrecorded else []
    if not directory.is_dir():
        return []
    return [_symlink_problem(entry) for entry in sorted(directory.iterdir())
            if entry.is_symlink()]


def _index_problems(directory: Path) -> tuple[list[str], list[str]]:
    """Problems with the checkpoint index `.metadata` and the `.distcp` files it points into,
    and the keys of the byte items it lists (`safe_pickle.byte_items`; none when it is
    damaged)."""
    try:
        metadata = safe_pickle.read_dcp_metadata(directory)
    except CheckpointError as err:  # damaged, or refused by the restricted unpickler
        return [str(err)], []
    return safe_pickle.check_file_bounds(directory, metadata), safe_pickle.byte_items(metadata)


def _state_problems(directory: Path) -> list[str]:
    """Problems with megatron's common state (common.pt) and its `metadata.json`."""
    return safe_pickle.check_common_state(directory) + _megatron_config_problems(directory)


def _share_of_byte_item_problems(directory: Path, keys: list[str]) -> dict[str, str]:
    """Problems by key of this rank's share of the byte items `keys` (rank 0's), read through
    the index this rank reads (call once rank 0 found the index sound). Raises when this rank
    cannot read the index, or reads one listing other byte items (a stale view of the file)."""
    metadata = safe_pickle.read_dcp_metadata(directory)
    if safe_pickle.byte_items(metadata) != keys:
        raise CheckpointIntegrityError(
            f"{directory / safe_pickle.DCP_METADATA_FILENAME} lists other objects here than "
            f"rank 0 read in it (the file changed during the check, or this node sees a stale "
            f"copy of it): check again once every node sees the same file")
    return safe_pickle.check_byte_items(directory, metadata, _my_share(keys))


def _names_outside(directory: Path, manifest: dict[str, FileRecord]) -> str | None:
    """The problem of a manifest listing names that are not plain file names of `directory`
    (a path such as '../x' or '/etc/x', or '.', '..'), or None. A save lists only the files
    directly in the checkpoint directory, so such a name is crafted or damaged."""
    bad = sorted(name for name in manifest
                 if name in ("", ".", "..") or "/" in name or "\\" in name
                 or os.path.isabs(name))
    if not bad:
        return None
    return (f"{directory / MANIFEST_FILENAME} lists names outside the checkpoint directory "
            f"{bad}; a save lists only plain file names in it, so the manifest is crafted or "
            f"damaged and nothing it names was read")


def _megatron_config_problems(directory: Path) -> list[str]:
    """Problems with megatron's `metadata.json`, which names the checkpoint's backends, and
    with the common state file its "torch" common backend reads (checked against the manifest
    too, when there is one)."""
    path = directory / MEGATRON_CONFIG_FILENAME
    try:
        config = json.loads(read_record_file(path, CheckpointIntegrityError,
                                             "megatron checkpoint config").decode("utf-8"))
    except CheckpointIntegrityError as err:  # missing, not a regular file, or too large
        return [str(err)]
    # ValueError: not UTF-8, not JSON, or an integer past Python's digit limit (which was taken
    # for a file the checkpoint's storage could not read)
    except (ValueError, RecursionError) as err:
        return [f"{path} is missing or damaged: {err}"]
    if not isinstance(config, dict):
        return [f"{path} holds a JSON {type(config).__name__}, not megatron's checkpoint config"]
    common = directory / safe_pickle.COMMON_STATE_FILENAME
    if config.get("common_backend") == "torch" and not common.is_file():
        return [f"{common} is missing; megatron stores the checkpoint's common state there "
                f"({path.name} names the 'torch' common backend)"]
    return []


def _symlink_problem(path: Path) -> str:
    # reading a link would read whatever it points at, in or out of the checkpoint
    return (f"{path} is a symbolic link (to {os.readlink(path)}); a save writes only plain "
            f"files, so it was not read")


def _share_of_file_problems(directory: Path,
                            manifest: dict[str, FileRecord]) -> dict[str, str | None]:
    """`_file_problem` of each file of this rank's share; raises naming the file it cannot read
    (whatever the error: the other ranks wait for this one's outcome)."""
    problems = {}
    for name in _my_share(sorted(manifest)):
        try:
            problems[name] = _file_problem(directory / name, manifest[name])
        except Exception as error:
            raise CheckpointIntegrityError(
                f"cannot read {directory / name} ({one_line(error)})") from error
    return problems


def _file_problem(path: Path, expected: FileRecord) -> str | None:
    if path.is_symlink():
        return _symlink_problem(path)
    if not path.exists():
        return f"{path} is missing (listed in {MANIFEST_FILENAME})"
    if not path.is_file():  # a FIFO would block the digest, a folder has none
        return (f"{path} is not a regular file ({kind_of_irregular(path.stat().st_mode)}), where a save wrote one "
                f"(listed in {MANIFEST_FILENAME}); restore the checkpoint from a copy")
    size = path.stat().st_size
    if size != expected.size:
        what = "truncated" if size < expected.size else "longer than saved"
        return f"{path} is {what}: {size} bytes, {expected.size} when saved"
    if digest_file(path).sha256 != expected.sha256:
        return f"{path} has changed since it was saved (SHA-256 differs from {MANIFEST_FILENAME})"
    return None


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Collective when torch.distributed is initialized: `inspect_checkpoint`, raising
    CheckpointIntegrityError, naming every file at fault, when it finds a damaged file or one
    refused as unsafe to unpickle."""
    report = inspect_checkpoint(checkpoint)
    if not report.has_manifest:
        logger.warning("%s has no %s (saved before file digests were recorded, or by another "
                       "tool): its files are checked for truncation and unsafe content only",
                       report.checkpoint, MANIFEST_FILENAME)
    if report.problems:
        listed = "\n  ".join(report.problems)
        raise CheckpointIntegrityError(
            f"checkpoint {report.checkpoint} failed verification and is not loaded:\n  {listed}")
