"""tools/bench_generation.py: the LST / baseline comparison is per second of generated speech."""

import pytest
from tool_modules import load_tool


def test_comparison_is_per_second_of_speech_and_names_runs_that_stopped_early():
    """The baseline of tiny-cpu (a context of 64 tokens) stops after 13 of 40 units behind a
    50-unit prompt; the ratio of raw global steps (10 / 12 = 0.833) hid LST's 4x saving."""
    bench = load_tool("bench_generation")
    lst = bench.Result("lst", True, 40, 1.6, 10, 0.12, 10 / 1.6, 0.12 / 1.6, "max-new-tokens")
    base = bench.Result("baseline", True, 13, 0.52, 12, 0.02, 12 / 0.52, 0.02 / 0.52,
                        "context limit")
    first, *notes = bench.comparison_lines([lst, base], units=40, patch_size=4)
    assert first == ("LST / baseline global steps per second of speech: "
                     f"{(10 / 1.6) / (12 / 0.52):.3f} (1/p = 0.250)")
    assert f"{(10 / 1.6) / (12 / 0.52):.3f}" == "0.271"
    [note] = notes
    assert note.startswith("note: baseline (cache True) generated 13 of --units 40 units: it "
                           "stopped at context limit")


def test_a_run_records_why_generation_stopped():
    bench = load_tool("bench_generation")
    args = bench.argparse.Namespace(preset="tiny-cpu", units=40, prompt_units=50, patch_size=4,
                                    frame_rate=25.0, text_vocab_size=512, no_cache=False)
    lst, base = bench.run(args)
    for result in (lst, base):
        assert result.stopped_by in ("max-new-tokens", "eos", "context limit")
        assert (result.generated_units == 40) == (result.stopped_by == "max-new-tokens")
    # 50 prompt units and 40 more do not fit the baseline's 64 tokens; LST's 64 patches hold them
    assert base.generated_units < 40 and base.stopped_by in ("eos", "context limit")


def test_the_benchmark_models_never_sample_eos(single_rank):
    """Random weights sampled EOS after a seed-dependent number of units (669 of 2000 for the
    tiny preset), so a run measured that length instead of `--units`; the models mask it."""
    import numpy as np

    from megatron_lst.evaluation.generation import SamplingConfig, build_prompt, generate
    from megatron_lst.patching import PatchingConfig
    from megatron_lst.tokenizer.vocab import JointVocab

    bench = load_tool("bench_generation")
    vocab = JointVocab(512)
    prompt = build_prompt(vocab, units=np.arange(8))
    for kind, mode in (("lst", "static"), ("baseline", "none")):
        model = bench.build(kind, "tiny-cpu", vocab.size, vocab.eos_id)
        out = generate(model, prompt, vocab, PatchingConfig(mode, patch_size=4),
                       SamplingConfig(temperature=1.0, max_new_tokens=5, modality="speech"),
                       keep_logits=True)
        assert not out.stopped_at_eos
        assert all(logits[vocab.eos_id] == float("-inf") for logits in out.step_logits)


@pytest.mark.parametrize("flags, message", [
    (["--units", "0"], "--units must be >= 1, got 0"),
    (["--prompt-units", "0"], "--prompt-units must be >= 1, got 0"),
    (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
    (["--frame-rate", "0"], "--frame-rate must be a positive number of units a second, got 0.0"),
    (["--frame-rate", "nan"], "--frame-rate must be a positive number"),
    (["--preset", "huge"], "--preset huge is not a preset; choose one of tiny, "),
    (["--json", "MISSING/results.json"], "--json MISSING/results.json: directory MISSING does "
                                         "not exist"),
    (["--json", "TMP"], "--json TMP is a directory; name the results file"),
], ids=["units", "prompt-units", "patch-size", "frame-rate", "frame-rate-nan", "preset",
        "json-folder", "json-directory"])
def test_bad_flags_are_refused_before_any_run(tmp_path, monkeypatch, capsys, flags, message):
    """Each was a traceback (GenerationError, PatchingError, ZeroDivisionError, ...), the
    --json one only after every run."""
    bench = load_tool("bench_generation")
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the benchmark ran"))
    values = {"MISSING/results.json": str(tmp_path / "missing" / "results.json"),
              "TMP": str(tmp_path)}
    monkeypatch.setattr("sys.argv", ["bench_generation.py",
                                     *(values.get(flag, flag) for flag in flags)])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    message = (message.replace("MISSING/results.json", values["MISSING/results.json"])
               .replace("MISSING", str(tmp_path / "missing")).replace("TMP", str(tmp_path)))
    assert f"bench_generation.py: error: {message}" in capsys.readouterr().err
