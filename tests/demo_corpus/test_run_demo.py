"""examples/demo/run_demo.py (`make demo`): its flags are checked before the corpus is built."""

from dataclasses import asdict

import pytest
from tool_modules import TOOLS, load_tool

DEMO_DIR = TOOLS.parent / "examples" / "demo"


def test_a_run_too_short_for_the_warm_up_is_refused_before_the_corpus_is_built(
        tmp_path, monkeypatch, capsys):
    """It was a traceback (ArgumentError) after minutes of corpus building and after the previous
    demo run was removed."""
    import megatron_lst.demo_corpus.build as build

    def corpus_built(*args, **kwargs):
        raise AssertionError("the corpus was built before --train-iters was checked")

    monkeypatch.setattr(build, "build_demo_corpus", corpus_built)
    with pytest.raises(SystemExit) as stopped:
        load_tool("run_demo", DEMO_DIR).run(["--train-iters", "4", "--out-dir", str(tmp_path / "out"),
                                             "--corpus-dir", str(tmp_path / "corpus")])
    assert stopped.value.code == 2
    assert "--train-iters 4: --lr-warmup-iters 5 must be in [0, --lr-decay-iters 4)" \
        in capsys.readouterr().err


def test_a_second_demo_replaces_the_first_runs_checkpoints(tmp_path, monkeypatch):
    """`make demo` twice: the flag check refused the second ('--save ... already holds
    ['iter_0003600']') although the demo removes its previous runs before training."""
    import megatron_lst.demo_corpus.build as build

    class CorpusBuilt(Exception):
        pass

    def corpus_built(*args, **kwargs):
        raise CorpusBuilt

    out = tmp_path / "out"
    _fake_demo_runs(out, tmp_path / "corpus")
    monkeypatch.setattr(build, "build_demo_corpus", corpus_built)
    with pytest.raises(CorpusBuilt):  # past the flag check
        load_tool("run_demo", DEMO_DIR).run(["--out-dir", str(out), "--corpus-dir",
                                             str(tmp_path / "corpus")])


def _fake_demo_runs(out, corpus_dir, tokenizer=None):
    """A checkpoint in `out/lst` and `out/baseline` recording the tokenizer the run trained with
    (the demo corpus's by default)."""
    import json

    from training.training_cases import fake_checkpoint

    from megatron_lst.training.checkpointing import METADATA_FILENAME

    tokenizer = tokenizer or corpus_dir / "tokenizer" / "spm.model"
    for name in ("lst", "baseline"):
        record = fake_checkpoint(out / name, 3600) / METADATA_FILENAME
        record.write_text(json.dumps({"args": {"tokenizer_model": str(tokenizer)}}))


def test_an_out_dir_holding_another_run_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                  capsys):
    """`--out-dir ckpt` beside a real run in `ckpt/lst`: the demo removed that run's folder."""
    import megatron_lst.demo_corpus.build as build

    out = tmp_path / "ckpt"
    _fake_demo_runs(out, tmp_path / "corpus", tokenizer=tmp_path / "spm.model")
    monkeypatch.setattr(build, "build_demo_corpus",
                        lambda *args, **kwargs: pytest.fail("the corpus was built"))
    with pytest.raises(SystemExit) as stopped:
        load_tool("run_demo", DEMO_DIR).run(["--out-dir", str(out), "--corpus-dir",
                                             str(tmp_path / "corpus")])
    assert stopped.value.code == 2
    assert f"--out-dir: {out / 'lst'} is not an earlier demo run" in capsys.readouterr().err
    assert (out / "lst" / "iter_0003600").is_dir()


def test_a_corpus_dir_of_other_files_is_a_usage_error(tmp_path, capsys):
    """`--corpus-dir` naming a folder of the user's own `text/` stopped with a traceback (or,
    before the build checked, lost that folder)."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "mine.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as stopped:
        load_tool("run_demo", DEMO_DIR).run(["--out-dir", str(tmp_path / "out"),
                                             "--corpus-dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"--corpus-dir: {tmp_path} holds text, which no demo corpus build wrote" \
        in capsys.readouterr().err
    assert (tmp_path / "text" / "mine.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize(("scale", "eval_items"), [("1", 300), ("2", 300), ("0.5", 150),
                                                   ("0.05", 50), ("0.001", 50)])
def test_a_corpus_scale_below_1_shrinks_the_evaluation_sets_too(tmp_path, monkeypatch, scale,
                                                                 eval_items):
    """A quick try at --corpus-scale 0.05 synthesised the speech of all 300 items of every
    evaluation set (about 4 minutes); at scale 1 the corpus is the default one, every setting
    its cache key hashes as before, so the README's results and a built corpus stay as they are."""
    import megatron_lst.demo_corpus.build as build
    from megatron_lst.demo_corpus.build import DemoCorpusConfig

    class CorpusBuilt(Exception):
        pass

    configs = []

    def corpus_built(out_dir, config):
        configs.append(config)
        raise CorpusBuilt

    monkeypatch.setattr(build, "build_demo_corpus", corpus_built)
    with pytest.raises(CorpusBuilt):
        load_tool("run_demo", DEMO_DIR).run(["--out-dir", str(tmp_path / "out"), "--corpus-dir",
                                             str(tmp_path / "corpus"), "--corpus-scale", scale])
    expected = {**asdict(DemoCorpusConfig(seed=0, scale=float(scale))), "eval_items": eval_items}
    assert asdict(configs[0]) == expected
    if scale == "1":  # what the demo built before: build_demo_corpus(dir, seed=0, scale=1.0)
        assert configs[0] == DemoCorpusConfig(seed=0, scale=1.0)


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_a_corpus_scale_that_is_no_positive_number_is_a_usage_error(tmp_path, monkeypatch, capsys,
                                                                    scale):
    """It was a ValueError traceback from the corpus build (nan and inf not even that)."""
    import megatron_lst.demo_corpus.build as build

    monkeypatch.setattr(build, "build_demo_corpus",
                        lambda *args, **kwargs: pytest.fail("the corpus was built"))
    with pytest.raises(SystemExit) as stopped:
        load_tool("run_demo", DEMO_DIR).run(["--out-dir", str(tmp_path / "out"), "--corpus-dir",
                                             str(tmp_path / "corpus"), "--corpus-scale", scale])
    assert stopped.value.code == 2
    assert (f"--corpus-scale: scale must be a positive number, got {float(scale)}"
            in capsys.readouterr().err)


def test_the_demos_clock_starts_before_its_flag_checks(tmp_path, monkeypatch):
    """`demo took N min` started counting after the flag checks, whose import of megatron took
    5-15 s of the demo's wall time on 2 cores."""
    import time
    from types import SimpleNamespace

    import megatron_lst.demo_corpus.build as build

    class CorpusBuilt(Exception):
        pass

    def corpus_built(*args, **kwargs):
        raise CorpusBuilt

    events = []
    demo = load_tool("run_demo", DEMO_DIR)
    monkeypatch.setattr(demo, "time", SimpleNamespace(
        perf_counter=lambda: events.append("clock read") or time.perf_counter()))
    check_train_iters = demo.check_train_iters
    monkeypatch.setattr(demo, "check_train_iters",
                        lambda *args: events.append("flags checked") or check_train_iters(*args))
    monkeypatch.setattr(build, "build_demo_corpus", corpus_built)
    with pytest.raises(CorpusBuilt):
        demo.run(["--out-dir", str(tmp_path / "out"), "--corpus-dir", str(tmp_path / "corpus")])
    assert events[:2] == ["clock read", "flags checked"]


def test_the_time_report_names_each_stage_and_the_rest():
    report = load_tool("run_demo", DEMO_DIR).format_time_report(
        690.0, {"corpus": 150.0, "lst training": 330.0, "lst scoring": 30.0})
    assert report == ("demo took 11.5 min (corpus 2.5, lst training 5.5, lst scoring 0.5, "
                      "the rest 3.0)")
