import math

import pytest

from megatron_lst.demo_corpus.ngram import EOS, NgramLM

SENTENCES = [["the", "cat", "sat"], ["the", "dog", "sat"], ["a", "cat", "ran"], ["the", "cat"]]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("history", [[], ["the"], ["the", "cat"], ["never", "seen"]])
def test_probabilities_sum_to_one(order, history):
    lm = NgramLM(SENTENCES, order=order)
    words = list(lm.unigrams) + ["<unk-word>"]  # every training word (EOS included) + unknown
    assert "<s>" not in lm.unigrams and EOS in lm.unigrams
    assert sum(lm.prob(w, ["<s>"] * 2 + history) for w in words) == pytest.approx(1.0, abs=1e-9)


def test_seen_continuations_beat_unseen_ones():
    lm = NgramLM(SENTENCES, order=3)
    assert lm.logprob(["the", "cat", "sat"]) > lm.logprob(["the", "sat", "cat"])
    assert lm.prob("cat", ["<s>", "the"]) > lm.prob("dog", ["<s>", "the"])


def test_logprob_is_the_sum_of_conditional_logs():
    lm = NgramLM(SENTENCES, order=2)
    expected = (math.log(lm.prob("a", ["<s>"])) + math.log(lm.prob("dog", ["a"]))
                + math.log(lm.prob(EOS, ["dog"])))
    assert lm.logprob(["a", "dog"]) == pytest.approx(expected)
