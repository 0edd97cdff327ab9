"""examples/demo/run_downstream.py (`make demo-downstream`): what it removes is its own."""

import json

import pytest
from tool_modules import TOOLS, load_tool
from training.training_cases import fake_checkpoint

from megatron_lst.training.checkpointing import METADATA_FILENAME

DEMO_DIR = TOOLS.parent / "examples" / "demo"


def _fake_run(save_dir, tokenizer):
    record = fake_checkpoint(save_dir, 240) / METADATA_FILENAME
    record.write_text(json.dumps({"args": {"tokenizer_model": str(tokenizer)}}))


def test_an_out_dir_holding_another_run_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                  capsys):
    """`--out-dir ckpt` beside a real run in `ckpt/asr/lst`: the script removed that run's
    folder before fine-tuning."""
    import megatron_lst.demo_corpus.build as build

    corpus = tmp_path / "corpus"
    for name in ("lst", "baseline"):  # the pretrained demo runs, so that the demo does not run
        _fake_run(tmp_path / "demo" / name, corpus / "tokenizer" / "spm.model")
    theirs = tmp_path / "ckpt" / "asr" / "lst"
    _fake_run(theirs, tmp_path / "their_spm.model")
    monkeypatch.setattr(build, "build_demo_corpus",
                        lambda *args, **kwargs: pytest.fail("the corpus was read"))
    with pytest.raises(SystemExit) as stopped:
        load_tool("run_downstream", DEMO_DIR).run(
            ["--demo-dir", str(tmp_path / "demo"), "--out-dir", str(tmp_path / "ckpt"),
             "--corpus-dir", str(corpus)])
    assert stopped.value.code == 2
    assert f"--out-dir: {theirs} is not an earlier demo fine-tuning run" in capsys.readouterr().err
    assert (theirs / "iter_0000240").is_dir()
