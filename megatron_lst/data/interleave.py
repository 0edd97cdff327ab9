"""On-the-fly interleaving of an aligned document into one token sequence (docs/data.md#interleaving).

A document's words are laid out as alternating text blocks and speech blocks. The layout is drawn
per (seed, epoch, document) by the caller's generator, so every epoch sees a new layout and the same
(seed, epoch, document) always gives the same one. The distribution is the reference
implementation's (neillu23/lst, `_get_word_type_length`), counted in words; silence segments are
not words:

- the first block is text or speech with probability 1/2;
- a text block has `randint(lo, hi)` words, both ends included, with
  `hi = max(2, min(30, int(0.6 * num_words)))` and `lo = max(2, min(5, hi))`;
- a speech block after a text block has `max(2, int(0.5 * previous text words))` words; a speech
  block that opens the document has `randint(max(2, int(0.5 * lo)), max(2, int(0.5 * hi)))`;
- the last block is cut to the words left; if it is left with fewer than 3 words (and is not the
  only block) those words join the block before it, which keeps its modality.

With `speech_only_fraction` f > 0 (not the reference's default), a document is first laid out as
one speech block with probability f: speech-only data, as the reference's pure speech ("sep")
mode reads it, from the same aligned documents.

Segments of a block: its words, the silences between them and the silences after its last word.
A silence on a block boundary belongs to speech only: a text block drops it; a speech block keeps
ceil(n / 2) of its n units (the half next to the speech: the first half of a trailing silence,
the last half of a leading one); a silence at the very start or end of the document is kept whole.
This is the reference's rule, with one difference: the reference's tokenizer strips one character
too many and silently loses every document's first block; here the first block is kept.

Token layout (`vocab` is the JointVocab):

    BOS, <t>, pieces of block 1 [, space], <s>, units of block 2, ..., EOS

A text block followed by another block ends with the tokenizer's lone word-boundary piece
(`space_id`; the reference encodes "w1 w2 " with a trailing space), so the joint sequence matches
the reference's; pass `space_id=None` for a tokenizer that has no such piece.

A document with no words (only silences) is one speech block. A text-only document is
`BOS, <t>, pieces, EOS` (the reference's text mode also opens with the text marker).

Aligned patching needs the word structure of the speech blocks: `unit_group_lengths [G]` gives, in
token order, the units of each word or silence kept in a speech block (groups with no units are
left out), and `unit_group_is_silence [G]` which of them are silences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_lst.data.documents import AlignedDocument, DocumentError
from megatron_lst.tokenizer.vocab import MODALITY_SPEECH, MODALITY_TEXT, JointVocab


@dataclass(frozen=True)
class InterleaveConfig:
    """The block-length distribution, in words (defaults: the reference and the paper)."""

    min_text_words: int = 5
    max_text_words: int = 30
    speech_to_text_ratio: float = 0.5
    min_block_words: int = 2
    max_text_fraction: float = 0.6
    """A text block has at most this fraction of the document's words."""
    min_last_block_words: int = 3
    """A shorter last block joins the block before it."""
    speech_only_fraction: float = 0.0
    """Share of documents laid out as one speech block (speech-only data)."""

    def __post_init__(self):
        if not 1 <= self.min_text_words <= self.max_text_words:
            raise ValueError(f"need 1 <= min_text_words ({self.min_text_words}) <= "
                             f"max_text_words ({self.max_text_words})")
        if self.min_block_words < 1:
            raise ValueError(f"min_block_words must be >= 1, got {self.min_block_words}")
        if not 0.0 < self.speech_to_text_ratio:
            raise ValueError(f"speech_to_text_ratio must be > 0, got {self.speech_to_text_ratio}")
        if not 0.0 < self.max_text_fraction <= 1.0:
            raise ValueError(f"max_text_fraction must be in (0, 1], got {self.max_text_fraction}")
        if not 0.0 <= self.speech_only_fraction <= 1.0:
            raise ValueError(f"speech_only_fraction must be in [0, 1], got "
                             f"{self.speech_only_fraction}")


@dataclass
class InterleavedDocument:
    """One document as the model reads it, plus what aligned patching needs."""

    tokens: np.ndarray  # [n] int32 joint ids, BOS ... EOS
    modality: np.ndarray  # [n] int8: MODALITY_SPEECH for <s> and units, MODALITY_TEXT otherwise
    unit_mask: np.ndarray  # [n] bool: speech units (not <s>)
    unit_group_lengths: np.ndarray  # [G] int32 units of each kept word/silence, in token order
    unit_group_is_silence: np.ndarray  # [G] bool

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab: JointVocab,
                    unit_group_lengths: np.ndarray | None = None,
                    unit_group_is_silence: np.ndarray | None = None) -> InterleavedDocument:
        """A document of joint ids made elsewhere (an evaluation item, a reference batch).

        Without groups, each speech run is taken as one word (enough for static patching);
        groups without silence flags are all words.
        """
        tokens = np.asarray(tokens, dtype=np.int32)
        vocab.check_ids(tokens, where="InterleavedDocument.from_tokens")
        unit_mask = vocab.is_unit(tokens)
        if unit_group_lengths is None:
            run_starts = unit_mask & ~np.concatenate([[False], unit_mask[:-1]])
            run_ids = np.cumsum(run_starts)[unit_mask]
            unit_group_lengths = np.bincount(run_ids)[1:]
            unit_group_is_silence = None
        if unit_group_is_silence is None:
            unit_group_is_silence = np.zeros(len(unit_group_lengths), dtype=bool)
        if len(unit_group_is_silence) != len(unit_group_lengths):
            raise ValueError(f"{len(unit_group_lengths)} unit groups but "
                             f"{len(unit_group_is_silence)} silence flags; give one flag a group")
        return cls(
            tokens=tokens,
            modality=np.where(vocab.is_patchable_static(tokens), MODALITY_SPEECH,
                              MODALITY_TEXT).astype(np.int8),
            unit_mask=unit_mask,
            unit_group_lengths=np.asarray(unit_group_lengths, dtype=np.int32),
            unit_group_is_silence=np.asarray(unit_group_is_silence, dtype=bool),
        )


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of one document: modality and number of words of each, in order."""

    is_speech: np.ndarray  # [K] bool
    num_words: np.ndarray  # [K] int64, sums to the document's word count


def draw_block_layout(num_words: int, rng: np.random.Generator,
                      config: InterleaveConfig = InterleaveConfig()) -> BlockLayout:
    """Draw the alternating text/speech blocks for a document of `num_words` words (>= 1)."""
    if num_words < 1:
        raise ValueError(f"a block layout needs at least one word, got {num_words}")
    c = config
    # Drawn only when used, so the default's layouts are the reference's draws exactly.
    if c.speech_only_fraction > 0 and rng.random() < c.speech_only_fraction:
        return BlockLayout(np.array([True]), np.array([num_words], dtype=np.int64))
    hi = max(c.min_block_words, min(c.max_text_words, int(num_words * c.max_text_fraction)))
    lo = max(c.min_block_words, min(c.min_text_words, hi))
    speech_lo = max(c.min_block_words, int(c.speech_to_text_ratio * lo))
    speech_hi = max(c.min_block_words, int(c.speech_to_text_ratio * hi))

    # Draw enough text blocks up front: a text block and the speech block after it cover >= lo
    # words, so num_words // lo + 2 pairs always reach the end.
    speech_first = bool(rng.integers(2))
    first_speech = int(rng.integers(speech_lo, speech_hi + 1))
    text = rng.integers(lo, hi + 1, size=num_words // lo + 2)  # [M]
    speech = np.maximum(c.min_block_words, (c.speech_to_text_ratio * text).astype(np.int64))
    lengths = np.stack([text, speech], axis=1).ravel()  # [2M] text, speech, text, ...
    is_speech = np.tile([False, True], len(text))
    if speech_first:
        lengths = np.concatenate([[first_speech], lengths])
        is_speech = np.concatenate([[True], is_speech])
    covered = np.cumsum(lengths)
    num_blocks = int(np.searchsorted(covered, num_words)) + 1  # first block reaching the end
    lengths, is_speech = lengths[:num_blocks].copy(), is_speech[:num_blocks]
    lengths[-1] -= covered[num_blocks - 1] - num_words
    if lengths[-1] < c.min_last_block_words and num_blocks > 1:
        lengths[-2] += lengths[-1]
        lengths, is_speech = lengths[:-1], is_speech[:-1]
    return BlockLayout(is_speech.astype(bool), lengths.astype(np.int64))


class Interleaver:
    """Turns stored documents into token sequences by the rules in the module docstring."""

    def __init__(self, vocab: JointVocab, space_id: int | None,
                 config: InterleaveConfig = InterleaveConfig()):
        if space_id is not None and not 0 <= space_id < vocab.text_size:
            raise ValueError(f"space_id {space_id} is not a text piece id (0..{vocab.text_size - 1})"
                             f"; pass the tokenizer's id of the lone word-boundary piece or None")
        self.vocab = vocab
        self.space_id = space_id
        self.config = config

    def text_document(self, text_ids: np.ndarray) -> InterleavedDocument:
        """`BOS, <t>, pieces, EOS` for a text-only document of piece ids."""
        v = self.vocab
        tokens = np.concatenate([[v.bos_id, v.text_marker], np.asarray(text_ids), [v.eos_id]])
        n = len(tokens)
        return InterleavedDocument(
            tokens=tokens.astype(np.int32),
            modality=np.full(n, MODALITY_TEXT, dtype=np.int8),
            unit_mask=np.zeros(n, dtype=bool),
            unit_group_lengths=np.zeros(0, dtype=np.int32),
            unit_group_is_silence=np.zeros(0, dtype=bool),
        )

    def layout(self, doc: AlignedDocument, layout: BlockLayout | None) -> InterleavedDocument:
        """Lay out `doc` by the given blocks (None: a document without words, one speech block).

        Every block's content is one contiguous slice of the document's pieces or units, so the
        sequence is gathered with one index array: no loop over blocks or tokens.
        """
        v = self.vocab
        silence = doc.is_silence  # [S]
        word_segments = np.flatnonzero(~silence)  # [W]
        text_off = doc.text_offsets()  # [S+1]
        unit_off = doc.unit_offsets()  # [S+1]
        if layout is None:
            if len(word_segments):
                raise ValueError("a document with words needs a block layout")
            layout = BlockLayout(np.array([True]), np.array([0]))
            starts = np.array([0])  # [K] first segment of each block
        else:
            if int(layout.num_words.sum()) != len(word_segments):
                raise ValueError(f"the layout covers {int(layout.num_words.sum())} words but the "
                                 f"document has {len(word_segments)}")
            starts = word_segments[np.cumsum(layout.num_words) - layout.num_words]
            starts[0] = 0  # leading silences belong to the first block
        speech = layout.is_speech  # [K]
        ends = np.append(starts[1:], doc.num_segments)  # [K]
        num_blocks = len(starts)

        # Units each segment keeps [kept_start, kept_end) and the speech block owning it (-1: none).
        seg_block = np.repeat(np.arange(num_blocks), ends - starts)  # [S]
        owner = np.where(speech[seg_block], seg_block, -1)
        kept_start, kept_end = unit_off[:-1].copy(), unit_off[1:].copy()
        # A silence closing block k-1 sits on the boundary with block k: the speech side keeps
        # ceil(n / 2) units, the half next to it.
        boundary = starts[1:] - 1  # [K-1]
        shared = silence[boundary]
        half = doc.seg_unit_len[boundary] - doc.seg_unit_len[boundary] // 2
        tail = shared & speech[:-1]  # the speech block before keeps the first half
        kept_end[boundary[tail]] = kept_start[boundary[tail]] + half[tail]
        head = shared & speech[1:]  # the speech block after keeps the last half
        kept_start[boundary[head]] = kept_end[boundary[head]] - half[head]
        owner[boundary[head]] = np.flatnonzero(head) + 1
        kept = np.where(owner >= 0, kept_end - kept_start, 0)  # [S]
        is_group = kept > 0

        # Each block as three chunks of a source array: marker, content slice, trailing space.
        num_text = len(doc.text_ids)
        source = np.concatenate([
            doc.text_ids, v.units_to_ids(doc.unit_ids, where="interleave"),
            [v.bos_id, v.eos_id, v.text_marker, v.speech_marker,
             self.space_id if self.space_id is not None else 0]])  # space unused when None
        bos_at, eos_at, text_marker_at, speech_marker_at, space_at = (
            num_text + len(doc.unit_ids) + np.arange(5))
        # A speech block's units start in the silence it shares with the block before, if any.
        first_unit = np.concatenate([[0], np.where(head, kept_start[boundary], kept_start[starts[1:]])])
        content_start = np.where(speech, num_text + first_unit, text_off[starts])
        content_end = np.where(speech, num_text + kept_end[ends - 1], text_off[ends])
        has_space = ~speech & (np.arange(num_blocks) < num_blocks - 1) & (self.space_id is not None)
        chunk_start = np.stack([np.where(speech, speech_marker_at, text_marker_at), content_start,
                                np.full(num_blocks, space_at)], axis=1).ravel()  # [3K]
        chunk_len = np.stack([np.ones(num_blocks, np.int64), content_end - content_start,
                              has_space.astype(np.int64)], axis=1).ravel()
        chunk_speech = np.repeat(speech, 3) & (np.arange(3 * num_blocks) % 3 < 2)
        chunk_unit = np.repeat(speech, 3) & (np.arange(3 * num_blocks) % 3 == 1)
        chunk_start = np.concatenate([[bos_at], chunk_start, [eos_at]])
        chunk_len = np.concatenate([[1], chunk_len, [1]])
        chunk_speech = np.concatenate([[False], chunk_speech, [False]])
        chunk_unit = np.concatenate([[False], chunk_unit, [False]])

        # Gather the concatenated ranges [chunk_start, chunk_start + chunk_len).
        first_out = np.cumsum(chunk_len) - chunk_len
        index = np.repeat(chunk_start - first_out, chunk_len) + np.arange(int(chunk_len.sum()))
        return InterleavedDocument(
            tokens=source[index].astype(np.int32),
            modality=np.repeat(np.where(chunk_speech, MODALITY_SPEECH, MODALITY_TEXT),
                               chunk_len).astype(np.int8),
            unit_mask=np.repeat(chunk_unit, chunk_len),
            unit_group_lengths=kept[is_group].astype(np.int32),
            unit_group_is_silence=silence[is_group],
        )

    def __call__(self, doc: AlignedDocument, rng: np.random.Generator) -> InterleavedDocument:
        """Draw a layout for `doc` from `rng` and lay the document out by it."""
        num_words = int((~doc.is_silence).sum())
        if doc.num_segments == 0:
            raise DocumentError("cannot interleave an empty document (no segments)")
        layout = draw_block_layout(num_words, rng, self.config) if num_words else None
        return self.layout(doc, layout)
