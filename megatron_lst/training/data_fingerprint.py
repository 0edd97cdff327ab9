"""What a checkpoint records of its training datasets, so that a resume on other data is refused.

A checkpoint's position (`consumed_samples`) is a row of the training order built from the
datasets' documents. When a dataset is rewritten under the same prefix (preprocessed again, other
documents), the same flags build other rows and a resume would go on at that row of other data.
So every checkpoint records, for each training dataset (`--data-path`, `--train-data-path`), a
fingerprint that is cheap to take and follows the contents only, never the file times (a
node-local copy of the same data has the same fingerprint):

    kind, documents, text_pieces, units    from the manifest `<prefix>.json`
    tokenizer_sha256                       the text tokenizer the manifest records
    idx_bytes, bin_bytes                   the sizes of `<prefix>.idx` and `<prefix>.bin`
    idx_sha256                             SHA-256 of `<prefix>.idx` (document and sequence
                                           lengths; read whole on open anyway)
    bin_sample_sha256                      SHA-256 of `_BIN_SAMPLES` blocks of `_BIN_BLOCK`
                                           bytes at evenly spaced offsets of `<prefix>.bin`
                                           (ids changed at the same lengths, e.g. other speech
                                           units), not of the whole file

A resume compares them dataset by dataset (by position when the run names as many training
datasets as the checkpoint, since moved data keeps its fingerprint; else by prefix) and refuses a
difference, naming the dataset and the fields. Checkpoints saved before fingerprints were
recorded resume with a note that their data is not checked.

Every rank fingerprints the copy it reads (a node's own disk may hold another copy), but the
whole-file read, the `.idx` digest, is taken once per file: each rank takes the cheap fields and
a sampled digest of its `.idx` (as of the `.bin`), the ranks share them (one `all_gather_object`),
and of the ranks whose prefix and cheap fields agree, one digests the `.idx` for all of them
(the files spread over the ranks) and shares it. On a shared filesystem a run of N ranks thus
reads each `.idx` once instead of N times; a node-local copy that differs anywhere it is sampled
or measured is digested on its own. A rank that cannot read its copy stops every rank with
DatasetError naming it (no rank is left waiting in the next collective).

Validation and test datasets (`--valid-data-path`, the other `--split` parts) are not
fingerprinted: a checkpoint's position is a row of the training order only, which they do not
build, so other validation data changes the validation losses of the resumed run, not the data
it trains on (as `resume_check` lets the data paths change with a note).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.checkpoint.integrity import digest_file
from megatron_lst.data.dataset import DatasetError
from megatron_lst.data.documents import DocumentError
from megatron_lst.data.manifest import Manifest
from megatron_lst.parallel import has_other_ranks
from megatron_lst.rank_failures import share_or_stop
from megatron_lst.training.resume_check import ResumeConfigError, ResumePosition

# The key of the fingerprints in a checkpoint's extra state.
FINGERPRINT_KEY = "datasets"
_BIN_SAMPLES = 16
_BIN_BLOCK = 64 * 1024
# The fields of a fingerprint and how a refusal names them.
_FIELD_NAMES = {
    "kind": "kind", "documents": "documents", "text_pieces": "text pieces", "units": "units",
    "tokenizer_sha256": "tokenizer sha256", "idx_bytes": ".idx bytes", "bin_bytes": ".bin bytes",
    "idx_sha256": ".idx sha256", "bin_sample_sha256": "sampled .bin sha256",
}
T = TypeVar("T")


def dataset_fingerprint(prefix: str) -> dict[str, Any]:
    """The fingerprint of the dataset at `prefix` (see the module docstring), with its prefix."""
    return _with_idx_digest(_cheap_fingerprint(prefix), digest_file(Path(f"{prefix}.idx")).sha256)


def training_data_fingerprints(sources: Sequence[tuple[float | None, str]]
                               ) -> list[dict[str, Any]]:
    """Fingerprints of the weighted training datasets `sources` (`split_sources(args)["train"]`),
    each once, in their order, as this rank's copies of them hold. Collective when
    torch.distributed is initialized with several ranks: each `.idx` is digested by one rank
    of those whose copies agree (module docstring); raises DatasetError on every rank when a
    rank cannot read its copy."""
    prefixes = list(dict.fromkeys(p for _, p in sources))
    if not has_other_ranks():
        return [dataset_fingerprint(prefix) for prefix in prefixes]
    cheap, failure = _attempt(lambda: [(_cheap_fingerprint(prefix), _sampled_sha256(f"{prefix}.idx"))
                                       for prefix in prefixes])
    # Only the keys (64 hex digits a dataset) go round: a blend of many datasets on thousands of
    # ranks would otherwise gather every rank's fields on every rank.
    fields_by_key = {_group_key(fields, sample): fields for fields, sample in cheap or []}
    groups = idx_digest_groups(_share(list(fields_by_key), failure, "measure"))
    rank = dist.get_rank()
    digests, failure = _attempt(lambda: {
        group.key: digest_file(Path(f"{fields_by_key[group.key]['prefix']}.idx")).sha256
        for group in groups if group.digesting_rank == rank})
    shared = {key: digest for part in _share(digests, failure, "digest the .idx of")
              for key, digest in part.items()}
    return [_with_idx_digest(fields, shared[key]) for key, fields in fields_by_key.items()]


@dataclass(frozen=True)
class IdxDigestGroup:
    """The ranks whose copies of a dataset agree in every cheap field and the sampled `.idx`
    digest (`key`, see `_group_key`): `digesting_rank`, one of `ranks`, digests the `.idx` for
    all of them."""

    key: str
    ranks: tuple[int, ...]
    digesting_rank: int


def idx_digest_groups(keys_by_rank: Sequence[Sequence[str]]) -> list[IdxDigestGroup]:
    """The groups of the ranks' dataset keys (`keys_by_rank[rank][dataset]`), in the order of
    their first rank and dataset, the n-th group digested by the n-th of its ranks (modulo their
    number), so that the files of a shared filesystem spread over the ranks."""
    members: dict[str, list[int]] = {}
    for rank, keys in enumerate(keys_by_rank):
        for key in keys:
            members.setdefault(key, []).append(rank)
    return [IdxDigestGroup(key, tuple(ranks), ranks[number % len(ranks)])
            for number, (key, ranks) in enumerate(members.items())]


def _cheap_fingerprint(prefix: str) -> dict[str, Any]:
    """Every field of the fingerprint but `idx_sha256` (None): what a rank reads of its copy
    without reading a whole file."""
    manifest = Manifest.load(prefix)
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"  # megatron.core's names
    return {
        "prefix": prefix,
        "kind": manifest.kind,
        "documents": manifest.counts.documents,
        "text_pieces": manifest.counts.text_pieces,
        "units": manifest.counts.units,
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "idx_bytes": os.path.getsize(idx),
        "bin_bytes": os.path.getsize(bin_),
        "idx_sha256": None,
        "bin_sample_sha256": _sampled_sha256(bin_),
    }


def _with_idx_digest(fields: dict[str, Any], idx_sha256: str) -> dict[str, Any]:
    return {**fields, "idx_sha256": idx_sha256}


def _group_key(fields: Mapping[str, Any], idx_sample_sha256: str) -> str:
    """SHA-256 of a copy's cheap fields (its prefix among them) and sampled `.idx` digest."""
    return hashlib.sha256(json.dumps([fields, idx_sample_sha256], sort_keys=True).encode()
                          ).hexdigest()


def _attempt(work: Callable[[], T]) -> tuple[T | None, str | None]:
    """`(work(), None)`, or `(None, why)` when it cannot read this rank's copy of the data."""
    try:
        return work(), None
    except (OSError, DocumentError) as error:
        return None, str(error)


def _share(part: T, failure: str | None, what: str) -> list[T]:
    """Collective: every rank's `part`, on every rank; DatasetError on every rank, naming each
    rank's `failure`, when any rank failed to `what` its datasets."""
    return share_or_stop(part, failure, lambda failed: DatasetError(
        f"cannot {what} the training datasets to fingerprint them for the checkpoint "
        f"({'; '.join(f'rank {rank}: {message}' for rank, message in failed)}). Check that "
        f"every node reads a complete copy of each dataset (.json, .idx, .bin as "
        f"tools/preprocess_data.py writes them)"))


def check_same_training_data(saved: Sequence[Mapping[str, Any]] | None,
                             current: Sequence[Mapping[str, Any]], position: ResumePosition,
                             checkpoint: str) -> list[str]:
    """Notes on the comparison of the checkpoint's training-data fingerprints `saved` (None:
    not recorded) with `current`; raises ResumeConfigError naming each dataset that changed."""
    if saved is None:
        return [f"checkpoint {checkpoint} records no fingerprint of its training data (saved by "
                f"an older version): the data is not checked against it"]
    if not isinstance(saved, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("prefix"), str) for entry in saved):
        raise CheckpointError(
            f"checkpoint {checkpoint}: the training-data fingerprints (extra_state "
            f"'{FINGERPRINT_KEY}' of its lst_checkpoint.json) are damaged, not a list of objects "
            f"with a 'prefix'. Restore the file from a copy, or load another checkpoint")
    if len(saved) == len(current):
        pairs = list(zip(saved, current, strict=True))
    else:  # other datasets: --data-path's note says so; compare those named by both
        by_prefix = {entry["prefix"]: entry for entry in current}
        pairs = [(old, by_prefix[old["prefix"]]) for old in saved if old["prefix"] in by_prefix]
    changed = []
    for old, new in pairs:
        fields = [f"{label} {_short(old[name])} -> {_short(new.get(name))}"
                  for name, label in _FIELD_NAMES.items()
                  if name in old and old[name] != new.get(name)]
        if fields:
            where = (new["prefix"] if new["prefix"] == old["prefix"]
                     else f"{new['prefix']} (trained as {old['prefix']})")
            changed.append(f"dataset {where}: {', '.join(fields)}")
    if changed:
        raise ResumeConfigError(
            f"checkpoint {checkpoint} stands at sample {position.consumed_samples} of the "
            f"training rows built from its datasets, and they changed since it was saved: "
            f"{'; '.join(changed)}. The data was preprocessed again or holds other documents, "
            f"so the run would continue at that sample of other rows (data repeated or "
            f"skipped). Restore the data the checkpoint was trained on, or train on the new data "
            f"from its weights with --finetune (a new schedule), or start a new run")
    return []


def _sampled_sha256(path: str) -> str:
    """SHA-256 of `_BIN_SAMPLES` blocks of `path` at evenly spaced offsets, first and last
    included (the whole file when it is smaller than those blocks)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= _BIN_SAMPLES * _BIN_BLOCK:
            digest.update(file.read())
            return digest.hexdigest()
        last = size - _BIN_BLOCK
        for i in range(_BIN_SAMPLES):
            file.seek(last * i // (_BIN_SAMPLES - 1))
            digest.update(file.read(_BIN_BLOCK))
    return digest.hexdigest()


def _short(value: Any) -> str:
    """Digests shortened to 12 hex digits in messages."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)
