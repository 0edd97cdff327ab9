import numpy as np
import pytest

from megatron_lst.demo_corpus.tts import SynthesisError, Voice


def test_each_token_gets_ordered_times_inside_the_audio(synthesizer):
    text = "Once upon a time, there was a little girl named Lily. She loved her red ball."
    out = synthesizer.synthesize(text, Voice("en-us+m3"))
    assert [w.word for w in out.words] == text.split(" ")
    starts = np.array([w.start for w in out.words])
    ends = np.array([w.end for w in out.words])
    assert (ends >= starts).all() and (starts[1:] >= ends[:-1]).all()
    assert 0 <= starts[0] and ends[-1] <= out.duration
    assert 3.0 < out.duration < 7.0 and out.sample_rate == 22050
    assert out.audio.dtype == np.float32 and 0.05 < np.abs(out.audio).max() <= 1.0
    # The sentence break is a pause: "Lily." ends well before "She" starts.
    lily, she = out.words[10], out.words[11]
    assert she.start - lily.end > 0.1


def test_words_reported_as_one_event_share_its_time_by_characters(synthesizer):
    # eSpeak reports "there was" as one WORD event.
    out = synthesizer.synthesize("there was a cat", Voice("en-us+m3"))
    there, was = out.words[0], out.words[1]
    assert there.end == pytest.approx(was.start)
    assert (there.end - there.start) / (was.end - was.start) == pytest.approx(5 / 3, rel=1e-6)


def test_voices_are_different_speakers(synthesizer):
    def pitch_hz(audio, rate):  # strongest autocorrelation lag between 70 and 400 Hz
        x = audio[: rate // 2] - audio[: rate // 2].mean()
        corr = np.correlate(x, x, "full")[len(x) - 1:]
        lo, hi = rate // 400, rate // 70
        return rate / (lo + int(np.argmax(corr[lo:hi])))

    male = synthesizer.synthesize("aaah", Voice("en-us+m3"))
    female = synthesizer.synthesize("aaah", Voice("en+f2"))
    assert pitch_hz(female.audio, 22050) > 1.3 * pitch_hz(male.audio, 22050)


def test_bad_inputs_raise(synthesizer):
    with pytest.raises(SynthesisError, match="no voice"):
        synthesizer.synthesize("hello", Voice("xx-nonexistent"))
    with pytest.raises(SynthesisError, match="single spaces"):
        synthesizer.synthesize("two  spaces", Voice())
