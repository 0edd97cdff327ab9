"""ASR and TTS evaluation of fine-tuned checkpoints on held-out utterances
(docs/evaluation.md#asr-and-tts).

Each utterance is an aligned document of a speech store; its prompt is its task row's
(`megatron_lst.data.task_rows`: `BOS <s> units <t>` for ASR, `BOS <t> transcript [space] <s>` for
TTS), so the model reads what fine-tuning showed it. Decoding is greedy with the KV caches of
`megatron_lst.evaluation.generation` (the same code path as `lst-generate`), restricted to text
pieces (ASR) or units (TTS) and EOS, and stops at EOS, at the length cap
`2 x reference length + 8` tokens or at the model's context, whichever comes first; an output
that ends without EOS counts as a hallucination (the paper's baseline "does not stop").

- ASR: WER and CER of the normalised transcript (`edit_rates`), the hallucination rate.
- TTS: the unit edit rate against the utterance's units; ASR-CER, the CER of the generated units
  transcribed by an ASR model (pass the same one for every TTS model compared); the hallucination
  rate; global generation steps per second of generated speech (the global model's positions
  run while generating, over the generated units / the store's frame rate).

Rates are corpus-level (summed errors over summed reference lengths) with 95% percentile
bootstrap intervals over utterances.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from megatron_lst.data.documents import AlignedDocument, check_document_of
from megatron_lst.data.task_rows import TaskRow, task_row
from megatron_lst.evaluation.bootstrap import bootstrap_ci, bootstrap_ratio_ci
from megatron_lst.evaluation.edit_rates import (
    EditCounts,
    char_edits,
    normalise_text,
    unit_edits,
    word_edits,
)
from megatron_lst.evaluation.generation import (
    GenerationError,
    GenerationResult,
    PromptTooLongError,
    SamplingConfig,
    build_prompt,
    check_prompt,
    generate,
    generation_patch_size,
)
from megatron_lst.patching import PatchingConfig
from megatron_lst.tokenizer.vocab import JointVocab

logger = logging.getLogger(__name__)


def length_cap(reference_length: int) -> int:
    """Most tokens decoded for an answer of `reference_length` tokens (EOS included)."""
    return 2 * reference_length + 8


@dataclass
class TaskModel:
    """What decoding needs of one loaded checkpoint (`loading.InferenceModel` gives it all)."""

    model: object
    """One model chunk: an `LSTModel` or a `TokenBaselineModel`."""
    vocab: JointVocab
    tokenizer: object
    patching: PatchingConfig
    space_id: int | None = None
    """The word-boundary piece TTS prompts put before `<s>`, as fine-tuning did."""

    @classmethod
    def from_inference_model(cls, loaded) -> TaskModel:
        """Refuses, naming its checkpoint, a model that generation cannot decode with (aligned
        patching): found at the first utterance, the error named it as if it were at fault."""
        try:
            generation_patch_size(loaded.patcher.config)
        except GenerationError as error:
            raise GenerationError(f"checkpoint {loaded.checkpoint}: {error}") from None
        return cls(loaded.model_chunks[0], loaded.vocab, loaded.tokenizer,
                   loaded.patcher.config, loaded.tokenizer.space_id)


def _decode(task_model: TaskModel, prompt: np.ndarray, modality: str, cap: int,
            use_cache: bool) -> GenerationResult:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=cap, modality=modality)
    return generate(task_model.model, prompt, task_model.vocab, task_model.patching, sampling,
                    use_cache=use_cache)


def _text_of(task_model: TaskModel, ids: np.ndarray) -> str:
    vocab = task_model.vocab
    pieces = [int(i) for i in ids if i < vocab.text_size and i not in (vocab.bos_id, vocab.eos_id)]
    return task_model.tokenizer.decode(pieces)


def _units_of(vocab: JointVocab, ids: np.ndarray) -> np.ndarray:
    return vocab.ids_to_units(ids[vocab.is_unit(ids)])


def transcribe(asr: TaskModel, units: np.ndarray, max_new_tokens: int, use_cache: bool = True
               ) -> tuple[str, GenerationResult]:
    """Greedy transcript of `units` (raw values) by an ASR model, and its generation."""
    prompt = build_prompt(asr.vocab, units=units, continue_in="text")  # BOS <s> units <t>
    result = _decode(asr, prompt, "text", max_new_tokens, use_cache)
    return _text_of(asr, result.tokens), result


def read_utterances(store, count: int) -> list[AlignedDocument]:
    """The first `count` utterances of an aligned `store`, each checked before any decoding: ids
    of the store's vocabulary, no BOS/EOS among the pieces, a transcript and units (the task row
    of either task needs both). Raises ValueError naming the file and document."""
    utterances = []
    for index in range(count):
        doc = store[index]
        check_document_of(store, index, doc, store.vocab)
        if not len(doc.text_ids) or not len(doc.unit_ids):
            raise ValueError(f"{store.describe(index)}: the utterance has {len(doc.text_ids)} text "
                             f"pieces and {len(doc.unit_ids)} units; ASR and TTS need a "
                             f"transcript and units: leave it out of the evaluation set")
        utterances.append(doc)
    return utterances


@dataclass
class AsrOutput:
    reference: str
    hypothesis: str
    words: EditCounts
    chars: EditCounts
    hit_cap: bool


def transcripts(model: TaskModel, utterances: list[AlignedDocument]) -> list[str]:
    """The utterances' transcripts, refusing (before any decoding) one that normalises to
    nothing: it has no error rate."""
    texts = [model.tokenizer.decode([int(i) for i in doc.text_ids]) for doc in utterances]
    for index, text in enumerate(texts):  # normalising keeps apostrophes: "'" was one word
        if not normalise_text(text).replace("'", "").strip():
            raise ValueError(f"utterance {index} of the evaluation set has the transcript "
                             f"{text!r}, which holds no letter or digit, so no error rate; "
                             f"leave it out of the set")
    return texts


@contextmanager
def _naming_utterance(number: int, what: str = "") -> Iterator[None]:
    """Generation errors (a prompt longer than the model's context) name the utterance."""
    try:
        yield
    except GenerationError as error:
        raise GenerationError(f"{what}utterance {number}: {error}") from None


def task_rows(model: TaskModel, utterances: list[AlignedDocument], task: str) -> list[TaskRow]:
    """The utterances' `task` rows, each prompt checked as `generate` checks it before any is
    decoded: a prompt past the model's context is refused naming its utterance, not after the
    utterances before it were decoded (and their work lost)."""
    rows = [task_row(doc, task, model.vocab, model.space_id) for doc in utterances]
    for number, row in enumerate(rows):
        with _naming_utterance(number):
            check_prompt(model.model, row.prompt, model.vocab, model.patching)
    return rows


def run_asr(asr: TaskModel, utterances: list[AlignedDocument], use_cache: bool = True
            ) -> list[AsrOutput]:
    outputs = []
    references = transcripts(asr, utterances)
    rows = task_rows(asr, utterances, "asr")
    for number, (row, reference) in enumerate(zip(rows, references, strict=True)):
        cap = length_cap(len(row.answer))
        with _naming_utterance(number):
            result = _decode(asr, row.prompt, "text", cap, use_cache)
        hypothesis = _text_of(asr, result.tokens)
        outputs.append(AsrOutput(reference, hypothesis, word_edits(reference, hypothesis),
                                 char_edits(reference, hypothesis), not result.stopped_at_eos))
    return outputs


@dataclass
class TtsOutput:
    reference_units: np.ndarray
    units: np.ndarray
    unit_errors: EditCounts
    hit_cap: bool
    global_steps: int
    transcript: str | None = None
    """The ASR model's transcript of `units` (None without one)."""
    chars: EditCounts | None = None
    """CER counts of `transcript` against the utterance's transcript."""


def run_tts(tts: TaskModel, utterances: list[AlignedDocument], asr: TaskModel | None = None,
            use_cache: bool = True) -> list[TtsOutput]:
    outputs = []
    references = transcripts(tts, utterances) if asr is not None else [None] * len(utterances)
    rows = task_rows(tts, utterances, "tts")
    for number, (doc, row, reference) in enumerate(zip(utterances, rows, references,
                                                       strict=True)):
        with _naming_utterance(number):
            result = _decode(tts, row.prompt, "speech", length_cap(len(row.answer)), use_cache)
        units = _units_of(tts.vocab, result.tokens)
        output = TtsOutput(doc.unit_ids, units, unit_edits(doc.unit_ids, units),
                           not result.stopped_at_eos, result.global_steps)
        if asr is not None:
            cap = length_cap(len(doc.text_ids) + 1)
            output.transcript = _transcript_of_generated(asr, units, cap, use_cache, number)
            output.chars = char_edits(reference, output.transcript)
        outputs.append(output)
    return outputs


def _transcript_of_generated(asr: TaskModel, units: np.ndarray, cap: int, use_cache: bool,
                             number: int) -> str:
    """The ASR model's transcript of the units generated for utterance `number`: empty for no
    units, and for more than the ASR model's context holds (a TTS output that ran on to its
    length cap), with a warning; its CER then counts every character as an error."""
    if not len(units):
        return ""
    try:
        return transcribe(asr, units, cap, use_cache)[0]
    except PromptTooLongError as error:
        logger.warning("utterance %d: the ASR model cannot transcribe the %d generated units (%s): "
                       "empty transcript", number, len(units), error)
        return ""


def _rate(counts: list[EditCounts], name: str, resamples: int, seed: int) -> dict[str, float]:
    errors = np.array([c.errors for c in counts], dtype=np.float64)
    lengths = np.array([c.reference_length for c in counts], dtype=np.float64)
    low, high = bootstrap_ratio_ci(errors, lengths, resamples, seed=seed)
    return {name: float(errors.sum() / lengths.sum()), f"{name}_ci_low": low,
            f"{name}_ci_high": high}


def _share(flags: list[bool], name: str, resamples: int, seed: int) -> dict[str, float]:
    outcomes = np.asarray(flags, dtype=np.float64)
    low, high = bootstrap_ci(outcomes, resamples, seed=seed)
    return {name: float(outcomes.mean()), f"{name}_ci_low": low, f"{name}_ci_high": high}


def summarise_asr(outputs: list[AsrOutput], resamples: int = 1000, seed: int = 0
                  ) -> dict[str, float | int]:
    """wer, cer, hallucination_rate (each with `_ci_low`/`_ci_high`), num_utterances."""
    return {**_rate([o.words for o in outputs], "wer", resamples, seed),
            **_rate([o.chars for o in outputs], "cer", resamples, seed),
            **_share([o.hit_cap for o in outputs], "hallucination_rate", resamples, seed),
            "num_utterances": len(outputs)}


def summarise_tts(outputs: list[TtsOutput], frame_rate: float, resamples: int = 1000,
                  seed: int = 0) -> dict[str, float | int]:
    """unit_edit_rate, hallucination_rate, asr_cer (with an ASR model; each with its interval),
    global_steps_per_second (of generated speech), num_utterances."""
    summary = {**_rate([o.unit_errors for o in outputs], "unit_edit_rate", resamples, seed),
               **_share([o.hit_cap for o in outputs], "hallucination_rate", resamples, seed)}
    if all(o.chars is not None for o in outputs):
        summary.update(_rate([o.chars for o in outputs], "asr_cer", resamples, seed))
    generated_seconds = sum(len(o.units) for o in outputs) / frame_rate
    steps = sum(o.global_steps for o in outputs)
    summary["global_steps_per_second"] = (steps / generated_seconds if generated_seconds
                                          else float("nan"))
    summary["num_utterances"] = len(outputs)
    return summary
