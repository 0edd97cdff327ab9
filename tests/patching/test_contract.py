"""`check_batch` accepts the dataset's rows and names each broken invariant."""

import numpy as np
import pytest
import torch
from patching_cases import VOCAB, random_interleaved

from megatron_lst.data.dataset import pad_row
from megatron_lst.patching.contract import (
    BatchContractError,
    check_batch,
    decoder_patch_ids,
    patch_ids,
)
from megatron_lst.patching.patchers import aligned_patch_lengths, static_patch_lengths

N, P = 48, 30


def valid_batch():
    """Three random rows (static p=4, aligned, static p=3), each cut at whole patches."""
    rows = []
    for seed, patch in ((1, lambda d: static_patch_lengths(d, 4)), (2, aligned_patch_lengths),
                        (3, lambda d: static_patch_lengths(d, 3))):
        rng = np.random.default_rng(seed)
        doc = random_interleaved(rng)
        while len(doc) < N + 1:
            doc = random_interleaved(rng)
        lengths = patch(doc)
        # The whole patches that fit N + 1 tokens and P positions.
        keep = min(P, int(np.searchsorted(np.cumsum(lengths), N + 1, side="right")))
        n = int(lengths[:keep].sum())
        rows.append(pad_row(doc.tokens[:n].astype(np.int64), doc.modality[:n].astype(np.int64),
                            lengths[:keep], N, P))
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_valid_batch_passes():
    batch = valid_batch()
    assert batch["patch_lengths"].shape == (3, P) and batch["tokens"].shape == (3, N)
    check_batch(batch, VOCAB)
    check_batch(batch)


def test_patch_ids_follow_the_reference_rule():
    lengths = torch.tensor([[1, 3, 0, 2, 0]], dtype=torch.int32)  # N + 1 = 6
    assert patch_ids(lengths, 5).tolist() == [[0, 1, 1, 1, 3]]
    assert decoder_patch_ids(lengths, 5).tolist() == [[0, 0, 0, 2, 2]]


def broken(mutate):
    batch = valid_batch()
    mutate(batch)
    return batch


def set_(key, index, value):
    def mutate(batch):
        batch[key][index] = value
    return mutate


def move_first_token(batch):
    """Patches 0 and 1 keep their total but patch 0 gets 2 tokens."""
    batch["patch_lengths"][0, 0] += 1
    batch["patch_lengths"][0, 1] -= 1


def drop_last_target(batch, row):
    """Row `row` loses the loss on its last target: the contract then reads it as padding."""
    last = int(batch["loss_mask"][row].nonzero().max())
    batch["loss_mask"][row, last] = 0.0


CASES = [
    ("missing", lambda b: b.pop("modality"), "lacks \\['modality'\\]"),
    ("dtype", lambda b: b.__setitem__("patch_lengths", b["patch_lengths"].long()), "must be torch.int32"),
    ("shape", lambda b: b.__setitem__("labels", b["labels"][:, :-1]), "labels has shape"),
    ("no positions", lambda b: b.update({k: v[:, :0] for k, v in b.items() if k != "patch_lengths"}),
     "no positions \\(N = 0\\)"),
    ("sum", set_("patch_lengths", (0, 1), 7), "must sum to N \\+ 1"),
    ("first", move_first_token, "first patch must have length 1"),
    ("negative", set_("patch_lengths", (0, 1), -1), "negative patch length"),
    ("mask values", set_("loss_mask", (1, 0), 0.5), "must be 0 or 1"),
    ("mask ends early", lambda b: drop_last_target(b, 0), "padded tokens must be 0"),
    ("shift", lambda b: b["labels"].__setitem__((0, 2), b["labels"][0, 2] + 1), "shifted by one"),
    ("modality value", set_("modality", (0, 0), 2), "text \\(0\\) or speech \\(1\\)"),
]


@pytest.mark.parametrize("name, mutate, message", CASES, ids=[c[0] for c in CASES])
def test_each_violation_is_named(name, mutate, message):
    with pytest.raises(BatchContractError, match=message):
        check_batch(broken(mutate), VOCAB)


U = VOCAB.unit_offset
HAND_ROW = [VOCAB.bos_id, VOCAB.speech_marker, U, U + 1, U + 2, U + 3, U + 4, VOCAB.text_marker,
            5, 6, VOCAB.eos_id]  # 11 tokens: x has 10, N = 12 leaves 2 of padding


def hand_batch(patch_lengths, row=HAND_ROW):
    row = np.array(row, dtype=np.int64)
    modality = VOCAB.is_patchable_static(row).astype(np.int64)
    sample = pad_row(row, modality, np.array([1, len(row) - 1], dtype=np.int32), 12, 9)
    sample["patch_lengths"] = torch.tensor(patch_lengths, dtype=torch.int32)
    return {k: v[None] for k, v in sample.items()}


def test_hand_row_passes_with_static_patches():
    check_batch(hand_batch([1, 4, 2, 1, 1, 1, 3, 0, 0]), VOCAB)  # padding 2 in the last patch


def test_a_prompt_without_loss_passes():
    """A task row trains only its answer: zeros in the mask before the last target are allowed."""
    batch = hand_batch([1, 4, 2, 1, 1, 1, 3, 0, 0])
    batch["loss_mask"][0, :7] = 0.0  # BOS .. <t> -> targets up to the first piece
    check_batch(batch, VOCAB)


@pytest.mark.parametrize("lengths, message", [
    ([1, 4, 3, 1, 1, 3, 0, 0, 0], "a patch mixes text and speech"),
    ([1, 4, 2, 1, 2, 3, 0, 0, 0], "a text token is not a patch of its own"),
    ([1, 4, 2, 1, 1, 1, 1, 2, 0], "padding forms a patch of its own"),
    ([1, 4, 2, 1, 1, 1, 0, 3, 0], "a non-zero patch length follows a zero one"),
])
def test_hand_row_violations(lengths, message):
    with pytest.raises(BatchContractError, match=message):
        check_batch(hand_batch(lengths), VOCAB)


@pytest.mark.parametrize("key, value, message", [
    ("tokens", 5, "padded tokens must be 0"),
    ("labels", 5, "padded labels must be 0"),
    ("modality", 1, "padding must have text modality"),
])
def test_padding_values(key, value, message):
    batch = hand_batch([1, 4, 2, 1, 1, 1, 3, 0, 0])
    batch[key][0, -1] = value
    with pytest.raises(BatchContractError, match=message):
        check_batch(batch, VOCAB)


def test_speech_marker_must_start_a_patch():
    row = [VOCAB.bos_id, VOCAB.speech_marker, U, U, VOCAB.speech_marker, U, U, VOCAB.eos_id]
    check_batch(hand_batch([1, 3, 3, 6, 0, 0, 0, 0, 0], row), VOCAB)
    with pytest.raises(BatchContractError, match="speech-mode marker does not start a patch"):
        check_batch(hand_batch([1, 4, 2, 6, 0, 0, 0, 0, 0], row), VOCAB)


def test_modality_must_match_ids():
    batch = valid_batch()
    speech = torch.nonzero(batch["modality"][0] == 1).flatten()
    batch["modality"][0, speech] = 0
    with pytest.raises(BatchContractError, match="modality does not match the token ids"):
        check_batch(batch, VOCAB)
    batch = valid_batch()
    batch["tokens"][0, 1] = VOCAB.text_size  # a reserved id
    batch["labels"][0, 0] = VOCAB.text_size
    with pytest.raises(BatchContractError, match="outside the joint vocabulary"):
        check_batch(batch, VOCAB)


def test_the_rows_last_target_is_checked_too():
    # EOS (text, a target only) joined to the speech patch before it.
    row = [VOCAB.bos_id, VOCAB.speech_marker, U, U, VOCAB.eos_id]
    check_batch(hand_batch([1, 3, 9, 0, 0, 0, 0, 0, 0], row), VOCAB)  # EOS + 8 padding
    with pytest.raises(BatchContractError, match="mixes text and speech \\(at the row's last"):
        check_batch(hand_batch([1, 12, 0, 0, 0, 0, 0, 0, 0], row), VOCAB)


def test_packed_documents_never_share_a_patch():
    """Rows packing several documents, as the dataset cuts them, pass the contract, and every
    position after an EOS starts a patch: no patch spans two documents, in every rule."""
    from lst_kernels import document_starts

    for rule in (lambda d: static_patch_lengths(d, 4), aligned_patch_lengths,
                 lambda d: aligned_patch_lengths(d, "merged")):
        rng = np.random.default_rng(5)
        docs = [random_interleaved(rng, max_blocks=3) for _ in range(4)]
        tokens = np.concatenate([d.tokens for d in docs]).astype(np.int64)
        modality = np.concatenate([d.modality for d in docs]).astype(np.int64)
        lengths = np.concatenate([rule(d) for d in docs])
        batch = {k: v[None] for k, v in pad_row(tokens, modality, lengths, len(tokens) + 3,
                                                len(lengths) + 2).items()}
        check_batch(batch, VOCAB)
        n = batch["tokens"].shape[1]
        starts = document_starts(batch["tokens"], VOCAB.eos_id)[0]  # [N + 1]
        ids = patch_ids(batch["patch_lengths"], n + 1)[0]  # [N + 1]
        assert int(starts.unique().numel()) >= 4
        new_document = starts == torch.arange(n + 1)
        new_patch = torch.ones(n + 1, dtype=torch.bool)
        new_patch[1:] = ids[1:] != ids[:-1]
        assert (new_patch | ~new_document).all()
