"""ASR and TTS task rows: the layout, the markers, EOS and which targets carry loss, under every
patching mode; the dataset's refusals."""

import numpy as np
import pytest
import torch
from document_cases import SPACE_ID, VOCAB, MemoryStore, aligned_store, text_store

from megatron_lst.data.dataset import DatasetError
from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.data.indexed import DocumentStore, DocumentWriter
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.data.task_rows import TaskDataset, max_row_shape, task_row
from megatron_lst.patching import Patcher, PatchingConfig, aligned_patch_lengths, check_batch

U = VOCAB.unit_offset
# "hi there" with a silence in the middle: word 1 = pieces 7, 8 over units 1 2; silence over unit
# 3; word 2 = piece 9 over units 4 5 6.
HAND_DOC = AlignedDocument(
    text_ids=np.array([7, 8, 9], np.int32), unit_ids=np.array([1, 2, 3, 4, 5, 6], np.int32),
    seg_text_len=np.array([2, 0, 1], np.int32), seg_unit_len=np.array([2, 1, 3], np.int32))

PATCHINGS = {
    "none": PatchingConfig("none"),
    "static": PatchingConfig("static", patch_size=3),
    "aligned": PatchingConfig("aligned"),
    "aligned merged": PatchingConfig("aligned", silence="merged"),
    "mixed": PatchingConfig("mixed", patch_size=4, prob_static=0.5),
    "curriculum": PatchingConfig("curriculum", patch_size=2, aligned_until_step=2,
                                 static_from_step=6),
}


def test_hand_asr_row():
    row = task_row(HAND_DOC, "asr", VOCAB, SPACE_ID)
    v = VOCAB
    assert row.doc.tokens.tolist() == [v.bos_id, v.speech_marker, U + 1, U + 2, U + 3, U + 4,
                                       U + 5, U + 6, v.text_marker, 7, 8, 9, v.eos_id]
    assert row.prompt.tolist() == row.doc.tokens[:9].tolist()  # up to and including <t>
    assert row.answer.tolist() == [7, 8, 9, v.eos_id]
    assert row.target_mask.tolist() == [False] * 9 + [True] * 4
    # Aligned patching cuts the speech at the word, the silence and the word.
    assert aligned_patch_lengths(row.doc).tolist() == [1, 1, 2, 1, 3, 1, 1, 1, 1, 1]


def test_hand_tts_row():
    row = task_row(HAND_DOC, "tts", VOCAB, SPACE_ID)
    v = VOCAB
    assert row.doc.tokens.tolist() == [v.bos_id, v.text_marker, 7, 8, 9, SPACE_ID,
                                       v.speech_marker, U + 1, U + 2, U + 3, U + 4, U + 5, U + 6,
                                       v.eos_id]
    assert row.prompt.tolist()[-1] == v.speech_marker and len(row.prompt) == 7
    assert row.answer.tolist() == [U + 1, U + 2, U + 3, U + 4, U + 5, U + 6, v.eos_id]
    assert aligned_patch_lengths(row.doc).tolist() == [1] * 7 + [2, 1, 3, 1]
    # Without a word-boundary piece the marker follows the transcript directly.
    assert task_row(HAND_DOC, "tts", VOCAB, None).doc.tokens[5] == v.speech_marker


def _dataset(task, patching, store=None, training=True, **kwargs):
    store = store or aligned_store(seed=3, num_documents=12, max_segments=20)
    seq_length, max_tokens = 160, 160
    return TaskDataset(store, task, 30, seq_length, max_tokens, Patcher(patching), seed=5,
                       global_batch_size=4, space_id=SPACE_ID, training=training, **kwargs)


@pytest.mark.parametrize("patching", sorted(PATCHINGS))
@pytest.mark.parametrize("task", ["asr", "tts"])
def test_rows_train_the_answer_and_eos_only(task, patching):
    dataset = _dataset(task, PATCHINGS[patching])
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))])
             for k in dataset[0]}
    check_batch(batch, VOCAB)
    v = VOCAB
    answer_marker, prompt_marker = ((v.text_marker, v.speech_marker) if task == "asr"
                                    else (v.speech_marker, v.text_marker))
    for index in range(len(dataset)):
        row, _ = dataset.row(index)
        tokens, labels = batch["tokens"][index], batch["labels"][index]
        mask = batch["loss_mask"][index].bool()
        n = len(row.doc) - 1  # real inputs
        assert tokens[0] == v.bos_id and tokens[1] == prompt_marker
        assert labels[n - 1] == v.eos_id and mask[n - 1] and not mask[n:].any()
        marker_at = int((tokens == answer_marker).nonzero()[0, 0])
        # Every target before the answer's first token is prompt (no loss), every later one is
        # answer or EOS (loss): the marker itself is a prompt target.
        assert not mask[:marker_at].any() and mask[marker_at:n].all()
        trained = labels[mask]
        if task == "asr":
            assert ((trained < v.text_size) & (trained != v.bos_id)).all()
            assert trained.tolist() == [*dataset.store[dataset.document_id(index)[1]].text_ids,
                                        v.eos_id]
        else:
            assert (v.is_unit(trained[:-1]).all()) and trained[-1] == v.eos_id
        assert int(mask.sum()) == len(row.answer)


def test_curriculum_rows_follow_the_training_step():
    """Curriculum: aligned before tau1, static from tau2; at inference static."""
    patching = PATCHINGS["curriculum"]
    dataset = _dataset("asr", patching)
    static = Patcher(PatchingConfig("static", patch_size=2))
    aligned = Patcher(PatchingConfig("aligned"))
    for index, expected in ((0, aligned), (7, aligned), (24, static), (29, static)):
        row, lengths = dataset.row(index)
        assert lengths.tolist() == expected.patch_lengths(row.doc).tolist(), index
    inference = _dataset("asr", patching, training=False)
    row, lengths = inference.row(0)
    assert lengths.tolist() == static.patch_lengths(row.doc).tolist()


def test_mixed_validation_rows_are_static():
    """Validation task rows of a mixed model drew aligned patching for half of the utterances;
    at inference mixed models are static."""
    inference = _dataset("asr", PATCHINGS["mixed"], training=False)
    static = Patcher(PatchingConfig("static", patch_size=4))
    for index in range(len(inference)):
        row, lengths = inference.row(index)
        assert lengths.tolist() == static.patch_lengths(row.doc).tolist(), index


def test_epochs_visit_every_utterance_once():
    dataset = _dataset("tts", PATCHINGS["static"])
    first = [dataset.document_id(i)[1] for i in range(12)]
    second = [dataset.document_id(i)[1] for i in range(12, 24)]
    assert sorted(first) == sorted(second) == list(range(12)) and first != second


def test_text_store_is_refused():
    with pytest.raises(DatasetError, match="aligned speech dataset.*--task asr"):
        _dataset("asr", PATCHINGS["static"], store=text_store(seed=1, num_documents=4))


def test_unknown_task_is_refused():
    with pytest.raises(DatasetError, match="'asr' or 'tts'"):
        task_row(HAND_DOC, "lm", VOCAB, SPACE_ID)


def test_too_long_rows_are_refused_before_training_with_the_sizes_that_hold_them():
    """A row too long for the flags used to stop training only when the row was reached, after
    however many iterations came first, naming no size that would hold the store."""
    short = AlignedDocument(np.array([7], np.int32), np.array([1, 2], np.int32),
                            np.array([1], np.int32), np.array([2], np.int32))
    store = MemoryStore("aligned", [short, HAND_DOC, short])
    patcher = Patcher(PatchingConfig("static", patch_size=3))
    inputs, patches = max_row_shape(store, "asr", patcher, None)
    assert (inputs, patches) == (12, 9)  # BOS, [<s> u u], [u u u], [u], <t>, 7, 8, 9, EOS
    for seq_length, max_tokens in ((8, 12), (9, 11)):
        with pytest.raises(DatasetError) as refused:
            TaskDataset(store, "asr", 3, seq_length, max_tokens, patcher, seed=0)
        assert str(refused.value) == (
            f"1 of 3 utterances make asr rows longer than --max-tokens {max_tokens} inputs or "
            f"--seq-length {seq_length} patches hold: document 1 has 12 inputs in 9 patches. The "
            f"smallest sizes that hold every row are --max-tokens 12 and --seq-length 9 "
            f"(--max-position-embeddings at least that): give them, or leave the longest "
            f"utterances out of the store")
    dataset = TaskDataset(store, "asr", 3, patches, inputs, patcher, seed=0)  # fits exactly
    assert [len(dataset[i]["tokens"]) for i in range(3)] == [12] * 3


def test_the_baseline_is_told_the_seq_length_alone():
    """The token baseline has no --max-tokens of its own (it is --seq-length), and its row holds a
    position for each token up to the last target: 12 inputs need --seq-length 13."""
    store = MemoryStore("aligned", [HAND_DOC])
    with pytest.raises(DatasetError) as refused:
        TaskDataset(store, "asr", 1, 12, 12, Patcher(PatchingConfig("none")), seed=0)
    assert ("rows longer than --seq-length 12 positions hold: document 0 has 12 inputs in 13 "
            "patches. The smallest sizes that hold every row are --seq-length 13 "
            "(--max-position-embeddings") in str(refused.value)
    TaskDataset(store, "asr", 1, 13, 13, Patcher(PatchingConfig("none")), seed=0)[0]


def test_mixed_patching_sizes_rows_for_either_rule():
    """Mixed patching draws static or aligned per row: the check holds a row under both, so the
    refusal cannot depend on which rule a row happens to draw."""
    store = MemoryStore("aligned", [HAND_DOC])
    patcher = Patcher(PatchingConfig("mixed", patch_size=3, prob_static=0.5))
    rules = [len(patcher.lengths_for_rule(task_row(HAND_DOC, "asr", VOCAB, None).doc, rule))
             for rule in ("static", "aligned")]
    assert rules == [9, 10]
    assert max_row_shape(store, "asr", patcher, None) == (12, 10)
    with pytest.raises(DatasetError, match="--seq-length 9 patches hold"):
        TaskDataset(store, "asr", 1, 9, 12, patcher, seed=0)


def test_rows_are_sized_under_the_rules_their_steps_draw():
    """Validation rows of a mixed model are patched statically (step None) and curriculum rows
    before tau1 aligned only, but both were sized under static and aligned patching: a dataset
    whose rows all fit was refused."""
    store = MemoryStore("aligned", [HAND_DOC])
    mixed = Patcher(PatchingConfig("mixed", patch_size=3, prob_static=0.5))
    assert max_row_shape(store, "asr", mixed, None, ("static",)) == (12, 9)
    valid = TaskDataset(store, "asr", 1, 9, 12, mixed, seed=0, training=False)  # fits statically
    assert len(valid[0]["patch_lengths"]) == 9
    with pytest.raises(DatasetError, match="--seq-length 9 patches hold: document 0 has 12 "
                                           "inputs in 10 patches"):
        TaskDataset(store, "asr", 1, 9, 12, mixed, seed=0)  # training rows may draw aligned (10)
    # Curriculum, tau1 = 1: rows at steps 0 and 1 are aligned (10 patches, more than static's 9).
    early = Patcher(PatchingConfig("curriculum", patch_size=3, aligned_until_step=1,
                                   static_from_step=4))
    rows = TaskDataset(store, "asr", 4, 10, 12, early, seed=0, global_batch_size=2)
    assert rows.steps == range(0, 2)
    late = TaskDataset(store, "asr", 2, 9, 12, early, seed=0, global_batch_size=2,
                       sample_positions=np.array([8, 9]))  # step 4: static only
    assert late.steps == range(4, 5) and len(late[1]["patch_lengths"]) == 9
    with pytest.raises(DatasetError, match="document 0 has 12 inputs in 10 patches"):
        TaskDataset(store, "asr", 8, 9, 12, early, seed=0, global_batch_size=2)  # steps 0..3


def test_utterance_without_transcript_is_refused():
    silent = AlignedDocument(np.zeros(0, np.int32), np.array([1, 2], np.int32),
                             np.array([0], np.int32), np.array([2], np.int32))
    with pytest.raises(DatasetError, match="needs a transcript and units"):
        task_row(silent, "asr", VOCAB, SPACE_ID)


def test_an_eos_among_the_transcript_pieces_is_named():
    """A transcript holding the EOS id (a '</s>' kept as the special id by an older
    preprocessing) would end the row's document in the middle of the answer."""
    stray = AlignedDocument(np.array([7, VOCAB.eos_id, 9], np.int32), HAND_DOC.unit_ids,
                            HAND_DOC.seg_text_len, HAND_DOC.seg_unit_len)
    store = MemoryStore("aligned", [HAND_DOC, stray])
    with pytest.raises(DocumentError, match=rf"document 1: text piece 1 is id {VOCAB.eos_id}, "
                                            r"the tokenizer's EOS"):
        TaskDataset(store, "asr", 2, 40, 40, Patcher(PATCHINGS["static"]), seed=0)
    TaskDataset(MemoryStore("aligned", [HAND_DOC]), "asr", 1, 40, 40,
                Patcher(PATCHINGS["static"]), seed=0)[0]  # the clean utterance makes its row


@pytest.mark.parametrize("part, bad, message", [
    ("unit_ids", VOCAB.num_units, f"memory, document 1: speech unit {VOCAB.num_units} is outside "
                                  f"the codebook"),
    ("text_ids", VOCAB.text_size, f"memory, document 1: text id {VOCAB.text_size} is outside the "
                                  f"tokenizer's"),
])
def test_ids_outside_the_vocabulary_are_named_before_training(part, bad, message):
    """They used to stop training at whichever iteration reached the utterance (and a unit out of
    the codebook named neither the file nor the document)."""
    doc = AlignedDocument(HAND_DOC.text_ids.copy(), HAND_DOC.unit_ids.copy(),
                          HAND_DOC.seg_text_len, HAND_DOC.seg_unit_len)
    getattr(doc, part)[1] = bad
    store = MemoryStore("aligned", [HAND_DOC, doc])
    store.describe = lambda index: f"memory, document {index}"
    with pytest.raises(DocumentError) as refused:
        TaskDataset(store, "tts", 2, 40, 40, Patcher(PATCHINGS["static"]), seed=0)
    assert str(refused.value).startswith(message)


def test_a_store_with_an_utterance_without_transcript_is_refused_before_training(tmp_path):
    silent = AlignedDocument(np.zeros(0, np.int32), np.array([1, 2], np.int32),
                             np.array([0], np.int32), np.array([2], np.int32))
    writer = DocumentWriter(tmp_path / "speech", "aligned")
    for doc in (HAND_DOC, silent, HAND_DOC):
        writer.add_aligned(doc)
    counts = Counts(documents=3, segments=7, text_pieces=6, units=14)
    writer.finalize(Manifest("aligned", VOCAB.to_dict(), TokenizerInfo("none", "0" * 64,
                                                                       VOCAB.text_size),
                             VOCAB.num_units, 25.0, counts))
    store = DocumentStore(tmp_path / "speech")
    patcher = Patcher(PATCHINGS["static"])
    with pytest.raises(DatasetError, match=r"1 of 3 utterances \(.*speech\) lack a transcript or "
                                           r"units, which tts rows need: document 1 \(.*speech.bin, "
                                           r"document 1\) has 0 text pieces and 2 units"):
        TaskDataset(store, "tts", 3, 16, 32, patcher, seed=0)


def test_a_too_long_row_of_a_later_part_is_named_by_its_place_in_the_file():
    """The valid part of a split starts inside the store: its first too-long utterance was named
    'document 0 (speech.bin, document 40)', two numbers for one utterance."""
    from megatron_lst.training.data_provider import DocumentRange

    store = MemoryStore("aligned", [HAND_DOC] * 3)
    store.describe = lambda index: f"speech.bin, document {index}"
    store.prefix = "speech"
    store.part_lengths = lambda start, stop: np.array(  # [D, 4] as DocumentStore's
        [[len(d.text_ids), len(d.unit_ids), d.num_segments, d.num_segments]
         for d in store.documents[start:stop]])
    valid = DocumentRange(store, 2, 3)
    with pytest.raises(DatasetError) as refused:
        TaskDataset(valid, "asr", 1, 8, 12, Patcher(PatchingConfig("static", patch_size=3)),
                    seed=0)
    assert ("1 of 1 utterances (speech) make asr rows longer than --max-tokens 12 inputs or "
            "--seq-length 8 patches hold: speech.bin, document 2 has 12 inputs in 9 patches"
            ) in str(refused.value)
