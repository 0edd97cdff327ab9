import re
import wave

import numpy as np
import pytest
from audio.audio_cases import tone

from megatron_lst.audio.audio_io import (
    MAX_FLOAT_PEAK,
    AudioError,
    audio_info,
    load_audio_16k,
    read_audio,
    write_wav,
)


def _write_pcm(path, ints: np.ndarray, width: int, channels: int, rate: int) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        if width == 3:
            as_bytes = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
            f.writeframes(as_bytes.tobytes())
        elif width == 1:
            f.writeframes((ints + 128).astype(np.uint8).tobytes())
        else:
            f.writeframes(ints.astype(f"<i{width}").tobytes())


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_read_to_unit_scale_and_channels_average(tmp_path, width):
    full = 1 << (8 * width - 1)
    left = np.array([0, full // 2, -full, full - 1, -full // 4])
    right = np.array([0, -full // 2, -full, full - 1, full // 4])
    path = tmp_path / "x.wav"
    _write_pcm(path, np.stack([left, right], 1).reshape(-1), width, 2, 8000)
    samples, rate = read_audio(path)
    assert rate == 8000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, (left + right) / 2 / full, atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100])
def test_header_predicts_the_resampled_length(tmp_path, rate):
    path = tmp_path / "x.wav"
    write_wav(path, tone(rate, 0.77, seed=1), rate)
    info = audio_info(path)
    assert (info.num_samples, info.sample_rate) == (round(rate * 0.77), rate)
    wave16k = load_audio_16k(path)
    assert len(wave16k) == info.num_samples_16k
    assert abs(len(wave16k) - 0.77 * 16000) <= 2


def test_resampling_keeps_a_sine_at_its_frequency(tmp_path):
    path = tmp_path / "x.wav"
    t = np.arange(44100) / 44100
    write_wav(path, 0.5 * np.sin(2 * np.pi * 440 * t), 44100)
    spectrum = np.abs(np.fft.rfft(load_audio_16k(path)))
    assert np.argmax(spectrum) == 440  # 1 s at 16 kHz: bin k is k Hz


def test_unreadable_files_name_the_problem(tmp_path):
    with pytest.raises(AudioError, match="no such audio file"):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio")
    try:
        import soundfile  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"soundfile.*megatron-lst\[audio\]"):
            read_audio(bad)
    else:
        with pytest.raises(AudioError, match="not a readable audio file"):
            read_audio(bad)


def test_flac_reads_through_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    samples = tone(22050, 0.5, seed=3)
    path = tmp_path / "x.flac"
    soundfile.write(str(path), np.stack([samples, -samples], 1), 22050, subtype="PCM_16")
    info = audio_info(path)
    assert (info.num_samples, info.sample_rate) == (len(samples), 22050)
    mono, rate = read_audio(path)
    np.testing.assert_allclose(mono, 0.0, atol=1e-7)  # the channels cancel
    assert rate == 22050 and len(load_audio_16k(path)) == info.num_samples_16k


@pytest.mark.parametrize("cut", [1, 2, 4000])
def test_truncated_pcm_wav_names_the_file_and_what_it_lacks(tmp_path, cut):
    """A cut-off copy (the header counts frames the data lacks; cut=1 leaves half a sample)."""
    path = tmp_path / "cut.wav"
    _write_pcm(path, np.zeros(2 * 3000, np.int64), 2, 2, 16000)
    path.write_bytes(path.read_bytes()[:-cut])
    for read in (audio_info, read_audio):
        with pytest.raises(AudioError, match=r"cut\.wav: truncated: the header promises 3000"):
            read(path)


@pytest.mark.parametrize("rate", [0, 1, 999, 4_294_967_291])
def test_implausible_sample_rate_is_refused(tmp_path, rate):
    """A damaged header's rate: 1 Hz made 16000x resampled noise, 4294967291 Hz (prime) a
    MemoryError (a 640 GiB resampling filter)."""
    path = tmp_path / "x.wav"
    write_wav(path, np.zeros(100), 16000)
    raw = bytearray(path.read_bytes())
    raw[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(raw))
    for read in (audio_info, load_audio_16k):
        with pytest.raises(AudioError, match=f"x.wav: the header gives a sample rate of {rate} "
                                             f"Hz, outside 1000..1000000 Hz"):
            read(path)


def test_non_finite_float_samples_are_refused(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "x.wav"
    soundfile.write(str(path), np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000,
                    subtype="FLOAT")
    with pytest.raises(AudioError, match="x.wav: holds NaN or infinite samples"):
        read_audio(path)


def test_float_samples_far_outside_full_scale_are_refused_naming_the_peak(tmp_path):
    """A float wav holding 1e30 loaded as it was (finite), and every feature after it was
    garbage; float headroom up to MAX_FLOAT_PEAK is read as the file holds it."""
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "x.wav"
    loud = np.array([0.1, MAX_FLOAT_PEAK, -0.2] * 100, np.float32)
    soundfile.write(str(path), loud, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(path)[0], loud)
    for peak in (np.nextafter(np.float32(MAX_FLOAT_PEAK), np.float32(np.inf)), -32767.0, 1e30):
        soundfile.write(str(path), np.array([0.1, peak, 0.2] * 100, np.float32), 16000,
                        subtype="FLOAT")
        shown = re.escape(f"{abs(peak):.3g}")
        with pytest.raises(AudioError, match=rf"x.wav: its samples reach {shown}, far "
                                             rf"outside the \[-1, 1\] of float audio"):
            read_audio(path)


@pytest.mark.parametrize("riff_length", [0xFFFFFFFF, None])
def test_wav_written_to_a_pipe_reads_to_the_end_of_its_data(tmp_path, riff_length):
    """ffmpeg writing wav to a pipe leaves the data length 0xFFFFFFFF (the RIFF length too, or
    it fills that one in): `wave` took 4 GiB of frames and the whole file was 'truncated'."""
    pytest.importorskip("soundfile")
    path = tmp_path / "piped.wav"
    write_wav(path, tone(22050, 0.7, seed=3), 22050)
    want, _ = read_audio(path)  # the same samples, under a header that gives their length
    raw = bytearray(path.read_bytes())
    raw[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # the data chunk's length
    if riff_length is not None:
        raw[4:8] = riff_length.to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    info = audio_info(path)
    assert (info.num_samples, info.sample_rate, info.channels) == (len(want), 22050, 1)
    samples, rate = read_audio(path)
    assert rate == 22050
    np.testing.assert_array_equal(samples, want)


def test_data_chunk_longer_than_the_file_is_refused_as_truncated(tmp_path):
    """A data chunk whose length runs past the end of a file with a consistent RIFF size: `wave`
    raised a bare RuntimeError seeking to the last frame."""
    path = tmp_path / "x.wav"
    write_wav(path, np.zeros(1000), 16000)
    raw = bytearray(path.read_bytes())
    raw[40:44] = (4 * 2000).to_bytes(4, "little")  # the data chunk's length: 4000 samples
    path.write_bytes(bytes(raw))
    for read in (audio_info, read_audio):
        with pytest.raises(AudioError, match=r"x\.wav: truncated: the header promises 4000"):
            read(path)


def test_flac_of_unstated_length_is_refused_by_name(tmp_path):
    """STREAMINFO total samples 0 (unknown): libsndfile reported 2**63 - 1 frames, planned as
    that many units, and reading it failed with numpy's 'array is too big'."""
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "x.flac"
    soundfile.write(str(path), tone(16000, 0.5, seed=0), 16000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    # 'fLaC', the block header (4 bytes), then STREAMINFO: 10 bytes of block and frame sizes,
    # and 8 bytes whose low 36 bits count the samples.
    packed = int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1)
    raw[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    with pytest.raises(AudioError, match=r"x\.flac: its header does not give its length"):
        audio_info(path)


def test_fmt_chunk_longer_than_the_file_is_named_not_a_crash(tmp_path):
    """A fmt chunk size running past the RIFF's end made `wave.open` raise a bare RuntimeError
    (before the PCM check could fall back to soundfile)."""
    pytest.importorskip("soundfile")
    path = tmp_path / "x.wav"
    write_wav(path, np.full(1000, 0.5), 16000)  # read as chunk headers: 16383-byte chunks
    raw = bytearray(path.read_bytes())
    raw[16:20] = (230).to_bytes(4, "little")  # the fmt chunk's size
    path.write_bytes(bytes(raw))
    for read in (audio_info, read_audio):
        with pytest.raises(AudioError, match=r"x\.wav: not a readable audio file"):
            read(path)


def test_flac_claiming_more_audio_than_memory_holds_is_named(tmp_path):
    """STREAMINFO damaged to claim 2**36 - 1 samples (256 GiB as float32): refused from the header,
    not left to the allocation (a MemoryError traceback, or an overcommitted allocation)."""
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "x.flac"
    soundfile.write(str(path), tone(16000, 0.5, seed=0), 16000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    packed = int.from_bytes(raw[18:26], "big") | ((1 << 36) - 1)  # see the test above
    raw[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    with pytest.raises(AudioError, match=r"x\.flac: the header gives 1,193\.0 hours of audio, "
                                         r"more than fits in memory"):
        read_audio(path)
