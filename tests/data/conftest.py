"""The text tokenizer the readers' tests share: SentencePiece trained on a few words."""

import random

import pytest

from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer, train_sentencepiece

WORDS = "the a of and to in is it speech text model unit word hello world time".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    return load_text_tokenizer(
        train_sentencepiece(corpus, tmp_path_factory.mktemp("spm") / "spm.model", 290))
