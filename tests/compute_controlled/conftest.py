"""The study's modules live in examples/compute_controlled/ (a script folder, not a package)."""

import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parents[2] / "examples" / "compute_controlled"
if str(STUDY_DIR) not in sys.path:
    sys.path.insert(0, str(STUDY_DIR))


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 300-piece SentencePiece model (seconds to train), for plans that read a tokenizer."""
    from megatron_lst.tokenizer.text_tokenizer import train_sentencepiece

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5)) + f" {i}."
                 for i in range(400)]
    return train_sentencepiece(sentences, tmp_path_factory.mktemp("spm") / "spm.model", 300)
