"""Phone units: eSpeak's phonemes per 25 Hz frame, and word times that start at a word's phones."""

import json
from dataclasses import replace

import numpy as np
import pytest

from megatron_lst.data.textgrid import Interval
from megatron_lst.demo_corpus.alignment import segments_from_intervals
from megatron_lst.demo_corpus.phones import PAUSE, PhoneInventory, frame_phones, phone_label
from megatron_lst.demo_corpus.tts import Voice


def test_labels_drop_stress_and_merge_pauses():
    assert [phone_label(n) for n in ("'a", ",a", "a", "@2", "_:", "_", "_!")] == [
        "a", "a", "a", "@2", PAUSE, PAUSE, PAUSE]


def test_each_frame_takes_the_phone_at_its_centre():
    # Frames are 40 ms: centres at 20, 60, 100, 140, 180, 220 ms.
    phones = [Interval(0.03, 0.07, "k"), Interval(0.07, 0.15, "'a"),
              Interval(0.15, 0.19, "t"), Interval(0.19, 0.30, "_:")]
    assert frame_phones(phones, 6) == [PAUSE, "k", "a", "a", "t", PAUSE]
    # Past the last phone's end, and with no phones at all: silence.
    assert frame_phones(phones[:1], 3) == [PAUSE, "k", PAUSE]
    assert frame_phones([], 2) == [PAUSE, PAUSE]


def test_inventory_numbers_pause_first_then_sorted():
    inventory = PhoneInventory(["t", "a", PAUSE, "k", "a"])
    assert inventory.labels == [PAUSE, "a", "k", "t"] and len(inventory) == 4
    np.testing.assert_array_equal(inventory.units(["k", "a", "t", PAUSE]), [2, 1, 3, 0])
    with pytest.raises(KeyError, match=r"\['z'\] are not in the inventory of 4 phones"):
        inventory.units(["a", "z"])


def _word_phones(synthesis, inventory=None):
    """The de-duplicated phone labels inside each word's interval, per word."""
    num_frames = int(synthesis.duration * 25)
    phones = [Interval(p.start, p.end, p.name) for p in synthesis.phones]
    labels = frame_phones(phones, num_frames)
    words = [Interval(w.start, w.end, w.word) for w in synthesis.words]
    out, position = [], 0
    for word, count in segments_from_intervals(words, num_frames):
        run = labels[position:position + count]
        position += count
        if word != "[SIL]":
            out.append([p for i, p in enumerate(run) if i == 0 or p != run[i - 1]])
    return out


def test_words_start_at_their_first_phone(synthesizer):
    out = synthesizer.synthesize("the cat sat on the mat", Voice("en-us+m3"))
    phone_starts = {p.start for p in out.phones}
    # eSpeak reports "on the" as one word, split by characters; every other word has its event.
    assert all(out.words[i].start in phone_starts for i in (0, 1, 2, 3, 5))
    # No word's segment begins with the previous word's last phone.
    assert _word_phones(out)[1:4] == [["k", "a", "t"], ["s", "a", "t"], ["O2", "n"]]


def test_phone_units_are_nearly_the_same_for_every_voice_of_a_language(synthesizer):
    text = "once upon a time there was a little girl who loved her red ball"
    syntheses = [synthesizer.synthesize(text, Voice(v))
                 for v in ("en-us+m3", "en-us+f4", "en-us+klatt")]
    # The voices speak the same phones ...
    spoken = [[phone_label(p.name) for p in s.phones if phone_label(p.name) != PAUSE]
              for s in syntheses]
    assert spoken[0] == spoken[1] == spoken[2]
    # ... at their own speeds, so a phone shorter than a 40 ms frame may fall between two frame
    # centres in one voice and not in another (as "p" in "upon"); most words still agree.
    renditions = [_word_phones(s) for s in syntheses]
    assert all(len(r) == len(text.split()) for r in renditions)
    for other in renditions[1:]:
        assert sum(a == b for a, b in zip(renditions[0], other, strict=True)) >= 0.75 * len(other)


def test_build_with_phone_units(tmp_path):
    pytest.importorskip("espeakng_loader", reason="espeakng-loader is not installed")
    from megatron_lst.demo_corpus.build import DemoCorpusConfig, build_demo_corpus

    config = DemoCorpusConfig(speech_documents=4, text_documents=6, eval_items=4, units="phones",
                              num_units=80, deduplicate_units=True, voices=("en-us+m3",),
                              tokenizer_vocab_size=300, workers=1)
    corpus = build_demo_corpus(tmp_path / "phones", config=config, progress=False)
    labels = json.loads(corpus.paths["phones"].read_text())["phones"]
    assert labels[0] == PAUSE and "k" in labels and "codebook" not in corpus.paths
    assert not (tmp_path / "phones" / "codebook.npy").exists()
    record = json.loads(corpus.paths["speech_train"].read_text().splitlines()[0])
    assert record["interleaved"]  # the reference form is written as for k-means units
    assert 2.5 < corpus.summary["units_per_word"] < 4.5  # one unit per phone, ~3.3 per word
    with pytest.raises(ValueError, match=r"phone units need --num-units \d+ or more"):
        build_demo_corpus(tmp_path / "few", config=replace(config, num_units=20), progress=False)
    with pytest.raises(ValueError, match="units must be one of"):
        replace(config, units="graphemes")
