"""A seeded generator of short, simple English stories with checkable endings (TinyStories-like).

Each story follows one of a few plots (a lost toy, a lost pet, learning a skill, a gift, cooking)
with characters, places, objects and events drawn from small pools, and ends with a sentence that
names facts of the story (who, which object, which colour ...). A *wrong* ending is the same
sentence with one of those facts replaced by another value of the same kind that the story never
mentions: locally fluent, but it contradicts the context. Because the replaced value is drawn from
the same pool as the right one, a model that reads only the endings cannot tell them apart.

Text is written naturally (capitals, punctuation) for speech synthesis; `normalize_words` gives
the lowercase word sequence (no punctuation) that the corpus stores, as in the reference's MLS data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GIRLS = ("Lily", "Mia", "Anna", "Sara", "Emma", "Lucy", "Zoe", "Ella", "Rose", "Amy", "Kate", "Nina")
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Jake", "Noah", "Dan", "Alex")
ANIMALS = ("dog", "cat", "bird", "rabbit", "duck", "frog", "puppy", "kitten", "horse", "goat")
PET_NAMES = ("Spot", "Fluffy", "Buddy", "Coco", "Sunny", "Pip", "Daisy", "Rex", "Milo", "Bella")
TOYS = ("ball", "kite", "hat", "book", "doll", "truck", "boat", "drum", "bag", "car")
GIFTS = ("card", "crown", "picture", "necklace", "basket", "mask", "puppet", "scarf", "flag", "bowl")
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white", "black")
PLACES = ("park", "beach", "garden", "forest", "farm", "lake", "zoo", "hill", "market", "river")
SPOTS = ("under a big tree", "behind a rock", "in the tall grass", "near the old fence",
         "under a bench", "next to the pond", "inside a bush", "by the gate")
PARENTS = ("mom", "dad", "grandma", "grandpa", "aunt", "uncle")
SKILLS = ("swim", "dance", "sing", "draw", "skate", "climb", "read", "paint", "whistle", "juggle")
FOODS = ("cake", "pie", "soup", "bread", "pizza", "salad", "stew", "pancake", "pudding", "tart")
TIMES = ("morning", "afternoon", "evening")
FILLERS = ("The sun was shining.", "The sky was blue and clear.", "A soft wind was blowing.",
           "Birds were singing in the trees.", "It was a warm day.", "It was a cold day.")

# The pool each checkable fact is drawn from; names keep the character's gender.
POOLS = {"color": COLORS, "toy": TOYS, "gift": GIFTS, "animal": ANIMALS, "pet": PET_NAMES,
         "skill": SKILLS, "food": FOODS, "parent": PARENTS, "place": PLACES}


class StoryError(ValueError):
    """A story request that the generator cannot satisfy."""


@dataclass(frozen=True)
class Story:
    id: str
    plot: str
    context: tuple[str, ...]
    """Sentences before the ending."""
    ending: str
    wrong_endings: tuple[str, ...]
    """Endings contradicting the context, each with one fact changed, all distinct."""
    redrawn_endings: tuple[str, ...]
    """Endings with all checkable facts drawn afresh (as for another story of the same plot),
    each contradicting the context, all distinct. Unlike one-fact changes, several of these
    together do not single out the right ending as the one they all share most words with."""

    @property
    def text(self) -> str:
        return " ".join(self.context + (self.ending,))


def normalize_words(text: str) -> list[str]:
    """Lowercase words of `text`: letters, digits and inner apostrophes; punctuation dropped."""
    words = []
    for token in text.split():
        word = re.sub(r"[^a-z0-9']", "", token.lower()).strip("'")
        if word:
            words.append(word)
    return words


@dataclass
class _Draft:
    """Facts of one story and how to write its ending from them."""

    facts: dict[str, str]
    context: list[str]
    ending_template: str
    changeable: tuple[str, ...]
    """Facts of the plot that a wrong ending may change (where its ending names them)."""

    @property
    def checkable(self) -> tuple[str, ...]:
        """The changeable facts this story's ending names."""
        return tuple(k for k in self.changeable if "{" + k + "}" in self.ending_template)

    def ending(self, facts: dict[str, str]) -> str:
        return self.ending_template.format_map(facts)


def _pick(rng: np.random.Generator, pool, exclude=()) -> str:
    choices = [v for v in pool if v not in exclude]
    return choices[rng.integers(len(choices))]


def _hero(rng, facts: dict[str, str], key: str, exclude=()) -> None:
    girl = rng.random() < 0.5
    facts[key] = _pick(rng, GIRLS if girl else BOYS, exclude)
    facts[key + "_pool"] = "girls" if girl else "boys"
    if key == "hero":
        facts.update(she="she" if girl else "he", her="her" if girl else "his",
                     her_obj="her" if girl else "him", She="She" if girl else "He",
                     Her="Her" if girl else "His")


def _one_of(rng, *options: str) -> str:
    return options[rng.integers(len(options))]


def _lost_toy(rng) -> _Draft:
    f: dict[str, str] = {}
    _hero(rng, f, "hero")
    _hero(rng, f, "friend", exclude=(f["hero"],))
    f.update(color=_pick(rng, COLORS), toy=_pick(rng, TOYS), place=_pick(rng, PLACES),
             spot=_pick(rng, SPOTS), parent=_pick(rng, PARENTS), time=_pick(rng, TIMES))
    ctx = [
        _one_of(rng, "{hero} had a {color} {toy}.", "{hero} got a new {color} {toy} from {her} {parent}."),
        _one_of(rng, "{She} loved it very much.", "It was {her} favorite toy.", "{She} took it everywhere."),
        _one_of(rng, "One {time}, {hero} took the {toy} to the {place}.",
                "One {time}, {hero} went to the {place} with the {toy}."),
        _one_of(rng, "{She} played there with {her} friend {friend} all day.",
                "At the {place}, {she} met {her} friend {friend} and they played for a long time."),
        _one_of(rng, "When it was time to go home, the {toy} was gone.",
                "Then {hero} looked around, but the {toy} was not there."),
        _one_of(rng, "{hero} was very sad.", "{hero} began to cry.", "{hero} felt worried."),
        _one_of(rng, "{friend} wanted to help, so they looked everywhere.",
                "{friend} said that they would find it together."),
    ]
    ending = _one_of(rng, "At last, {friend} found the {color} {toy} {spot}, and {hero} was happy again.",
                     "Soon they found the {color} {toy} {spot}, and {hero} hugged {friend}.")
    return _Draft(f, ctx, ending, ("color", "toy", "friend", "hero"))


def _lost_pet(rng) -> _Draft:
    f: dict[str, str] = {}
    _hero(rng, f, "hero")
    f.update(animal=_pick(rng, ANIMALS), pet=_pick(rng, PET_NAMES), place=_pick(rng, PLACES),
             parent=_pick(rng, PARENTS), time=_pick(rng, TIMES))
    ctx = [
        _one_of(rng, "{hero} had a little {animal} named {pet}.", "{hero} had a pet {animal} called {pet}."),
        _one_of(rng, "{pet} liked to play at the {place}.", "Every day, {hero} and {pet} went to the {place}."),
        _one_of(rng, "One {time}, {pet} ran after a butterfly and did not come back.",
                "One {time}, {pet} heard a loud noise and ran away."),
        _one_of(rng, "{hero} called {pet} again and again.", "{hero} looked for {pet} but could not find it."),
        _one_of(rng, "{She} asked {her} {parent} for help.", "{Her} {parent} came to help."),
        _one_of(rng, "They looked all around the {place}.", "They walked all over the {place}."),
    ]
    ending = _one_of(rng, "Then they heard a happy sound, and {pet} the {animal} ran back to {hero}.",
                     "At last, {hero} saw {pet} the {animal} and took it home with {her} {parent}.")
    return _Draft(f, ctx, ending, ("pet", "animal", "hero", "parent"))


def _learn_skill(rng) -> _Draft:
    f: dict[str, str] = {}
    _hero(rng, f, "hero")
    f.update(skill=_pick(rng, SKILLS), place=_pick(rng, PLACES), parent=_pick(rng, PARENTS))
    ctx = [
        _one_of(rng, "{hero} wanted to learn to {skill}.", "{hero} wished {she} could {skill} well."),
        _one_of(rng, "But it was hard at first, and {she} made many mistakes.",
                "At first {she} was not good at it."),
        _one_of(rng, "Every day, {hero} practiced at the {place}.", "{She} went to the {place} to practice every day."),
        _one_of(rng, "{Her} {parent} told {her_obj} to never give up.", "{Her} {parent} helped {her_obj} every day."),
        _one_of(rng, "{hero} tried again and again.", "{hero} did not stop trying."),
    ]
    ending = _one_of(rng, "Now {hero} can {skill} very well, and {her} {parent} is proud.",
                     "In the end, {hero} learned to {skill}, and {she} thanked {her} {parent}.")
    return _Draft(f, ctx, ending, ("skill", "parent", "hero"))


def _gift(rng) -> _Draft:
    f: dict[str, str] = {}
    _hero(rng, f, "hero")
    _hero(rng, f, "friend", exclude=(f["hero"],))
    f.update(color=_pick(rng, COLORS), gift=_pick(rng, GIFTS))
    ctx = [
        _one_of(rng, "It was almost the birthday of {friend}.", "Soon it would be the birthday of {friend}."),
        _one_of(rng, "{hero} wanted to make a special gift.", "{hero} wanted to give {friend} something nice."),
        _one_of(rng, "{She} found some paper, glue and {color} paint.", "{She} got out {her} {color} paint."),
        _one_of(rng, "{hero} worked very hard to make a {color} {gift}.", "{She} made a {color} {gift} all by {her_obj}self."),
        _one_of(rng, "Then {she} put it in a box and walked to the house of {friend}.",
                "Then {she} wrapped it up and went to see {friend}."),
    ]
    ending = _one_of(rng, "{friend} opened the box, saw the {color} {gift}, and gave {hero} a big hug.",
                     "{friend} loved the {color} {gift} and said thank you to {hero}.")
    return _Draft(f, ctx, ending, ("friend", "color", "gift", "hero"))


def _cooking(rng) -> _Draft:
    f: dict[str, str] = {}
    _hero(rng, f, "hero")
    f.update(food=_pick(rng, FOODS), parent=_pick(rng, PARENTS), time=_pick(rng, TIMES))
    ctx = [
        _one_of(rng, "{hero} and {her} {parent} wanted to make a {food}.",
                "One {time}, {hero} asked {her} {parent} to make a {food} together."),
        _one_of(rng, "They got out a big bowl and a spoon.", "They put everything they needed on the table."),
        _one_of(rng, "{hero} helped to mix everything.", "{hero} stirred and stirred."),
        _one_of(rng, "Then they put the {food} in the oven.", "Then the {food} went into the hot oven."),
        _one_of(rng, "Soon the whole house smelled very good.", "They waited and cleaned the kitchen."),
    ]
    ending = _one_of(rng, "At dinner, everyone ate the {food}, and {hero} thanked {her} {parent}.",
                     "The {food} was the best one ever, and {hero} hugged {her} {parent}.")
    return _Draft(f, ctx, ending, ("food", "parent", "hero"))


PLOTS: dict[str, Callable[[np.random.Generator], _Draft]] = {
    "lost_toy": _lost_toy, "lost_pet": _lost_pet, "learn_skill": _learn_skill, "gift": _gift,
    "cooking": _cooking,
}


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _changed(draft: _Draft, key: str, rng) -> dict[str, str]:
    """The facts with `key` replaced by a pool value that the story never mentions."""
    facts = dict(draft.facts)
    mentioned = set(normalize_words(" ".join(draft.context)))
    if key in ("hero", "friend"):
        pool = GIRLS if facts[key + "_pool"] == "girls" else BOYS
    else:
        pool = POOLS[key]
    unused = [v for v in pool if v.lower() not in mentioned]
    facts[key] = _pick(rng, unused)
    return facts


def _redrawn(draft: _Draft, plot: str, rng) -> dict[str, str]:
    """The facts with every checkable one taken from a fresh draft of the same plot."""
    fresh = PLOTS[plot](rng).facts
    facts = dict(draft.facts)
    for key in draft.checkable:
        facts[key] = fresh[key]
        if key in ("hero", "friend"):
            facts[key + "_pool"] = fresh[key + "_pool"]
    if "hero" in draft.checkable:  # pronouns follow the hero
        for key in ("she", "her", "her_obj", "She", "Her"):
            facts[key] = fresh[key]
    return facts


def _distinct_endings(draft: _Draft, ending: str, num: int, make_facts, what: str) -> list[str]:
    """`num` distinct endings other than `ending`, from `make_facts(attempt)`."""
    endings: list[str] = []
    for attempt in range(20 * num):
        candidate = _capitalize(draft.ending(make_facts(attempt)))
        if candidate != ending and candidate not in endings:
            endings.append(candidate)
            if len(endings) == num:
                return endings
    raise StoryError(f"could not draw {num} distinct {what} endings of {draft.ending_template!r}")


def generate_story(rng: np.random.Generator, story_id: str, num_wrong: int = 3,
                   filler_prob: float = 0.3) -> Story:
    """One story with `num_wrong` one-fact-changed endings (each changing a different fact first)
    and `num_wrong` redrawn endings."""
    plot = list(PLOTS)[rng.integers(len(PLOTS))]
    draft = PLOTS[plot](rng)
    context = [_capitalize(s.format_map(draft.facts)) for s in draft.context]
    if rng.random() < filler_prob:
        context.insert(int(rng.integers(1, len(context))), _pick(rng, FILLERS))
    draft.context = context
    ending = _capitalize(draft.ending(draft.facts))
    order = list(rng.permutation(draft.checkable))
    wrong = _distinct_endings(draft, ending, num_wrong,
                              lambda i: _changed(draft, order[i % len(order)], rng), "one-fact")
    redrawn = _distinct_endings(draft, ending, num_wrong, lambda i: _redrawn(draft, plot, rng),
                                "redrawn")
    return Story(story_id, plot, tuple(context), ending, tuple(wrong), tuple(redrawn))


def generate_stories(seed: int, count: int, stream: str, num_wrong: int = 3,
                     exclude_texts: frozenset[str] = frozenset()) -> list[Story]:
    """`count` stories from the random stream (seed, stream), skipping texts in `exclude_texts`.

    Different `stream` names give independent stories for the same seed (training vs evaluation).
    """
    stream_id = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([seed, stream_id])
    stories = []
    while len(stories) < count:
        story = generate_story(rng, f"{stream}-{len(stories):06d}", num_wrong)
        if story.text not in exclude_texts:
            stories.append(story)
    return stories
