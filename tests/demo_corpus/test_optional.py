import sys

import pytest

from megatron_lst.demo_corpus.optional import INSTALL_HINT, MissingDependencyError, require


def test_missing_module_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(MissingDependencyError) as error:
        require("sklearn.cluster", "fitting the unit codebook")
    message = str(error.value)
    assert "'scikit-learn'" in message and INSTALL_HINT in message
    assert INSTALL_HINT == "pip install 'megatron-lst[data]'"


def test_synthesizer_without_espeakng_loader_says_what_to_install(monkeypatch):
    from megatron_lst.demo_corpus.tts import EspeakSynthesizer

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(MissingDependencyError, match=r"espeakng-loader.*megatron-lst\[data\]"):
        EspeakSynthesizer()


def test_present_module_is_returned():
    assert require("json", "anything").dumps([1]) == "[1]"
