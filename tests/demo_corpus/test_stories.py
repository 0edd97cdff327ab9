import numpy as np
import pytest

from megatron_lst.demo_corpus.eval_sets import EVAL_SETS, endings_only_accuracy, make_text_items
from megatron_lst.demo_corpus.ngram import NgramLM
from megatron_lst.demo_corpus.stories import BOYS, GIRLS, PLOTS, generate_stories, normalize_words


def test_normalize_words():
    assert normalize_words("Once upon a time, Lily's \"red\" ball -- gone!") == [
        "once", "upon", "a", "time", "lily's", "red", "ball", "gone"]


def test_same_seed_same_stories_and_streams_differ():
    a = generate_stories(3, 20, "train")
    assert a == generate_stories(3, 20, "train")
    assert a != generate_stories(4, 20, "train")
    assert {s.text for s in a}.isdisjoint(s.text for s in generate_stories(3, 20, "eval"))


def test_every_plot_appears_and_text_is_ascii():
    stories = generate_stories(0, 200, "train")
    assert {s.plot for s in stories} == set(PLOTS)
    assert all(s.text.isascii() for s in stories)


def test_one_fact_wrong_endings_change_one_word_to_one_the_story_never_names():
    for story in generate_stories(1, 100, "train"):
        right = normalize_words(story.ending)
        context = set(normalize_words(" ".join(story.context)))
        assert len(set(story.wrong_endings)) == len(story.wrong_endings) == 3
        for wrong in story.wrong_endings:
            words = normalize_words(wrong)
            assert len(words) == len(right)
            changed = [(r, w) for r, w in zip(right, words, strict=True) if r != w]
            assert len(changed) == 1, (story.ending, wrong)
            old, new = changed[0]
            assert old in context and new not in context
            # A changed name keeps the gender, so the ending's pronouns stay right.
            for pool in (GIRLS, BOYS):
                names = {n.lower() for n in pool}
                assert (old in names) == (new in names)


def test_redrawn_endings_are_distinct_and_wrong():
    for story in generate_stories(2, 100, "train"):
        assert story.ending not in story.redrawn_endings
        assert len(set(story.redrawn_endings)) == 3


def test_exclude_texts_keeps_held_out_stories_apart():
    train = generate_stories(0, 50, "train")
    evals = generate_stories(0, 50, "train", exclude_texts=frozenset(s.text for s in train[:10]))
    assert {s.text for s in train[:10]}.isdisjoint(s.text for s in evals)


@pytest.fixture(scope="module")
def lm_and_items():
    train = generate_stories(0, 1500, "train")
    sentences = [normalize_words(s) for story in train
                 for s in story.context + (story.ending,)]
    lm = NgramLM(sentences, order=3)
    held_out = generate_stories(0, 400, "eval", exclude_texts=frozenset(s.text for s in train))
    return lm, {name: make_text_items(name, held_out, seed=0) for name in EVAL_SETS}, held_out


def test_items_have_the_right_ending_at_label(lm_and_items):
    _, items, stories = lm_and_items
    for name, n in (("storycloze", 2), ("topic", 2), ("hellaswag", 4)):
        for item, story in zip(items[name], stories, strict=True):
            assert len(item.endings) == n and item.endings[item.label] == story.ending
        labels = np.array([item.label for item in items[name]])
        assert np.bincount(labels, minlength=n).min() > 0.15 * len(labels)


def test_endings_only_ngram_is_near_chance(lm_and_items):
    # 400 items: one standard deviation of a chance-level accuracy is 0.025 (2-way), 0.022 (4-way).
    lm, items, _ = lm_and_items
    assert 0.40 < endings_only_accuracy(lm, items["storycloze"]) < 0.60
    assert 0.40 < endings_only_accuracy(lm, items["topic"]) < 0.60
    assert 0.16 < endings_only_accuracy(lm, items["hellaswag"]) < 0.34


def test_the_context_decides_the_items(lm_and_items):
    """Picking the ending with the fewest words absent from the story solves every set."""
    _, items, _ = lm_and_items
    for name in EVAL_SETS:
        correct = 0
        for item in items[name]:
            context = set(normalize_words(item.context))
            novel = [sum(w not in context for w in normalize_words(e)) for e in item.endings]
            correct += int(np.argmin(novel)) == item.label
        assert correct / len(items[name]) > 0.9, name
