"""A word n-gram language model (interpolated absolute discounting), as a context-free baseline.

Scoring each ending of an evaluation item on its own, without the story, shows how much of the
task can be solved without the context: on the StoryCloze-like set it should be near chance.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

BOS = "<s>"
EOS = "</s>"


class NgramLM:
    """P(w | h) = max(c(h w) - d, 0) / c(h) + d * N1+(h .) / c(h) * P(w | shorter h).

    The unigram level is add-one smoothed over the training vocabulary plus one unknown word.
    """

    def __init__(self, sentences: Iterable[Sequence[str]], order: int = 3, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"n-gram order must be at least 1, got {order}")
        self.order, self.discount = order, discount
        # counts[k][history][word] for histories of k words.
        self.counts: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]
        for sentence in sentences:
            words = [BOS] * (order - 1) + list(sentence) + [EOS]
            for i in range(order - 1, len(words)):
                for k in range(order):
                    self.counts[k][tuple(words[i - k:i])][words[i]] += 1
        self.unigrams = self.counts[0][()]
        self.total = sum(self.unigrams.values())
        self.vocab_size = len(self.unigrams) + 1  # + unknown
        self.history_totals = [{h: sum(c.values()) for h, c in level.items()}
                               for level in self.counts]

    def prob(self, word: str, history: Sequence[str]) -> float:
        p = (self.unigrams.get(word, 0) + 1) / (self.total + self.vocab_size)
        for k in range(1, self.order):
            h = tuple(history[len(history) - k:])
            following = self.counts[k].get(h)
            if following is None:
                break
            n = self.history_totals[k][h]
            p = (max(following.get(word, 0) - self.discount, 0.0)
                 + self.discount * len(following) * p) / n
        return p

    def logprob(self, sentence: Sequence[str]) -> float:
        """Natural-log probability of the words and the end of sentence, from a fresh start."""
        words = [BOS] * (self.order - 1) + list(sentence) + [EOS]
        return sum(math.log(self.prob(words[i], words[i - self.order + 1:i]))
                   for i in range(self.order - 1, len(words)))
