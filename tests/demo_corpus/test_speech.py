import numpy as np
import pytest

from megatron_lst.demo_corpus.speech import SpeechRequest, speakable, synthesize_utterances
from megatron_lst.demo_corpus.tts import Voice
from megatron_lst.demo_corpus.units import MfccFeatures

pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed "
                    "(pip install 'megatron-lst[data]')")


def test_speakable_drops_tokens_without_words_and_folds_to_ascii():
    text, words = speakable("Café -- naïve, “hello” 3:30!")
    assert text == "Cafe naive, hello 3:30!"
    assert words == ["cafe", "naive", "hello", "330"]
    assert len(text.split(" ")) == len(words)


def test_results_do_not_depend_on_workers_or_earlier_utterances(synthesizer):
    synthesizer.synthesize("this process has spoken before", Voice())
    requests = [SpeechRequest(f"u{i}", text, Voice(name))
                for i, (text, name) in enumerate([
                    ("Lily had a red ball.", "en-us+m3"), ("The sun was shining.", "en+f2"),
                    ("Tom looked everywhere.", "en-us+m3"), ("Then they went home.", "en+f2"),
                    ("Ben hugged Mia.", "en-gb-x-rp+m1")])]
    one = synthesize_utterances(requests, MfccFeatures(), workers=1, chunk_size=2)
    two = synthesize_utterances(requests, MfccFeatures(), workers=2, chunk_size=2)
    assert [u.id for u in one] == [r.id for r in requests]
    for a, b in zip(one, two, strict=True):
        assert a.words == b.words and a.duration == b.duration
        np.testing.assert_array_equal(a.features, b.features)
        assert a.features.shape == (int(a.duration * 16000) // 640, 78)
        assert [w.label for w in a.words] == speakable(requests[one.index(a)].text)[1]
