"""Audio -> HuBERT units with a tiny randomly initialised HuBERT: features against the model's own
forward, padding invariance, the unit rate, identical files for any batch size and worker count,
resuming, and the produced files through `preprocess_data.py --input-format textgrid` to training."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from audio.audio_cases import CLIPS, tone, write_clips
from tool_modules import load_tool

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")


from megatron_lst.audio.audio_io import audio_info  # noqa: E402
from megatron_lst.audio.hubert import HubertFeatures, load_transformers, wants_normalized_input  # noqa: E402

transformers = load_transformers()




def _tiny_hubert(directory: Path, norm: str) -> Path:
    """A 2-layer HuBERT with the base model's 320x convolutional downsampling, saved as a user's
    model directory. `norm` "group" is HuBERT base's feature encoder, "layer" HuBERT large's."""
    config = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    torch.manual_seed(0)
    transformers.HubertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["group", "layer"])
def hubert_dir(request, tmp_path_factory):
    return _tiny_hubert(tmp_path_factory.mktemp(f"hubert_{request.param}"), request.param)


def _waves() -> list[np.ndarray]:
    return [tone(16000, seconds, seed) for seed, seconds in enumerate([1.37, 0.52, 2.01, 0.9])]


def _model_input(wave: np.ndarray, normalize: bool) -> torch.Tensor:
    """[1, n]: what Hugging Face's feature extractor hands the model."""
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize)
    return extractor(wave, sampling_rate=16000, return_tensors="pt").input_values


def test_layer_features_match_the_models_hidden_states(hubert_dir):
    model = transformers.HubertModel.from_pretrained(hubert_dir, use_kernels=False).eval()
    waves = _waves()
    # HuBERT large (layer-norm encoder) was pre-trained on normalised waveforms, base was not.
    normalize = model.config.feat_extract_norm == "layer"
    for layer in (0, 1, 2):
        features = HubertFeatures(hubert_dir, layer=layer, frame_rate=50)  # 50 Hz: no pooling
        for wave, got in zip(waves, features.batch(waves), strict=True):
            with torch.inference_mode():
                want = model(_model_input(wave, normalize), output_hidden_states=True
                             ).hidden_states[layer][0].numpy()  # [T, D]
            assert len(got) == len(wave) // 320 and len(want) in (len(got), len(got) - 1)
            np.testing.assert_allclose(got[:len(want)], want, atol=2e-5, rtol=0)
            # The convolution drops a partial last frame; the last whole frame fills in for it.
            filled = got[len(want):]
            np.testing.assert_array_equal(filled, np.broadcast_to(got[len(want) - 1], filled.shape))


def test_padding_does_not_change_features_and_frames_average_to_25_hz(hubert_dir):
    features = HubertFeatures(hubert_dir, layer=2)
    waves = _waves()
    batched = features.batch(waves)
    for wave, got in zip(waves, batched, strict=True):
        alone = features(wave)
        assert got.shape == alone.shape == (len(wave) // 640, 32)
        np.testing.assert_allclose(got, alone, atol=2e-5, rtol=0)
    native = HubertFeatures(hubert_dir, layer=2, frame_rate=50)(waves[0])  # [2U (+1), D]
    units = len(waves[0]) // 640
    np.testing.assert_allclose(batched[0], native[:2 * units].reshape(units, 2, -1).mean(1),
                               atol=2e-5, rtol=0)


def test_input_normalisation_follows_the_preprocessor_config(tmp_path, hubert_dir):
    """A layer-norm HuBERT (large) given raw waveforms computed features of input it never saw
    in training; `preprocessor_config.json` says what the model takes when it is there."""
    model = transformers.HubertModel.from_pretrained(hubert_dir, use_kernels=False).eval()
    wave = 0.01 + 0.2 * tone(16000, 1.1, seed=7)  # an offset and a scale normalisation undoes
    for do_normalize in (True, False):
        directory = tmp_path / f"normalize_{do_normalize}"
        shutil.copytree(hubert_dir, directory)
        transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(directory)
        got = HubertFeatures(directory, layer=2, frame_rate=50)(wave)
        with torch.inference_mode():
            want = model(_model_input(wave, do_normalize), output_hidden_states=True
                         ).hidden_states[2][0].numpy()
        np.testing.assert_allclose(got[:len(want)], want, atol=2e-5, rtol=0)
    if model.config.feat_extract_norm == "layer":  # where the two inputs give other features
        raw = HubertFeatures(tmp_path / "normalize_False", layer=2)(wave)
        assert np.abs(HubertFeatures(hubert_dir, layer=2)(wave) - raw).max() > 1e-2
    (tmp_path / "normalize_True" / "preprocessor_config.json").write_text('{"do_normalize": 1}')
    with pytest.raises(ValueError, match="preprocessor_config.json: expected a JSON object"):
        HubertFeatures(tmp_path / "normalize_True", layer=2)


def test_a_preprocessor_config_without_do_normalize_means_true(tmp_path):
    """transformers' feature extractor defaults do_normalize to True: such a file was refused as
    damaged."""
    (tmp_path / "preprocessor_config.json").write_text('{"sampling_rate": 16000}')
    assert wants_normalized_input(tmp_path, "group") is True


def test_model_configs_nested_deeper_than_the_stack_are_refused_as_damaged(tmp_path):
    """A config.json of 100k nested lists raised RecursionError out of the model-type check."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ValueError, match=r"cannot load a HuBERT model from this directory"):
        HubertFeatures(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(deep)
    with pytest.raises(ValueError, match="preprocessor_config.json: expected a JSON object"):
        wants_normalized_input(tmp_path, "group")


def test_a_model_of_another_kind_is_refused_by_name(tmp_path):
    """transformers loads a WavLM checkpoint as a HubertModel with only a logged report, dropping
    WavLM's relative position bias: the features were of a model that does not exist."""
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=4)
    transformers.WavLMModel(transformers.WavLMConfig(**config)).save_pretrained(tmp_path / "wavlm")
    with pytest.raises(ValueError, match=r"wavlm/config\.json: holds a 'wavlm' model, not a "
                                         r"HuBERT model"):
        HubertFeatures(tmp_path / "wavlm", layer=2)
    # A fine-tuned HuBERT (a CTC head on the same encoder) is a HuBERT model.
    transformers.HubertForCTC(transformers.HubertConfig(vocab_size=10, **config)).save_pretrained(
        tmp_path / "ctc")
    assert HubertFeatures(tmp_path / "ctc", layer=2)(tone(16000, 0.5, seed=0)).shape == (12, 32)


def test_bad_model_arguments_name_the_fix(tmp_path, hubert_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HubertFeatures(tmp_path)
    fairseq = tmp_path / "hubert_base_ls960.pt"  # was "no config.json" under a file
    fairseq.write_bytes(b"PK\x03\x04 a torch zip archive")
    with pytest.raises(FileNotFoundError, match=r"hubert_base_ls960\.pt: a file, not a Hugging "
                                                r"Face model directory; a fairseq checkpoint"):
        HubertFeatures(fairseq)
    with pytest.raises(ValueError, match="layer 3 is outside 0..2"):
        HubertFeatures(hubert_dir, layer=3)
    with pytest.raises(ValueError, match="not a whole multiple of the unit frame rate 30 Hz"):
        HubertFeatures(hubert_dir, layer=2, frame_rate=30)


def test_incomplete_model_directories_are_refused(tmp_path, hubert_dir):
    from safetensors.numpy import load_file, save_file

    weights = load_file(hubert_dir / "model.safetensors")
    cases = {"no_weights": None, "cut": (hubert_dir / "model.safetensors").read_bytes()[:200],
             "partial": {k: v for k, v in weights.items() if ".layers.1." not in k},
             "no_mask": {k: v for k, v in weights.items() if k != "masked_spec_embed"}}
    for name, content in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        shutil.copy(hubert_dir / "config.json", directory)
        if isinstance(content, bytes):
            (directory / "model.safetensors").write_bytes(content)
        elif content is not None:
            save_file(content, directory / "model.safetensors", metadata={"format": "pt"})
    for name in ("no_weights", "cut"):
        with pytest.raises(ValueError, match=f"{name}: cannot load a HuBERT model"):
            HubertFeatures(tmp_path / name, layer=2)
    # transformers would fill layer 2 with random weights and only log a warning.
    with pytest.raises(ValueError, match=r"partial: the weights lack 16 .*encoder\.layers\.1\."):
        HubertFeatures(tmp_path / "partial", layer=2)
    wave = tone(16000, 0.5, seed=0)
    np.testing.assert_array_equal(HubertFeatures(tmp_path / "no_mask", layer=2)(wave),
                                  HubertFeatures(hubert_dir, layer=2)(wave))



class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_pickled_weights_beyond_tensors_and_damaged_strides_are_refused_in_one_line(tmp_path):
    """A pytorch_model.bin that is no plain state dict gave torch's multi-line message advising
    weights_only=False; conv_stride with a 0 a ZeroDivisionError."""
    import json
    import pickle

    source = _tiny_hubert(tmp_path / "source", "group")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(source / "config.json", pickled)
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump({"encoder.layers.0.x": _RunsCode()}, f)
    with pytest.raises(ValueError) as error:
        HubertFeatures(pickled, layer=2)
    message = str(error.value)
    assert "\n" not in message and "weights_only" not in message, message
    assert message.startswith(f"{pickled}: its weights file is a pickle holding more than "
                              f"tensors, which the weights-only load refuses"), message

    config = json.loads((source / "config.json").read_text())
    config["conv_stride"][-1] = 0
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"source: config.json gives conv_stride \[5, 2, 2, 2, "
                                         r"2, 2, 0\], a downsampling of 0; the config is "
                                         r"damaged"):
        HubertFeatures(source, layer=2)


# --- the tools, end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Clips at 8/16/22.05/44.1 kHz listed in a TSV, a group-norm HuBERT, and its codebook fitted
    by `train_kmeans.py fit`."""
    root = tmp_path_factory.mktemp("corpus")
    clips = write_clips(root / "audio")
    words = "the cat sat on a mat by one red door".split()
    (root / "list.tsv").write_text("".join(
        f"{p.relative_to(root)}\t{words[i]} {words[i + 1]}\n" for i, p in enumerate(clips)))
    hubert = _tiny_hubert(root / "hubert", "group")
    codebook = root / "km.safetensors"
    load_tool("train_kmeans").main([
        "fit", "--input", str(root / "list.tsv"), "--input-format", "tsv", "--hubert-dir",
        str(hubert), "--layer", "2", "--num-units", "8", "--max-frames", "1000",
        "--device", "cpu", "--no-progress", "--output", str(codebook)])
    return root, hubert, codebook


@pytest.mark.parametrize("flags, message", [
    (["--output", "km.bin"], "--output km.bin: a codebook is saved as .npy or .safetensors"),
    (["--output", "missing/km.npy"], "directory missing does not exist"),
    (["--num-units", "0"], "--num-units 0 needs at least one unit"),
    (["--num-units", "8", "--max-frames", "4"], r"--max-frames \(4\) at least one frame per unit"),
    (["--sample-hours", "0"], "--sample-hours must be positive"),
])
def test_train_kmeans_refuses_bad_arguments_before_any_work(tmp_path, flags, message):
    """Checked before the corpus is read (an empty folder here) and hours of features made."""
    argv = ["fit", "--input", str(tmp_path), "--input-format", "audio-dir", "--hubert-dir",
            str(tmp_path / "none"), "--output", str(tmp_path / "km.npy"), *flags]
    with pytest.raises(ValueError, match=message):
        load_tool("train_kmeans").main(argv)


def _extract(corpus, units_dir: Path, *flags: str):
    root, hubert, codebook = corpus
    return load_tool("extract_units").main([
        "--input", str(root / "list.tsv"), "--input-format", "tsv", "--hubert-dir", str(hubert),
        "--layer", "2", "--codebook", str(codebook), "--units-dir", str(units_dir),
        "--device", "cpu", "--no-progress", *flags])


def _unit_files(units_dir: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(units_dir).as_posix(): np.load(p) for p in sorted(units_dir.rglob("*.npy"))}


@pytest.fixture(scope="module")
def units(corpus, tmp_path_factory):
    units_dir = tmp_path_factory.mktemp("units")
    summary = _extract(corpus, units_dir, "--batch-size", "4")
    assert (summary.utterances, summary.skipped) == (len(CLIPS), 0)
    return units_dir


def test_units_come_at_25_hz(corpus, units):
    root = corpus[0]
    files = _unit_files(units)
    assert len(files) == len(CLIPS)
    for path in sorted((root / "audio").rglob("*.wav")):
        got = files[f"{path.relative_to(root).with_suffix('').as_posix()}.npy"]
        assert got.dtype == np.int32 and got.min() >= 0 and got.max() < 8
        assert abs(len(got) - audio_info(path).seconds * 25) <= 1
    assert len(np.unique(np.concatenate(list(files.values())))) > 1


def test_units_are_identical_for_any_batch_size_and_worker_count(corpus, units, tmp_path):
    want = _unit_files(units)
    for name, flags in [("single", ["--batch-size", "1"]),
                        ("workers", ["--batch-size", "3", "--workers", "2",
                                     "--threads-per-worker", "1"])]:
        _extract(corpus, tmp_path / name, *flags)
        got = _unit_files(tmp_path / name)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")


def test_the_summary_counts_cores_not_oversubscribed_threads(corpus, tmp_path, monkeypatch,
                                                             capsys):
    """`--workers 8` on a 2-core machine reported "units/s per core (8 cores)", a quarter of the
    real per-core rate: threads beyond the CPUs this process may use share them."""
    import megatron_lst.audio.extract as extract

    monkeypatch.setattr(extract, "usable_cpus", lambda: 2)
    summary = _extract(corpus, tmp_path / "over", "--threads-per-worker", "6")
    assert summary.utterances == len(CLIPS) and summary.cores == 2
    assert "(2 cores)" in capsys.readouterr().out
    summary = _extract(corpus, tmp_path / "under", "--threads-per-worker", "1")
    assert summary.cores == 1


def test_rerun_resumes_and_refuses_other_settings(corpus, units, tmp_path):
    units_dir = tmp_path / "units"
    shutil.copytree(units, units_dir)
    summary = _extract(corpus, units_dir)
    assert (summary.utterances, summary.skipped) == (0, len(CLIPS))
    victim = sorted(units_dir.rglob("*.npy"))[2]
    victim.write_bytes(victim.read_bytes()[:-8])  # as if cut short (only a foreign writer could)
    other = sorted(units_dir.rglob("*.npy"))[3]  # a damaged header: was a TokenError traceback
    other.write_bytes(other.read_bytes().replace(b"}", b" "))
    # Empty, as a machine crash can leave a renamed file: was an EOFError traceback.
    sorted(units_dir.rglob("*.npy"))[4].write_bytes(b"")
    summary = _extract(corpus, units_dir)
    assert (summary.utterances, summary.skipped) == (3, len(CLIPS) - 3)
    redone, want = _unit_files(units_dir), _unit_files(units)
    assert redone.keys() == want.keys()
    assert all(np.array_equal(redone[key], want[key]) for key in want)
    # The same centroids without the metadata that ties them to layer 2.
    from megatron_lst.audio.codebook import load_codebook

    bare = tmp_path / "km.npy"
    np.save(bare, load_codebook(corpus[2]).centroids)
    with pytest.raises(ValueError, match=r"other settings \(layer: 2 -> 1, codebook_sha256"):
        _extract(corpus, units_dir, "--layer", "1", "--codebook", str(bare))
    for damaged in ("", "[]"):  # was a bare JSONDecodeError or AttributeError
        (units_dir / "units.json").write_text(damaged)
        with pytest.raises(ValueError, match=r"units\.json is damaged"):
            _extract(corpus, units_dir)
    # Unit files without the record (copied without it, or made otherwise) were kept as done.
    (units_dir / "units.json").unlink()
    with pytest.raises(ValueError, match=r"holds unit files of 6 of these utterances \(e\.g\. "
                                         r"audio/spk0/utt0\.npy\) but no units\.json"):
        _extract(corpus, units_dir, "--layer", "1", "--codebook", str(bare))
    assert _unit_files(units_dir).keys() == want.keys()


@pytest.mark.parametrize("flags, message", [
    (["--layer", "1"], r"km\.safetensors was fitted on layer 2 features, but this run extracts "
                       r"--layer 1; pass --layer 2, or the codebook fitted on layer 1"),
    (["--frame-rate", "50"], r"fitted on frame_rate 25 features, but this run extracts "
                             r"--frame-rate 50"),
])
def test_codebook_fitted_on_other_features_is_refused(corpus, tmp_path, flags, message):
    """The .safetensors codebook records its layer and frame rate, but extraction never read
    them: same-sized features of another layer got meaningless units without a word."""
    from megatron_lst.audio.codebook import CodebookError

    with pytest.raises(CodebookError, match=message):
        _extract(corpus, tmp_path / "units", *flags)
    assert not (tmp_path / "units").exists()


def test_codebook_of_another_model_is_refused(corpus, tmp_path):
    from megatron_lst.audio.codebook import CodebookError

    np.save(tmp_path / "km.npy", np.random.default_rng(0).standard_normal((8, 768), np.float32))
    root, hubert, _ = corpus
    with pytest.raises(CodebookError, match="dimension 768 do not match the model's hidden size 32"):
        _extract((root, hubert, tmp_path / "km.npy"), tmp_path / "units")


def test_unit_files_preprocess_and_train(corpus, units, tmp_path):
    from training.training_cases import tiny_flags

    from megatron_lst.data.indexed import DocumentStore
    from megatron_lst.data.textgrid import Interval, write_textgrid
    from megatron_lst.tokenizer.text_tokenizer import train_sentencepiece
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain

    root = corpus[0]
    grids = tmp_path / "textgrid"
    texts = []
    for line in (root / "list.tsv").read_text().splitlines():
        path, text = line.split("\t")
        seconds = audio_info(root / path).num_samples_16k / 16000
        first, second = text.split()
        grid = grids / Path(path).with_suffix(".TextGrid")  # MFA mirrors the corpus layout
        grid.parent.mkdir(parents=True, exist_ok=True)
        write_textgrid(grid, [Interval(0.0, 0.2, ""), Interval(0.2, seconds / 2, first),
                              Interval(seconds / 2, seconds, second)])
        texts.append(text)
    rng = np.random.default_rng(0)
    words = " ".join(texts).split() + "and of to in is it was he she we they".split()
    sentences = [" ".join(rng.choice(words, 10)) for _ in range(200)]
    spm = train_sentencepiece(sentences, tmp_path / "spm.model", 290)
    prefix = tmp_path / "speech"
    # The reader pairs <textgrid-dir>/<id>.TextGrid with <units-dir>/<id>.npy.
    load_tool("preprocess_data").main([
        "--input-format", "textgrid", "--textgrid-dir", str(grids / "audio"), "--units-dir",
        str(units / "audio"), "--tokenizer-model", str(spm), "--num-units", "20",
        "--output-prefix", str(prefix)])
    store = DocumentStore(prefix)
    assert len(store) == len(CLIPS)
    assert store.manifest.counts.units == sum(len(u) for u in _unit_files(units).values())

    flags = tiny_flags([str(prefix)]) + ["--train-iters", "2", "--split", "100,0,0",
                                         "--tokenizer-model", str(spm)]
    result = pretrain(validate_args(parse_args(flags), 1))
    assert sorted(result.losses) == [1, 2]
    assert all(np.isfinite(loss) for loss in result.losses.values())


def test_demo_corpus_takes_hubert_units(corpus):
    hubert_dir = corpus[1]
    import pickle

    from megatron_lst.demo_corpus.build import unit_features
    from megatron_lst.demo_corpus.units import MfccFeatures

    parser = load_tool("build_demo_corpus").build_parser()
    args = parser.parse_args(["--out-dir", "x", "--units", "hubert", "--hubert-dir",
                              str(hubert_dir), "--hubert-layer", "1"])
    features = unit_features(args.units, args.hubert_dir, args.hubert_layer)
    wave = _waves()[0]
    assert features(wave).shape == (len(wave) // 640, 32)
    # The demo's synthesis workers receive the features pickled: the model reloads from its path.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(features))(wave), features(wave))
    assert isinstance(unit_features(), MfccFeatures)
    with pytest.raises(ValueError, match="--hubert-dir"):
        unit_features("hubert")


def test_a_unit_file_the_disk_cannot_hold_is_an_error_not_a_file_cut_short(tmp_path,
                                                                            disk_full_at):
    """np.save dropped the error of a full disk: a unit file cut short was renamed into place,
    the run said it extracted the utterance, and preprocess_data then met a damaged file."""
    from megatron_lst.audio.extract import is_complete, units_path, write_units

    path = units_path(tmp_path, "spk/utt1")
    (tmp_path / "spk").mkdir()
    with (disk_full_at(400),
          pytest.raises(OSError, match="the disk took 400 of the array's 2128 bytes")):
        write_units(path, np.arange(500) % 50)
    assert list((tmp_path / "spk").iterdir()) == []
    assert not is_complete(path, 500)


def test_output_folders_that_cannot_be_written_end_in_one_line(corpus, tmp_path):
    """An OSError on an output path (here a folder under a file; a read-only or unwritable
    --units-dir is the same) was a traceback; an output folder that is a file said only
    'File exists'."""
    from megatron_lst.audio.cli_args import run_tool

    blocker = tmp_path / "file"
    blocker.write_text("user data\n")
    cases = [
        (["--units-dir", str(blocker / "units")], rf"error: {blocker / 'units'}: Not a directory; "
                                                  r"check the path, its permissions"),
        (["--units-dir", str(blocker)], rf"--units-dir {blocker} is a file; pass a folder"),
        (["--units-dir", str(tmp_path / "u"), "--mfa-corpus-dir", str(blocker)],
         rf"--mfa-corpus-dir {blocker} is a file; pass a folder"),
    ]
    for flags, message in cases:
        root, hubert, codebook = corpus
        argv = ["--input", str(root / "list.tsv"), "--input-format", "tsv", "--hubert-dir",
                str(hubert), "--layer", "2", "--codebook", str(codebook), "--device", "cpu",
                "--no-progress", *flags]
        with pytest.raises(SystemExit) as exit_info:
            run_tool(lambda argv=argv: load_tool("extract_units").main(argv))
        assert re.search(message, exit_info.value.code), exit_info.value.code
        assert blocker.read_text() == "user data\n"


@pytest.mark.parametrize("flags, message", [
    (["--frame-rate", "0"], "argument --frame-rate: expected a whole number of at least 1, got '0'"),
    (["--frame-rate", "-25"], "argument --frame-rate: expected a whole number of at least 1"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number of at least 1"),
    (["--max-batch-seconds", "inf"], "argument --max-batch-seconds: expected a finite number"),
    (["--max-batch-seconds", "nan"], "argument --max-batch-seconds: expected a finite number"),
    (["--device", "bogus"], "--device bogus: not a torch device; use cpu"),
])
@pytest.mark.parametrize("tool", ["extract_units", "train_kmeans"])
def test_bad_model_flags_are_refused_by_name(tmp_path, capsys, tool, flags, message):
    """--frame-rate 0 was a ZeroDivisionError (-25 a reshape error), --max-batch-seconds inf an
    OverflowError, and an unknown --device a torch RuntimeError, all after the corpus was read."""
    from megatron_lst.audio.cli_args import run_tool

    (tmp_path / "list.tsv").write_text("")  # never read: the flags are refused first
    argv = ["--input", str(tmp_path / "list.tsv"), "--input-format", "tsv", "--hubert-dir",
            str(tmp_path / "none"), *flags]
    argv = (["fit", *argv, "--output", str(tmp_path / "km.npy")] if tool == "train_kmeans"
            else [*argv, "--codebook", str(tmp_path / "km.npy"), "--units-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_tool(lambda: load_tool(tool).main(argv))
    said = f"{exit_info.value.code} {capsys.readouterr().err}"
    assert message in said, said


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_cuda_device_without_a_gpu_is_refused_by_name(corpus, tmp_path):
    with pytest.raises(ValueError, match="--device cuda: torch sees 0 CUDA device"):
        _extract(corpus, tmp_path / "units", "--device", "cuda")


def test_train_kmeans_never_writes_over_its_inputs(corpus, tmp_path):
    """`import km.npy --output km.npy` replaced the user's pickle, and `fit --output
    <hubert-dir>/model.safetensors` the model's weights, after the work was done."""
    root = corpus[0]
    hubert = shutil.copytree(corpus[1], tmp_path / "hubert")
    weights = (hubert / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"model\.safetensors would replace the input .*hubert/"
                                         r"model\.safetensors; write the codebook elsewhere"):
        load_tool("train_kmeans").main([
            "fit", "--input", str(root / "list.tsv"), "--input-format", "tsv", "--hubert-dir",
            str(hubert), "--layer", "2", "--num-units", "8", "--max-frames", "1000",
            "--device", "cpu", "--no-progress", "--output", str(hubert / "model.safetensors")])
    assert (hubert / "model.safetensors").read_bytes() == weights

    pickled = tmp_path / "km.npy"  # a pickle despite the name
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match=r"km\.npy would replace the input .*km\.npy"):
        load_tool("train_kmeans").main(["import", str(pickled), "--trust-pickle", "--output",
                                        str(tmp_path / "." / "km.npy")])
    assert pickled.read_bytes() == b"\x80\x04K\x01."


def test_a_bad_file_met_by_a_worker_ends_the_tool_in_one_line(corpus, tmp_path):
    """Each pool worker's weight-loading bar left a tqdm semaphore behind the terminated
    worker, and the resource tracker's 'leaked semaphore objects' warning followed the error."""
    import os
    import subprocess
    import sys

    soundfile = pytest.importorskip("soundfile")
    root, hubert, codebook = corpus
    audio = shutil.copytree(root / "audio", tmp_path / "audio")
    # Its header is sound, so the worker reading it is the first to find it bad.
    soundfile.write(str(audio / "spk0" / "zz.wav"), np.full(16000, np.nan, np.float32), 16000,
                    subtype="FLOAT")
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "extract_units.py"),
         "--input", str(audio), "--input-format", "audio-dir", "--hubert-dir", str(hubert),
         "--layer", "2", "--codebook", str(codebook), "--units-dir", str(tmp_path / "units"),
         "--device", "cpu", "--no-progress", "--workers", "2", "--threads-per-worker", "1",
         "--batch-size", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[-1].startswith(f"error: {audio / 'spk0' / 'zz.wav'}: holds NaN"), run.stderr


def test_audio_changed_during_the_run_is_named_not_a_crash(corpus, tmp_path):
    """A file still being copied grows after the headers were read: a bare RuntimeError."""
    from megatron_lst.audio.audio_io import AudioError, write_wav
    from megatron_lst.audio.corpus import read_tsv
    from megatron_lst.audio.extract import ExtractConfig, extract_units

    root, hubert, codebook = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(root / "audio", copy / "audio")
    shutil.copy(root / "list.tsv", copy)
    grows = copy / "audio" / "spk1" / "utt5.wav"  # the shortest: the last batch
    config = ExtractConfig(str(hubert), str(codebook), str(tmp_path / "units"), layer=2,
                           batch_size=1)

    def copy_goes_on(seconds):
        write_wav(grows, tone(16000, 3.0, seed=9), 16000)

    with pytest.raises(AudioError, match=r"utt5\.wav: read 48000 samples .* promised 10560 "
                                         r"\(16 units\) when the run began"):
        extract_units(read_tsv(copy / "list.tsv"), config, progress=copy_goes_on)


def test_audio_shorter_than_one_unit_frame_is_named_not_an_empty_unit_file(corpus, tmp_path):
    """A zero-length or cut-off recording gave an empty unit file, counted as extracted, and a
    re-run skipped it as complete."""
    from megatron_lst.audio.audio_io import AudioError, write_wav

    root, hubert, codebook = corpus
    audio = tmp_path / "audio"
    shutil.copytree(root / "audio", audio)
    write_wav(audio / "empty.wav", np.zeros(0), 16000)
    write_wav(audio / "spk0" / "click.wav", tone(44100, 0.035, seed=3), 44100)  # 35 ms < 40 ms
    write_wav(audio / "spk1" / "unit.wav", tone(8000, 0.04, seed=4), 8000)  # one unit: kept
    flags = ["--input-format", "audio-dir", "--hubert-dir", str(hubert), "--layer", "2",
             "--codebook", str(codebook), "--device", "cpu", "--no-progress"]
    units_dir = tmp_path / "units"
    with pytest.raises(AudioError, match=r"^2 audio file\(s\) are shorter than one unit frame "
                                         r"\(40 ms at 25 Hz\).*empty\.wav \(0 ms\), .*click\.wav "
                                         r"\(35 ms\); .*leave them out"):
        load_tool("extract_units").main(["--input", str(audio), "--units-dir", str(units_dir),
                                         *flags])
    assert not list(units_dir.rglob("*.npy"))
    (audio / "empty.wav").unlink()
    (audio / "spk0" / "click.wav").unlink()
    # The stopped run's units.json describes no unit file: other settings are not refused.
    from megatron_lst.audio.codebook import load_codebook

    bare = tmp_path / "km.npy"  # no metadata tying it to layer 2
    np.save(bare, load_codebook(codebook).centroids)
    flags[flags.index("--layer") + 1], flags[flags.index("--codebook") + 1] = "1", str(bare)
    summary = load_tool("extract_units").main(["--input", str(audio), "--units-dir",
                                               str(units_dir), *flags])
    assert summary.utterances == len(CLIPS) + 1
    assert '"layer": 1' in (units_dir / "units.json").read_text()
    assert len(np.load(units_dir / "spk1" / "unit.npy")) == 1


@pytest.mark.parametrize("flags, message", [
    (["--num-units", "7"], r"come from a codebook of 8 units \(.*units\.json\), more than "
                           r"--num-units 7 holds; pass --num-units 8"),
    (["--num-units", "8", "--frame-rate", "50"], r"at 25 Hz \(.*units\.json\), not --frame-rate "
                                                 r"50; pass --frame-rate 25"),
])
def test_preprocessing_units_with_a_smaller_vocabulary_or_another_rate_is_refused(
        units, tmp_path, flags, message):
    """A codebook larger than --num-units showed only in the utterances that happened to use a
    unit past the vocabulary: each one refused, or under --skip-bad silently dropped."""
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"never read: the check comes first")
    # A subfolder of the --units-dir of the extraction: the record is found above it.
    with pytest.raises(SystemExit, match=message):
        load_tool("preprocess_data").main([
            "--input-format", "textgrid", "--textgrid-dir", str(tmp_path), "--units-dir",
            str(units / "audio"), "--tokenizer-model", str(tokenizer),
            "--output-prefix", str(tmp_path / "out"), *flags])


def test_every_unreadable_audio_file_is_named_in_one_run(corpus, tmp_path):
    """A folder with several damaged files (or non-audio files named .wav) stopped at the first,
    so each re-run, after hours of nothing, named the next one."""
    from megatron_lst.audio.audio_io import AudioError
    from megatron_lst.audio.corpus import read_audio_dir
    from megatron_lst.audio.extract import make_jobs

    audio = tmp_path / "audio"
    shutil.copytree(corpus[0] / "audio", audio)
    for i in range(7):
        (audio / f"notes ü{i}.wav").write_text("not audio")
    with pytest.raises(AudioError) as caught:
        make_jobs(read_audio_dir(audio))
    message = str(caught.value)
    assert message.startswith("7 audio files cannot be used (and 2 more): ")
    assert message.count("not a readable audio file") == 5
    assert all(f"notes ü{i}.wav" in message for i in range(5))
    assert "leave it out of the corpus" in message
    (audio / "notes ü0.wav").rename(audio / "notes.txt")
    for i in range(2, 7):
        (audio / f"notes ü{i}.wav").unlink()
    with pytest.raises(AudioError, match=r"^\S*notes ü1\.wav: not a readable audio file"):
        make_jobs(read_audio_dir(audio))
