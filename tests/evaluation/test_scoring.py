"""Likelihood scoring: layout per mode, exactness against incremental next-token log-probs,
determinism, batch invariance, accuracy, and the patching used at inference."""

import dataclasses

import numpy as np
import pytest
import torch
from eval_cases import random_records, tiny_model, tokenizer, vocab

from megatron_lst.evaluation.items import ItemError, item_from_record
from megatron_lst.evaluation.scoring import (
    MODES,
    ModeScores,
    ScoredSequence,
    build_sequence,
    check_items_for_mode,
    collate,
    cut_context,
    ending_logprobs,
    evaluate_items,
    flatten_results,
    inference_patcher,
    parse_modes,
    score_items,
    summarise,
)
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.patching import Patcher, PatchingConfig, check_batch
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH, MODALITY_TEXT

STATIC = Patcher(PatchingConfig("static", patch_size=3))
ALIGNED = Patcher(PatchingConfig("aligned"))


def items_of(records):
    return [item_from_record(r, tokenizer(), vocab(), f"test:{i}") for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def items():
    return items_of(random_records(0, 5, num_endings=2) + random_records(1, 2, num_endings=4))


@pytest.fixture(scope="module")
def models(single_rank):
    return {kind: tiny_model(kind, vocab().size, seed=3) for kind in ("lst", "baseline")}


def test_parse_modes():
    assert parse_modes("s2s, T->T,t2s") == ["S->S", "T->T", "T->S"]
    assert parse_modes("ss,tt,ST,Ts") == ["S->S", "T->T", "S->T", "T->S"]
    assert parse_modes("tt,T->T,ss,t2t") == ["T->T", "S->S"]  # each mode scored once
    with pytest.raises(ValueError, match="unknown evaluation mode 'S->X'"):
        parse_modes("S->X")
    for bad in ("sts", "s", "S-T", "tt2", "2tt", "t2t2", "s22t", "s->2t", "S->->S", "t- >t"):
        with pytest.raises(ValueError, match="without shell quoting, ss, tt, st, ts"):
            parse_modes(bad)


def test_sequence_layout_follows_training(items):
    v, item = vocab(), items[0]
    context_units, context_text = v.units_to_ids(item.context.units), item.context.text_ids
    ending_units, ending_text = v.units_to_ids(item.endings[1].units), item.endings[1].text_ids
    s, t = v.speech_marker, v.text_marker
    layouts = {  # context run, then the ending: a new run (marker) only when the modality changes
        "S->S": ([v.bos_id, s, *context_units], ending_units),
        "T->T": ([v.bos_id, t, *context_text], ending_text),
        "S->T": ([v.bos_id, s, *context_units, t], ending_text),
        "T->S": ([v.bos_id, t, *context_text, tokenizer().space_id, s], ending_units),
    }
    for mode, (prefix, ending) in layouts.items():
        seq = build_sequence(item, 1, mode, v, STATIC)
        assert seq.tokens.tolist() == [int(x) for x in (*prefix, *ending)], mode
        assert seq.first_scored == len(prefix), mode
        assert seq.patch_lengths.sum() == len(seq.tokens)
    # Aligned patching cuts at the ending's first word even where the speech run continues.
    seq = build_sequence(item, 1, "S->S", v, ALIGNED)
    assert seq.first_scored in np.cumsum(seq.patch_lengths)


@pytest.mark.parametrize("patcher", [STATIC, ALIGNED], ids=["static", "aligned"])
def test_batches_keep_the_trainer_contract(items, patcher):
    v = vocab()
    sequences = [build_sequence(item, e, mode, v, patcher) for mode in MODES
                 for item in items[:3] for e in range(2)]
    # The same text with its run as a document of the interleaver's layout.
    text_run = tokenizer().encode(items[0].context.text + " " + items[0].endings[0].text)
    assert sequences[6].tokens[2:].tolist() == text_run
    batch = collate(sequences, multiple_of=2)
    real = torch.zeros_like(batch["tokens"], dtype=torch.bool)
    for row, seq in enumerate(sequences):
        real[row, :len(seq.tokens) - 1] = True
    assert batch["tokens"].shape[1] % 2 == 0 and batch["patch_lengths"].shape[1] % 2 == 0
    modality = torch.where(real & v.is_patchable_static(batch["tokens"]),
                           MODALITY_SPEECH, MODALITY_TEXT)
    check_batch({"tokens": batch["tokens"], "labels": batch["labels"],
                 "loss_mask": real.float(), "modality": modality,
                 "patch_lengths": batch["patch_lengths"]}, v)
    assert not (batch["score_mask"] & ~real).any()


def test_inference_patcher_is_static_for_curriculum_and_mixed():
    curriculum = PatchingConfig("curriculum", patch_size=5, aligned_until_step=10,
                                static_from_step=20)
    assert inference_patcher(curriculum).config == PatchingConfig("static", patch_size=5)
    assert inference_patcher(PatchingConfig("mixed")).rule(None, None) == "static"
    assert inference_patcher(PatchingConfig("aligned")).rule(None, None) == "aligned"


def incremental_logprob(model, seq) -> float:
    """Sum over scored t of log p(seq[t] | seq[:t]), one forward per prefix, with the sequence's
    patches cut at t + 1 tokens (what the model sees when seq[t] comes next)."""
    ends = np.cumsum(seq.patch_lengths)
    total = 0.0
    for t in range(seq.first_scored, len(seq.tokens)):
        keep = int(np.searchsorted(ends, t + 1)) + 1  # patches touching tokens 0..t
        lengths = seq.patch_lengths[:keep].copy()
        lengths[-1] -= ends[keep - 1] - (t + 1)
        tokens = torch.from_numpy(seq.tokens[:t].astype(np.int64))[None]
        with torch.no_grad():
            logits = model(tokens, torch.from_numpy(lengths)[None])  # [1, t, V]
        total += torch.log_softmax(logits[0, -1].double(), -1)[int(seq.tokens[t])].item()
    return total


@pytest.mark.parametrize("kind,patcher", [("lst", STATIC), ("lst", ALIGNED), ("baseline", STATIC)],
                         ids=["lst-static", "lst-aligned", "baseline"])
@pytest.mark.parametrize("mode", ["S->S", "T->S", "S->T"])
def test_one_forward_equals_incremental_next_token_logprobs(items, models, kind, patcher, mode):
    model = models[kind]
    scores = score_items([model], items[:2], vocab(), patcher, mode, batch_size=2)
    for row, (item, ending) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        seq = build_sequence(items[item], ending, mode, vocab(), patcher)
        expected = incremental_logprob(model, seq)
        assert abs(scores.logprob[row] - expected) < 1e-4 * max(1.0, abs(expected))
        assert scores.num_tokens[row] == len(seq.tokens) - seq.first_scored


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_scores_are_deterministic_and_independent_of_batching(items, models, kind):
    first = score_items([models[kind]], items, vocab(), STATIC, "S->S", batch_size=3)
    again = score_items([models[kind]], items, vocab(), STATIC, "S->S", batch_size=3)
    np.testing.assert_array_equal(first.logprob, again.logprob)
    one_by_one = score_items([models[kind]], items, vocab(), STATIC, "S->S", batch_size=1)
    np.testing.assert_allclose(one_by_one.logprob, first.logprob, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(first.item_offsets, [0, 2, 4, 6, 8, 10, 14, 18])


@pytest.mark.parametrize("kind,patcher", [("lst", STATIC), ("lst", ALIGNED), ("baseline", STATIC)],
                         ids=["lst-static", "lst-aligned", "baseline"])
def test_padding_never_changes_a_score_in_any_mode(items, models, kind, patcher):
    """Ragged items (contexts of 14-40 units, 2 or 4 endings) in batches of 3 that split them:
    each row is padded to the longest of its batch, and every score equals the row scored
    alone."""
    for mode in MODES:
        batched = score_items([models[kind]], items, vocab(), patcher, mode, batch_size=3)
        alone = score_items([models[kind]], items, vocab(), patcher, mode, batch_size=1)
        np.testing.assert_allclose(batched.logprob, alone.logprob, rtol=1e-5, atol=1e-4,
                                   err_msg=mode)
        np.testing.assert_array_equal(batched.num_tokens, alone.num_tokens, err_msg=mode)


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_document_rules_leave_the_scores_of_one_document_sequences(items, models, kind):
    """lst-eval scores one document per sequence (no EOS; padding is the pad id): a model with
    the packed-document rules (--reset-attention-mask, and --reset-position-ids for LST) scores
    every mode as without them."""
    model, plain = models[kind], models[kind].lst_config
    rules = DocumentMaskingConfig(vocab().eos_id, reset_position_ids=kind == "lst")
    for mode in ("S->S", "T->S"):
        without = score_items([model], items, vocab(), STATIC, mode, batch_size=3)
        model.lst_config = dataclasses.replace(plain, documents=rules)
        try:
            masked = score_items([model], items, vocab(), STATIC, mode, batch_size=3)
        finally:
            model.lst_config = plain
        np.testing.assert_allclose(masked.logprob, without.logprob, rtol=1e-5, atol=1e-5)


def test_accuracy_from_scores():
    scores = ModeScores("T->T", logprob=np.array([-3.0, -4.0, -10.0, -9.0, -1.0, -2.0, -3.0]),
                        num_tokens=np.array([1, 2, 10, 3, 1, 1, 1]),
                        item_offsets=np.array([0, 2, 4, 7]), labels=np.array([0, 0, 2]),
                        truncated=np.zeros(3, bool), beyond_context=np.zeros(3, bool))
    assert scores.correct().tolist() == [True, False, False]
    # Per token: item 0 -3 vs -2 -> ending 1; item 1 -1 vs -3 -> ending 0.
    assert scores.correct(normalised=True).tolist() == [False, True, False]


def test_evaluate_items_reports_every_mode_and_restores_train_mode(items, models):
    model = models["lst"].train()
    curriculum = Patcher(PatchingConfig("curriculum", patch_size=3, aligned_until_step=1,
                                        static_from_step=2))
    results = evaluate_items([model], items, vocab(), curriculum, list(MODES), batch_size=4,
                             bootstrap_resamples=200)
    assert model.training
    model.eval()
    static = score_items([model], items, vocab(), STATIC, "S->T", batch_size=4)
    assert results["S->T"]["accuracy"] == static.correct().mean()
    for summary in results.values():
        assert summary["num_items"] == len(items)
        assert summary["accuracy_ci_low"] <= summary["accuracy"] <= summary["accuracy_ci_high"]
    assert flatten_results(results)["eval/T->T/accuracy"] == results["T->T"]["accuracy"]


def test_items_that_cannot_be_scored(items, models):
    text_only = items_of([{"id": "t", "context": {"text": "the dog"},
                           "endings": [{"text": "sat"}, {"text": "ran"}], "label": 1}])
    assert score_items([models["lst"]], text_only, vocab(), STATIC, "T->T", 1).logprob.shape == (2,)
    with pytest.raises(ItemError, match="item 't' .*cannot be scored S->T"):
        score_items([models["lst"]], text_only, vocab(), STATIC, "S->T", 1)
    record = random_records(4, 1)[0]
    del record["endings"][1]["segments"]
    unaligned = items_of([record])
    score_items([models["lst"]], unaligned, vocab(), STATIC, "S->S", 1)
    with pytest.raises(ItemError, match="ending 1: aligned patching needs \"segments\""):
        score_items([models["lst"]], unaligned, vocab(), ALIGNED, "T->S", 1)
    # Found before any scoring: lst-eval and training check the items of every mode up front.
    with pytest.raises(ItemError, match="ending 1: aligned patching needs \"segments\" .* to "
                                        "score it T->S"):
        check_items_for_mode(unaligned, "T->S", ALIGNED.config)
    check_items_for_mode(unaligned, "S->T", ALIGNED.config)  # the ending is text
    check_items_for_mode(unaligned, "T->S", PatchingConfig("mixed", patch_size=3))


def test_a_model_that_scores_nan_is_refused(items, single_rank):
    """A diverged checkpoint's NaN log-probabilities were scored: argmax takes the first NaN
    for the best ending, so its accuracy was the share of items labelled 0, silently."""
    model = tiny_model("lst", vocab().size, seed=3)
    with torch.no_grad():
        model.output_layer.weight[vocab().text_marker + 3] = float("nan")
    with pytest.raises(ValueError, match=r"S->S: the model gives 18 of 18 endings a "
                                         r"log-probability that is not a number \(the first: "
                                         r"item 'item-0-0' \(test:0\), ending 0\); its weights "
                                         r"hold NaN or inf"):
        score_items([model], items, vocab(), STATIC, "S->S", 3)


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_items_longer_than_the_context_are_counted_and_named(items, single_rank, kind, caplog):
    """They were scored, silently, past the context the model was built for (RoPE has no cap)."""
    needed = [max(len(s.patch_lengths) if kind == "lst" else len(s.tokens) - 1
                  for s in (build_sequence(item, e, "S->S", vocab(), STATIC)
                            for e in range(len(item.endings)))) for item in items]
    longest = max(needed)
    fits = tiny_model(kind, vocab().size, seed=3, max_sequence_length=longest)
    results = evaluate_items([fits], items, vocab(), STATIC, ["S->S"], 4, 100)
    assert results["S->S"]["num_items_beyond_context"] == 0 and not caplog.records
    short = tiny_model(kind, vocab().size, seed=3, max_sequence_length=longest - 1)
    results = evaluate_items([short], items, vocab(), STATIC, ["S->S"], 4, 100)
    assert results["S->S"]["num_items_beyond_context"] == needed.count(longest)
    first = items[needed.index(longest)]
    [warning] = caplog.records
    assert warning.getMessage().startswith(
        f"S->S: {needed.count(longest)} of {len(items)} items need more global positions than "
        f"the model's context of {longest - 1} (--max-position-embeddings), the first, "
        f"{first.describe()}, needs {longest}; they are scored past the context")


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_a_cut_context_fits_the_model_and_keeps_every_scored_token(items, single_rank, kind):
    """The cut starts at a patch, keeps the token before it as a patch of one (a training row's
    head), drops the fewest whole patches that make it fit and no scored token; a sequence that
    does not fit even cut just before its ending is None."""
    model = tiny_model(kind, vocab().size, seed=3)

    def positions(sequence):
        return len(sequence.patch_lengths) if kind == "lst" else len(sequence.tokens) - 1

    def cut_at(whole, patch):  # the sequence from patch `patch` on, with its head token
        start = int(np.cumsum(whole.patch_lengths)[patch - 1])
        return ScoredSequence(whole.tokens[start - 1:], whole.first_scored - (start - 1),
                              np.concatenate([[1], whole.patch_lengths[patch:]]).astype(np.int32))

    cut_some = too_long = 0
    for context, item in ((c, i) for c in (10, 3) for i in items):
        for ending in range(len(item.endings)):
            whole = build_sequence(item, ending, "S->S", vocab(), STATIC)
            cut = cut_context(whole, context, model)
            if positions(whole) <= context:
                assert cut is whole
                continue
            starts = list(np.cumsum(whole.patch_lengths) - whole.patch_lengths)
            allowed = [k for k in range(1, len(starts)) if starts[k] <= whole.first_scored]
            if cut is None:
                assert positions(cut_at(whole, allowed[-1])) > context
                too_long += 1
                continue
            cut_some += 1
            assert positions(cut) <= context and cut.patch_lengths[0] == 1
            dropped = len(whole.tokens) - len(cut.tokens)
            patch = starts.index(dropped + 1)
            np.testing.assert_array_equal(cut.tokens, cut_at(whole, patch).tokens)
            np.testing.assert_array_equal(cut.patch_lengths, cut_at(whole, patch).patch_lengths)
            np.testing.assert_array_equal(cut.tokens[cut.first_scored:],
                                          whole.tokens[whole.first_scored:])
            assert patch == allowed[0] or positions(cut_at(whole, patch - 1)) > context
    assert cut_some and too_long  # both cases ran


def test_a_cut_after_empty_leading_patches_keeps_the_token_before_it(single_rank):
    """A cut at a patch that starts at token 0 has no token before it: it took the last token
    alone (tokens[-1:]), dropping the scored ones."""
    model = tiny_model("lst", vocab().size, seed=3)
    sequence = ScoredSequence(np.arange(6, dtype=np.int32), 4, np.array([0, 0, 2, 2, 2], np.int32))
    cut = cut_context(sequence, 4, model)
    np.testing.assert_array_equal(cut.tokens, np.arange(1, 6))  # token 1 is the head
    np.testing.assert_array_equal(cut.patch_lengths, [1, 2, 2])
    assert cut.first_scored == 3


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_truncated_items_are_scored_on_their_cut_sequences(items, single_rank, kind, caplog):
    model = tiny_model(kind, vocab().size, seed=3, max_sequence_length=12)
    whole = evaluate_items([model], items, vocab(), STATIC, ["T->T"], 4, 100)["T->T"]
    cut = evaluate_items([model], items, vocab(), STATIC, ["T->T"], 4, 100,
                         truncate_context=True)["T->T"]
    assert whole["num_items_truncated"] == 0 and whole["num_items_beyond_context"] > 0
    assert cut["num_items_truncated"] > 0
    assert cut["num_items_beyond_context"] < whole["num_items_beyond_context"]
    scores = score_items([model], items, vocab(), STATIC, "T->T", 4, truncate_context=True)
    expected = []
    for item in items:
        for ending in range(len(item.endings)):
            sequence = build_sequence(item, ending, "T->T", vocab(), inference_patcher(STATIC.config))
            sequence = cut_context(sequence, 12, model) or sequence
            expected.append(ending_logprobs([model], collate([sequence])).item())
    np.testing.assert_allclose(scores.logprob, expected, rtol=1e-5, atol=1e-5)


# --- an independent scorer, from the rule docs/evaluation.md#scoring states -----------------

def documented_sequence(record: dict, ending: int, mode: str) -> tuple[list[int], int]:
    """The joint ids of one (item, ending) in `mode` as the docs' table lays them out, and where
    the ending's own tokens start; from the JSON record, not from `EvalItem`."""
    v, pieces = vocab(), tokenizer().encode
    context, candidate = record["context"], record["endings"][ending]
    context_speech, ending_speech = mode[0] == "S", mode[-1] == "S"
    ids = [v.bos_id, v.speech_marker if context_speech else v.text_marker]
    ids += ([v.unit_offset + u for u in context["units"]] if context_speech
            else pieces(context["text"]))
    if context_speech and not ending_speech:
        ids.append(v.text_marker)
    if ending_speech and not context_speech:
        ids += [tokenizer().space_id, v.speech_marker]
    start = len(ids)
    ids += ([v.unit_offset + u for u in candidate["units"]] if ending_speech
            else pieces(candidate["text"]))
    return ids, start


def documented_score(model, record: dict, ending: int, mode: str,
                     patch_size: int | None) -> tuple[float, int]:
    """Sum over the ending's tokens of the next-token log-prob of the prefix before each, the
    prefix patched as generation patches it; and the number of those tokens."""
    from megatron_lst.evaluation.generation import generation_patch_lengths

    ids, start = documented_sequence(record, ending, mode)
    total = 0.0
    for t in range(start, len(ids)):
        prefix = np.asarray(ids[:t])
        lengths = torch.from_numpy(generation_patch_lengths(prefix, vocab(), patch_size))[None]
        with torch.no_grad():
            logits = model(torch.from_numpy(prefix.astype(np.int64))[None], lengths)
        total += torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
    return total, len(ids) - start


def documented_interval(correct: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The 95% percentile bootstrap: `resamples` draws of n items with replacement."""
    picks = np.random.default_rng(seed).integers(0, len(correct), size=(resamples, len(correct)))
    low, high = np.percentile(correct[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def crafted_records() -> list[dict]:
    """Three and four endings, a one-unit ending, a context a whole number of patches long, an
    ending that is a prefix of another, and two identical endings (a tie goes to the first)."""
    records = random_records(11, 2, num_endings=3) + random_records(12, 1, num_endings=4)
    records[0]["endings"][1] = {"text": "sat", "units": [7]}
    records[1]["context"] = {"text": "the dog ran", "units": [1, 2, 3, 4, 5, 6]}
    records[1]["endings"][2] = {"text": records[1]["endings"][0]["text"] + " home",
                                "units": records[1]["endings"][0]["units"] + [9, 9]}
    records[2]["endings"][3] = records[2]["endings"][1]
    records[2]["label"] = 3
    return records


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_lst_eval_scores_by_the_documented_rule(models, kind):
    records, seed, resamples = crafted_records(), 5, 300
    scored = items_of(records)
    patch_size = STATIC.config.patch_size if kind == "lst" else None
    for mode in MODES:
        scores = score_items([models[kind]], scored, vocab(), STATIC, mode, batch_size=2)
        expected = [documented_score(models[kind], r, e, mode, patch_size)
                    for r in records for e in range(len(r["endings"]))]
        np.testing.assert_allclose(scores.logprob, [s for s, _ in expected], rtol=1e-4,
                                   atol=1e-4, err_msg=mode)
        np.testing.assert_array_equal(scores.num_tokens, [n for _, n in expected], err_msg=mode)
        summary = summarise(scores, resamples, seed)
        for suffix, per_token in (("", False), ("_normalised", True)):
            rows = iter([s / n if per_token else s for s, n in expected])
            choices = [int(np.argmax([next(rows) for _ in r["endings"]])) for r in records]
            correct = np.array(choices) == [r["label"] for r in records]
            assert summary[f"accuracy{suffix}"] == correct.mean(), (mode, suffix)
            low, high = documented_interval(correct.astype(float), resamples, seed)
            assert summary[f"accuracy{suffix}_ci_low"] == pytest.approx(low), (mode, suffix)
            assert summary[f"accuracy{suffix}_ci_high"] == pytest.approx(high), (mode, suffix)


def test_lst_and_baseline_count_the_same_tokens(models):
    scored = items_of(crafted_records())
    for mode in MODES:
        lst, baseline = (score_items([models[kind]], scored, vocab(), STATIC, mode, 3)
                         for kind in ("lst", "baseline"))
        np.testing.assert_array_equal(lst.num_tokens, baseline.num_tokens, err_msg=mode)
