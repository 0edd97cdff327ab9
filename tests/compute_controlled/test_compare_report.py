"""compare.py report on runs that are no comparison, and on malformed --runs."""

import json

import pytest
from compare import build_parser

VOCAB = {"text_size": 300, "num_units": 64, "size": 370, "tokenizer_sha256": "aa"}


def _write_run(root, name, vocab=VOCAB, data=("0.67", "text", "0.33", "speech"), num_items=5,
               metrics_lines=None):
    """A run directory: metrics.jsonl, eval.json and a checkpoint's metadata at iteration 4."""
    from megatron_lst.checkpoint.integrity import MEGATRON_CONFIG_FILENAME
    from megatron_lst.training.checkpointing import FORMAT_VERSION, METADATA_FILENAME

    run_dir = root / name
    checkpoint = run_dir / "iter_0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / METADATA_FILENAME).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "iteration": 4, "vocab": vocab, "args": {"data_path": list(data), "split": "98,2,0"}}))
    (checkpoint / MEGATRON_CONFIG_FILENAME).write_text("{}")
    lines = metrics_lines or [json.dumps({"iteration": i, "loss": 2.0 / i, "flops": 10.0 * i,
                                          "tokens": 5 * i, "global_positions": 4 * i})
                              for i in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "eval.json").write_text(json.dumps({"results": {"storycloze": {
        "S->S": {"accuracy": 0.6, "num_items": float(num_items)}}}}))
    return run_dir


def _report(tmp_path, *runs):
    options = build_parser().parse_args(["report", "--runs", *runs,
                                         "--out-dir", str(tmp_path / "out")])
    return options.run(options)


def test_comparable_runs_are_reported(tmp_path):
    lst, base = _write_run(tmp_path, "lst"), _write_run(tmp_path, "base")
    assert _report(tmp_path, f"lst={lst}", f"baseline={base}") == 0
    rows = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [(r["model"], r["steps"], r["storycloze S->S"]) for r in rows] == [
        ("lst", 4, 0.6), ("baseline", 4, 0.6)]


@pytest.mark.parametrize("odd, message", [
    ({"vocab": {**VOCAB, "num_units": 100}}, "trained with different vocabulary"),
    ({"vocab": {**VOCAB, "tokenizer_sha256": "bb"}}, "trained with different vocabulary"),
    ({"data": ("1.0", "other_text")}, "trained with different data"),
    ({"num_items": 6}, "storycloze was scored on different items per run"),
])
def test_runs_that_are_no_comparison_are_refused(tmp_path, odd, message):
    lst, base = _write_run(tmp_path, "lst", **odd), _write_run(tmp_path, "base")
    with pytest.raises(SystemExit, match=f"report: .*{message}"):
        _report(tmp_path, f"lst={lst}", f"baseline={base}")
    assert not (tmp_path / "out" / "comparison.json").exists()


def test_bad_runs_are_named(tmp_path):
    lst = _write_run(tmp_path, "lst")
    with pytest.raises(SystemExit, match=r"--runs 'lst' is not NAME=SAVE_DIR"):
        _report(tmp_path, "lst")
    with pytest.raises(SystemExit, match=r"run baseline: no directory .*missing"):
        _report(tmp_path, f"lst={lst}", f"baseline={tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match=r"--runs names 'lst' twice"):
        _report(tmp_path, f"lst={lst}", f"lst={lst}")
    damaged = _write_run(tmp_path, "damaged", metrics_lines=['{"iteration": 1, "loss": 1.0, '
                                                             '"flops": 1, "tokens": 1, '
                                                             '"global_positions": 1}',
                                                             '{"iteration": 2, "lo'])
    with pytest.raises(SystemExit, match=r"run damaged: .*metrics.jsonl: line 2 is no metrics"):
        _report(tmp_path, f"lst={lst}", f"damaged={damaged}")


def test_a_damaged_eval_json_is_named(tmp_path):
    lst, base = _write_run(tmp_path, "lst"), _write_run(tmp_path, "base")
    (base / "eval.json").write_text('{"results": {"storycloze": {"S->S": {"accur')
    with pytest.raises(SystemExit, match=r"run baseline: .*eval.json is damaged .*score the run "
                                         r"again with `compare.py evaluate"):
        _report(tmp_path, f"lst={lst}", f"baseline={base}")
    (base / "eval.json").write_text('{"results": [1]}')
    with pytest.raises(SystemExit, match=r"run baseline: .*eval.json is damaged"):
        _report(tmp_path, f"lst={lst}", f"baseline={base}")


def test_evaluate_refuses_what_it_cannot_score_before_loading(tmp_path, capsys):
    def evaluate(*flags):
        options = build_parser().parse_args(["evaluate", "--checkpoint", str(tmp_path / "none"),
                                             "--out", str(tmp_path / "eval.json"), *flags])
        return options.run(options)

    with pytest.raises(SystemExit, match="two files share a name"):
        evaluate("--items", "a/storycloze.jsonl", "b/storycloze.jsonl")
    with pytest.raises(SystemExit):
        evaluate("--items", "a/storycloze.jsonl", "--modes", "S-S")
    assert "invalid choice: 'S-S'" in capsys.readouterr().err


def _plan(tmp_path, tokenizer, *flags, lst_config="tiny_cpu_lst.yaml"):
    from compare import REPO_ROOT

    configs = REPO_ROOT / "examples" / "configs"
    options = build_parser().parse_args([
        "plan", "--lst-config", str(configs / lst_config),
        "--baseline-config", str(configs / "tiny_cpu_baseline.yaml"),
        "--tokenizer-model", str(tokenizer), "--out", str(tmp_path / "plan.json"), *flags])
    return options.run(options)


@pytest.mark.parametrize("flags, message", [
    (["--budget-steps", "0"], "argument --budget-steps: must be > 0, got 0"),
    (["--budget-flops", "nan"], "argument --budget-flops: must be > 0, got nan"),
    (["--budget-steps", "10", "--world-size", "0"], "argument --world-size: must be > 0"),
    (["--budget-steps", "10", "--tokens-per-patch", "-1"], "--tokens-per-patch: must be > 0"),
])
def test_plan_refuses_budgets_that_buy_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        _plan(tmp_path, "unused.model", *flags)
    assert message in capsys.readouterr().err


def test_plan_names_what_it_cannot_plan(tmp_path, capfd, caplog, small_tokenizer):
    with pytest.raises(SystemExit, match=r"plan: .*no_such.yaml: --config .*no such file"):
        _plan(tmp_path, small_tokenizer, "--budget-steps", "3", lst_config="no_such.yaml")
    assert _plan(tmp_path, small_tokenizer, "--budget-steps", "3") == 0
    assert "--save-interval" not in caplog.text  # the runs save, the plan does not
    written = (tmp_path / "plan.json").read_text()
    assert json.loads(written)["steps"] == {"lst": 3, "baseline": 3}
    # A budget below one step: plan_compute.py says why, and the earlier plan stays.
    with pytest.raises(SystemExit, match=r"plan: tools/plan_compute.py found no plan \(above\); "
                                         r".*plan.json is left as it was"):
        _plan(tmp_path, small_tokenizer, "--budget-flops", "1")
    assert "the budget buys no training step" in capfd.readouterr().err  # the child's
    assert (tmp_path / "plan.json").read_text() == written


def test_runs_short_of_their_plan_stale_scores_and_nan_losses_are_noted(tmp_path, capsys):
    nan = float("nan")
    lines = [json.dumps({"iteration": i, "loss": nan if i > 2 else 1.0, "flops": 10.0 * i,
                         "tokens": 5 * i, "global_positions": 4 * i,
                         **({"valid_loss": nan} if i == 4 else {})}) for i in range(1, 5)]
    lst, base = _write_run(tmp_path, "lst", metrics_lines=lines), _write_run(tmp_path, "base")
    evaluation = json.loads((lst / "eval.json").read_text())
    (lst / "eval.json").write_text(json.dumps({**evaluation, "iteration": 2}))
    (base / "eval.json").write_text(json.dumps({**evaluation, "iteration": 4}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"steps": {"lst": 6, "baseline": 4}}))
    _report(tmp_path, f"lst={lst}", f"baseline={base}")
    rows = json.loads((out / "comparison.json").read_text(),  # standard JSON: no NaN
                      parse_constant=lambda constant: pytest.fail(f"{constant} in the JSON"))
    assert rows[0]["note"] == ("trained 4 of its planned 6 steps; scored at iteration 2, not its "
                               "last 4; NaN or infinite loss at 2 iteration(s), first 3")
    assert rows[0]["valid loss"] is None
    assert "note" not in rows[1]
    assert "note: lst: trained 4 of its planned 6 steps" in capsys.readouterr().out


def test_plan_describes_the_model_and_rows_lst_train_builds(tmp_path):
    """`compare.py plan` handed plan_compute.py neither the head shapes (local GQA, kv-channels),
    the local FFN width, one-layer cross-attention nor the padded row (--max-tokens), so it
    planned another model than the runs train and log: here the per-step FLOPs of the model
    lst-train builds from the config must be the ones planned."""
    from compare import REPO_ROOT, plan_compute_flags
    from tool_modules import load_tool

    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.compute_plan import StepShape
    from megatron_lst.training.flops import ModelShape
    from megatron_lst.training.model_provider import lst_config_from_args

    config = tmp_path / "lst.yaml"
    config.write_text((REPO_ROOT / "examples" / "configs" / "tiny_cpu_lst.yaml").read_text() + "\n".join([
        "kv-channels: 8", "num-query-groups: 2",
        *(f"local-{side}-{key}" for side in ("encoder", "decoder")
          for key in ("query-groups: 1", "kv-channels: 8", "ffn-hidden-size: 48")),
        "cross-attn-all-layers-encoder: false", "cross-attn-all-layers-decoder: false", ""]))
    args = validate_args(parse_args(["--config", str(config)]), 1)
    tool = load_tool("plan_compute")
    planned = tool.build_parser().parse_args(
        ["--budget-steps", "1", *plan_compute_flags(args, 100, 1.3)])
    planned_shape = ModelShape.from_model_config(tool.model_config(planned))
    step = StepShape(planned.seq_length, planned.global_batch_size, planned.tokens_per_patch,
                     planned.max_tokens)

    trained = lst_config_from_args(args, planned_shape.vocab_size, 2)
    assert planned_shape == ModelShape.from_model_config(trained)
    assert step.computed_tokens_per_row(planned_shape) == args.max_tokens == 512

    local = tmp_path / "odd.yaml"
    local.write_text(config.read_text().replace("local-decoder-ffn-hidden-size: 48",
                                                "local-decoder-ffn-hidden-size: 64"))
    with pytest.raises(SystemExit, match="differ in ffn_hidden_size"):
        plan_compute_flags(validate_args(parse_args(["--config", str(local)]), 1), 100, 1.3)


def test_plan_refuses_a_baseline_with_other_global_head_shapes(tmp_path):
    """The plan costs the baseline as LST's global stack over tokens: a baseline config with
    other key/value heads, head size or FFN width would train another model than planned."""
    from compare import REPO_ROOT

    configs = REPO_ROOT / "examples" / "configs"
    baseline = tmp_path / "baseline.yaml"
    baseline.write_text((configs / "tiny_cpu_baseline.yaml").read_text() + "num-query-groups: 2\n")
    options = build_parser().parse_args([
        "plan", "--lst-config", str(configs / "tiny_cpu_lst.yaml"), "--baseline-config",
        str(baseline), "--tokenizer-model", "unused.model", "--budget-steps", "3",
        "--out", str(tmp_path / "plan.json")])
    with pytest.raises(SystemExit, match=r"the configs differ in num_query_groups \(4 vs 2\)"):
        options.run(options)


def test_a_failed_write_keeps_the_previous_comparison(tmp_path):
    """comparison.json was written in place: a write that failed (a full disk, here a file-size
    limit of 64 bytes in a child process) left it cut short, the previous comparison lost. It is
    now replaced whole or not at all."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    lst, base = _write_run(tmp_path, "lst"), _write_run(tmp_path, "base")
    assert _report(tmp_path, f"lst={lst}", f"baseline={base}") == 0
    comparison = tmp_path / "out" / "comparison.json"
    before = comparison.read_bytes()
    assert len(before) > 64
    study_dir = Path(__file__).resolve().parents[2] / "examples" / "compute_controlled"
    limited = (
        "import resource, signal, sys\n"
        f"sys.path.insert(0, {str(study_dir)!r})\n"
        "from compare import build_parser\n"
        "options = build_parser().parse_args(sys.argv[1:])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit("
        "resource.RLIMIT_FSIZE)[1]))\n"
        "options.run(options)\n")
    run = subprocess.run([sys.executable, "-c", limited, "report", "--runs", f"lst={lst}",
                          f"baseline={base}", "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode != 0 and "File too large" in run.stderr, run.stderr
    assert comparison.read_bytes() == before
    assert sorted(p.name for p in comparison.parent.iterdir()) == [
        "comparison.json", "loss_vs_flops.png"]
