"""The joint vocabulary, text tokenizers and the interleaved speech-text codec."""

from megatron_lst.tokenizer.interleaved import InterleavedCodec
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer, joint_vocab, load_text_tokenizer
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError

__all__ = ["InterleavedCodec", "JointVocab", "TextTokenizer", "VocabularyError", "joint_vocab",
           "load_text_tokenizer"]
