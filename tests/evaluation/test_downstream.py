"""ASR and TTS evaluation: a tiny LST and a tiny token baseline trained on the task rows of 8
utterances decode them back exactly (WER 0, unit edit rate 0), with and without the KV cache;
the summaries count what they should."""

import dataclasses

import numpy as np
import pytest
import torch
from eval_cases import MemoryUtterances, tiny_model, tokenizer, utterances, vocab

from megatron_lst.data.documents import AlignedDocument
from megatron_lst.data.task_rows import TaskDataset
from megatron_lst.evaluation.downstream import (
    TaskModel,
    length_cap,
    run_asr,
    run_tts,
    summarise_asr,
    summarise_tts,
)
from megatron_lst.evaluation.edit_rates import EditCounts
from megatron_lst.evaluation.generation import GenerationError
from megatron_lst.models.loss import masked_token_mean
from megatron_lst.patching import Patcher, PatchingConfig

STATIC = PatchingConfig("static", patch_size=3)
PATCHING = {"lst": STATIC, "baseline": PatchingConfig("none")}


def overfit(kind: str, task: str, docs: list[AlignedDocument], steps: int = 300):
    """A tiny `kind` model trained on the 8 `task` rows of `docs` in one batch, till it repeats
    them; in eval mode."""
    patcher = Patcher(PATCHING[kind])
    dataset = TaskDataset(MemoryUtterances(docs), task, len(docs), 64, 64, patcher, seed=0,
                          space_id=tokenizer().space_id, training=False)
    batch = {k: torch.stack([dataset[i][k] for i in range(len(docs))]) for k in dataset[0]}
    model = tiny_model(kind, vocab().size, seed=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = masked_token_mean(model(batch["tokens"], batch["patch_lengths"], batch["labels"]),
                                 batch["loss_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    return TaskModel(model, vocab(), tokenizer(), PATCHING[kind], tokenizer().space_id), loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_tiny_models_overfit_8_asr_utterances_to_wer_0(single_rank, kind):
    docs = utterances(seed=11)
    asr, loss = overfit(kind, "asr", docs)
    assert loss < 0.05
    outputs = run_asr(asr, docs)
    summary = summarise_asr(outputs)
    assert summary["wer"] == 0.0 and summary["cer"] == 0.0, [o.hypothesis for o in outputs]
    assert summary["hallucination_rate"] == 0.0 and summary["num_utterances"] == 8
    # The cache changes nothing: the same transcripts with full recomputation every step.
    uncached = run_asr(asr, docs, use_cache=False)
    assert [o.hypothesis for o in uncached] == [o.hypothesis for o in outputs]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_tiny_models_overfit_8_tts_utterances_to_unit_edit_rate_0(single_rank, kind):
    docs = utterances(seed=12)
    tts, loss = overfit(kind, "tts", docs)
    assert loss < 0.05
    outputs = run_tts(tts, docs)
    summary = summarise_tts(outputs, frame_rate=25.0)
    assert summary["unit_edit_rate"] == 0.0 and summary["hallucination_rate"] == 0.0
    for doc, output in zip(docs, outputs, strict=True):
        np.testing.assert_array_equal(output.units, doc.unit_ids)
    # Global steps per second of speech: positions run per generated second; LST runs one per
    # closed patch of p=3 units, the baseline one per token.
    units = sum(len(d.unit_ids) for d in docs)
    steps = sum(o.global_steps for o in outputs)
    assert summary["global_steps_per_second"] == pytest.approx(steps / (units / 25.0))
    if kind == "baseline":
        assert steps == units  # one position per unit (the EOS step's input is the last unit)
    else:
        assert steps < units / 2
    uncached = run_tts(tts, docs, use_cache=False)
    for a, b in zip(uncached, outputs, strict=True):
        np.testing.assert_array_equal(a.units, b.units)
    # --no-cache counted every position of each re-run, the prompt's included: the rate was
    # several times larger for the same output
    assert summarise_tts(uncached, frame_rate=25.0) == summary


def test_length_cap_is_twice_the_reference_plus_8():
    assert length_cap(5) == 18


def test_summaries_are_corpus_rates_with_intervals():
    from megatron_lst.evaluation.downstream import AsrOutput

    outputs = [AsrOutput("a b", "a", EditCounts(1, 2), EditCounts(2, 3), False),
               AsrOutput("c d e f", "c d e f", EditCounts(0, 4), EditCounts(0, 7), True)]
    summary = summarise_asr(outputs, resamples=200)
    assert summary["wer"] == pytest.approx(1 / 6) and summary["cer"] == pytest.approx(2 / 10)
    assert summary["hallucination_rate"] == 0.5
    assert 0.0 <= summary["wer_ci_low"] <= summary["wer"] <= summary["wer_ci_high"] <= 0.5


class _Transcripts:
    """A tokenizer stand-in whose `decode` gives these transcripts in turn."""

    def __init__(self, *texts: str):
        self._texts = iter(texts)

    def decode(self, ids):
        return next(self._texts)


class _NeverDecodes(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("decoded before the transcripts were checked")


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_a_transcript_without_letters_is_refused_before_decoding(task):
    docs = utterances(seed=13, count=3)
    model = TaskModel(_NeverDecodes(), vocab(), _Transcripts("a cat", " ?! ", "dog"), STATIC, None)
    with pytest.raises(ValueError, match=r"utterance 1 of the evaluation set has the transcript "
                                         r"' \?! ', which holds no letter or digit"):
        if task == "asr":
            run_asr(model, docs)
        else:
            run_tts(model, docs, asr=model)


def test_a_transcript_of_apostrophes_only_is_refused_before_decoding():
    """Normalising keeps apostrophes: "' '" was a reference of 2 words, holding no letter."""
    from megatron_lst.evaluation.downstream import transcripts

    model = TaskModel(_NeverDecodes(), vocab(), _Transcripts("a cat", "' '", "dog"), STATIC, None)
    with pytest.raises(ValueError, match=r"utterance 1 of the evaluation set has the transcript "
                                         r"\"' '\", which holds no letter or digit"):
        transcripts(model, utterances(seed=13, count=3))  # what run_asr and run_tts check first


@pytest.mark.parametrize("run", [run_asr, run_tts])
def test_an_utterance_longer_than_the_context_is_named(single_rank, run):
    model = tiny_model("lst", vocab().size, seed=1)
    model.lst_config = dataclasses.replace(model.lst_config, max_sequence_length=4)
    task_model = TaskModel(model, vocab(), tokenizer(), STATIC, tokenizer().space_id)
    with pytest.raises(GenerationError, match=r"^utterance 0: the prompt needs \d+ global "
                                              r"positions.* context is 4 "):
        run(task_model, utterances(seed=2, count=2))


@pytest.mark.parametrize("run", [run_asr, run_tts])
def test_an_utterance_longer_than_the_context_is_named_before_any_decoding(single_rank, run,
                                                                           monkeypatch):
    """Utterance 1's prompt does not fit the context, utterance 0's does: the refusal came only
    once utterance 0 was decoded, its work lost (thousands of utterances, in a real set)."""
    import megatron_lst.evaluation.downstream as downstream

    model = tiny_model("lst", vocab().size, seed=1)
    model.lst_config = dataclasses.replace(model.lst_config, max_sequence_length=8)
    task_model = TaskModel(model, vocab(), tokenizer(), STATIC, tokenizer().space_id)
    def decode(*args):
        raise AssertionError("an utterance was decoded before every prompt was checked")

    monkeypatch.setattr(downstream, "_decode", decode)
    docs = utterances(seed=2, count=1, num_words=2) + utterances(seed=3, count=1, num_words=6)
    with pytest.raises(GenerationError, match=r"^utterance 1: the prompt needs \d+ global "
                                              r"positions.* context is 8 "):
        run(task_model, docs)


def test_generated_units_too_long_for_the_asr_model_get_an_empty_transcript(single_rank, caplog):
    """A TTS output that ran on to its length cap can need more global positions than the ASR
    model's context: one utterance's transcript, not the end of the whole evaluation."""
    tts = TaskModel(tiny_model("lst", vocab().size, seed=1), vocab(), tokenizer(), STATIC,
                    tokenizer().space_id)
    short = tiny_model("lst", vocab().size, seed=2)
    short.lst_config = dataclasses.replace(short.lst_config, max_sequence_length=4)
    asr = TaskModel(short, vocab(), tokenizer(), STATIC, tokenizer().space_id)
    [output] = run_tts(tts, utterances(seed=2, count=1), asr)
    assert len(output.units) > 3, "the test needs units that do not fit 4 positions"
    assert output.transcript == ""
    assert output.chars.errors == output.chars.reference_length > 0
    assert "utterance 0: the ASR model cannot transcribe" in caplog.text


def test_utterances_are_checked_naming_the_document_before_any_decoding(tmp_path):
    """lst-eval --task read the utterances unchecked: a silence-only one stopped TTS with an error
    naming no utterance, a unit outside the codebook ('task row: speech unit 99 ...') only when
    decoding reached it, with advice (--num-units) that lst-eval does not take."""
    from eval_cases import write_utterances

    from megatron_lst.data.indexed import DocumentStore
    from megatron_lst.evaluation.downstream import read_utterances

    silent = AlignedDocument(np.zeros(0, np.int32), np.array([1, 2], np.int32),
                             np.array([0], np.int32), np.array([2], np.int32))
    docs = utterances(seed=1, count=3)
    out_of_codebook = dataclasses.replace(docs[2], unit_ids=docs[2].unit_ids.copy())
    out_of_codebook.unit_ids[0] = 99
    cases = {"silent": ([docs[0], silent, docs[1]], "silent.bin, document 1: the utterance has 0 "
                                                    "text pieces and 2 units"),
             "units": ([docs[0], docs[1], out_of_codebook], "units.bin, document 2: speech unit "
                                                            "99 is outside the codebook 0..15")}
    for name, (stored, message) in cases.items():
        store = DocumentStore(write_utterances(tmp_path / name, stored))
        with pytest.raises(ValueError) as refused:
            read_utterances(store, len(store))
        assert message in str(refused.value)
        assert read_utterances(store, 1)[0].unit_ids.tolist() == docs[0].unit_ids.tolist()
