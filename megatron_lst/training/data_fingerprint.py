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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.checkpoint.integrity import digest_file
from megatron_lst.data.manifest import Manifest
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


def dataset_fingerprint(prefix: str) -> dict[str, Any]:
    """The fingerprint of the dataset at `prefix` (see the module docstring), with its prefix."""
    manifest = Manifest.load(prefix)
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"  # megatron.core's names
    idx_record = digest_file(Path(idx))
    return {
        "prefix": prefix,
        "kind": manifest.kind,
        "documents": manifest.counts.documents,
        "text_pieces": manifest.counts.text_pieces,
        "units": manifest.counts.units,
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "idx_bytes": idx_record.size,
        "bin_bytes": os.path.getsize(bin_),
        "idx_sha256": idx_record.sha256,
        "bin_sample_sha256": _sampled_sha256(bin_),
    }


def training_data_fingerprints(sources: Sequence[tuple[float | None, str]]
                               ) -> list[dict[str, Any]]:
    """Fingerprints of the weighted training datasets `sources` (`split_sources(args)["train"]`),
    each once, in their order."""
    return [dataset_fingerprint(prefix) for prefix in dict.fromkeys(p for _, p in sources)]


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
