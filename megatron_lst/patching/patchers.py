"""Patch lengths of one interleaved document, for each fixed patching rule (docs/data.md#patching-modes).

Pure, vectorised functions of an `InterleavedDocument`: no randomness, no Python loop over tokens.
Each returns `[num_patches] int32` lengths that sum to the document's length. In every rule a text
token (BOS, EOS, `<t>`, a text piece) is a patch of its own and no patch mixes modalities. At an
EOS: it is a patch of its own and ends the document, so the patches of a row packing several
documents (cut per whole document) never span two of them.

- `token_patch_lengths`: every token its own patch (the baseline without local models).
- `static_patch_lengths`: the speech-mode marker and the units are patchable; each maximal run of
  patchable tokens is cut into patches of `p`, remainder last, so `<s>` sits inside the first
  speech patch (the reference's `lst_static`).
- `aligned_patch_lengths`: `<s>` is its own patch; the units of each speech run are cut at the
  boundaries of the words and silences they were aligned to (the reference's `lst_align`).
  `silence="separate"` keeps every silence its own patch (the reference). `silence="merged"` joins
  a silence to the next word of the same speech run; silences after a run's last word join that
  word; a run with no word at all (only silences) is one patch.
"""

from __future__ import annotations

import numpy as np

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH

SILENCE_MODES = ("separate", "merged")


class PatchingError(ValueError):
    """A document's structure does not allow the requested patching."""


def _lengths_from_starts(is_start: np.ndarray) -> np.ndarray:
    """[n] bool patch starts (the first must be set) -> [P] int32 lengths."""
    starts = np.flatnonzero(is_start)
    return np.diff(np.append(starts, len(is_start))).astype(np.int32)


def token_patch_lengths(doc: InterleavedDocument) -> np.ndarray:
    return np.ones(len(doc), dtype=np.int32)


def static_patch_lengths(doc: InterleavedDocument, patch_size: int) -> np.ndarray:
    if patch_size < 1:
        raise PatchingError(f"static patch size must be >= 1, got {patch_size}")
    patchable = doc.modality == MODALITY_SPEECH  # [n] <s> and units
    index = np.arange(len(doc))
    run_start = patchable & ~np.concatenate([[False], patchable[:-1]])
    # Offset of each token inside its patchable run (meaningless outside runs).
    offset = index - np.maximum.accumulate(np.where(run_start, index, 0))
    return _lengths_from_starts(~patchable | (offset % patch_size == 0))


def aligned_patch_lengths(doc: InterleavedDocument, silence: str = "separate") -> np.ndarray:
    if silence not in SILENCE_MODES:
        raise PatchingError(f"silence must be one of {SILENCE_MODES}, got {silence!r}")
    unit_pos = np.flatnonzero(doc.unit_mask)  # [U]
    lengths = doc.unit_group_lengths.astype(np.int64)  # [G]
    if int(lengths.sum()) != len(unit_pos) or (lengths <= 0).any():
        raise PatchingError(f"the document's word groups cover {int(lengths.sum())} units but it "
                            f"has {len(unit_pos)} (groups must be positive); the document was not "
                            f"made by the interleaver or was cut without its groups")
    first_unit = np.cumsum(lengths) - lengths  # [G] index into unit_pos
    last_unit = first_unit + lengths - 1
    # Speech runs: maximal stretches of consecutive unit positions.
    run_of_unit = np.cumsum(np.diff(unit_pos, prepend=-2) != 1) - 1  # [U]
    group_run = run_of_unit[first_unit]  # [G]
    if (run_of_unit[last_unit] != group_run).any():
        raise PatchingError("a word group spans two speech runs; its units are not contiguous")

    starts_patch = np.ones(len(lengths), dtype=bool)  # [G]
    if silence == "merged" and len(lengths):
        is_silence = doc.unit_group_is_silence
        group = np.arange(len(lengths))
        last_word = np.full(group_run.max() + 1, -1)
        np.maximum.at(last_word, group_run[~is_silence], group[~is_silence])
        word_follows = last_word[group_run] > group  # [G] a word comes later in this run
        first_in_run = np.concatenate([[True], group_run[1:] != group_run[:-1]])
        previous_merges_forward = np.concatenate([[False], (is_silence & word_follows)[:-1]])
        trailing_silence = is_silence & ~word_follows
        starts_patch = first_in_run | ~(previous_merges_forward | trailing_silence)

    is_start = ~doc.unit_mask
    is_start[unit_pos[first_unit[starts_patch]]] = True
    return _lengths_from_starts(is_start)
