"""Shared fixtures of the demo-corpus tests: one eSpeak synthesiser per test process."""

import pytest


@pytest.fixture(scope="session")
def synthesizer():
    pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed "
                        "(pip install 'megatron-lst[data]')")
    from megatron_lst.demo_corpus.tts import EspeakSynthesizer

    return EspeakSynthesizer()
