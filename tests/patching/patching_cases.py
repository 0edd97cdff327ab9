"""Random interleaved documents built directly (not through the interleaver), for patcher tests."""

import numpy as np

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH, MODALITY_TEXT, JointVocab

VOCAB = JointVocab(text_size=40, num_units=12)


def random_interleaved(rng: np.random.Generator, vocab: JointVocab = VOCAB,
                       max_blocks: int = 6) -> InterleavedDocument:
    """BOS, then 0..max_blocks alternating blocks (random first), then EOS.

    Text block: `<t>` + 1..6 pieces. Speech block: `<s>` + 1..5 groups (words or silences) of
    1..9 units each.
    """
    tokens, modality, unit_mask = [vocab.bos_id], [MODALITY_TEXT], [False]
    groups, silences = [], []
    speech = bool(rng.integers(2))
    for _ in range(int(rng.integers(0, max_blocks + 1))):
        if speech:
            tokens.append(vocab.speech_marker)
            modality.append(MODALITY_SPEECH)
            unit_mask.append(False)
            for _ in range(int(rng.integers(1, 6))):
                n = int(rng.integers(1, 10))
                units = rng.integers(0, vocab.num_units, n)
                tokens.extend((units + vocab.unit_offset).tolist())
                modality.extend([MODALITY_SPEECH] * n)
                unit_mask.extend([True] * n)
                groups.append(n)
                silences.append(bool(rng.random() < 0.4))
        else:
            n = int(rng.integers(1, 7))
            tokens.append(vocab.text_marker)
            tokens.extend(rng.integers(3, vocab.text_size, n).tolist())
            modality.extend([MODALITY_TEXT] * (n + 1))
            unit_mask.extend([False] * (n + 1))
        speech = not speech
    tokens.append(vocab.eos_id)
    modality.append(MODALITY_TEXT)
    unit_mask.append(False)
    return InterleavedDocument(
        tokens=np.array(tokens, dtype=np.int32),
        modality=np.array(modality, dtype=np.int8),
        unit_mask=np.array(unit_mask, dtype=bool),
        unit_group_lengths=np.array(groups, dtype=np.int32),
        unit_group_is_silence=np.array(silences, dtype=bool),
    )


def patch_starts(lengths: np.ndarray) -> np.ndarray:
    """[P] token index where each patch starts."""
    return np.cumsum(lengths) - lengths
