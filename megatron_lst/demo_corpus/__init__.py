"""The offline demo corpus: generated stories, eSpeak NG speech, units (k-means of MFCC or HuBERT
features, or eSpeak's phones), word alignments and story-completion evaluation sets (see build.py
for the stages and outputs)."""

from megatron_lst.demo_corpus.build import DemoCorpus, DemoCorpusConfig, build_demo_corpus

__all__ = ["DemoCorpus", "DemoCorpusConfig", "build_demo_corpus"]
