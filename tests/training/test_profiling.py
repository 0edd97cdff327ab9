"""--profile and --manual-gc (`megatron_lst.training.profiling`): the PyTorch profiler's window
and trace, Python's garbage collection during training, and the checks of their flags."""

import gc
import json
import re
from pathlib import Path

import pytest
import torch

from megatron_lst.training import loop, profiling
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from training.training_cases import tiny_flags, write_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]

# The fewest flags validate_args takes (it reads no data).
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _automatic_gc_back_on():
    """A failing --manual-gc test leaves no later test without automatic collection."""
    yield
    gc.enable()


def _train(tmp_path: Path, *flags: str) -> loop.TrainingResult:
    args = validate_args(parse_args([*tiny_flags(write_corpus(tmp_path)), *flags]), 1)
    return loop.pretrain(args, index_cache_dir=tmp_path / "rows")


def _step_spans(events: list[dict]) -> dict[int, tuple[float, float]]:
    """(start, end) of each `ProfilerStep#k` range of a Chrome trace, by k."""
    return {int(e["name"].split("#")[1]): (e["ts"], e["ts"] + e["dur"])
            for e in events if e.get("name", "").startswith("ProfilerStep#")}


# --- --profile --use-pytorch-profiler -----------------------------------------------------

def test_the_pytorch_profiler_traces_the_iterations_of_the_window_and_no_other(tmp_path, capsys):
    _train(tmp_path, "--train-iters", "5", "--profile", "--use-pytorch-profiler",
           "--profile-step-start", "2", "--profile-step-end", "4",
           "--save", str(tmp_path / "ckpt"), "--save-interval", "100")

    traces = list((tmp_path / "ckpt" / "profile").iterdir())  # --profile-dir's default
    assert [t.name.split(".")[:2] for t in traces] == [["rank0", "iterations_2-3"]]
    assert traces[0].name.endswith(".pt.trace.json")
    assert f"rank 0: profile of iterations 2-3 written to {traces[0]}" in capsys.readouterr().out
    events = json.loads(traces[0].read_text())["traceEvents"]
    spans = _step_spans(events)
    assert sorted(spans) == [2, 3]  # not the warm-up iteration 1, nor 4 and 5
    operators = [e for e in events if e.get("cat") == "cpu_op"]
    for start, end in spans.values():  # each profiled iteration's forward and backward
        names = {e["name"] for e in operators if start <= e["ts"] <= end}
        assert {"aten::mm", "autograd::engine::evaluate_function: MmBackward0"} <= names
    assert all(any(start <= e["ts"] <= end for start, end in spans.values())
               for e in operators), "an operator outside the profiled iterations"


def test_a_run_that_ends_inside_the_window_writes_the_iterations_it_ran(tmp_path):
    _train(tmp_path, "--train-iters", "3", "--profile", "--use-pytorch-profiler",
           "--profile-step-start", "2", "--profile-step-end", "12",
           "--profile-dir", str(tmp_path / "traces"))

    [trace] = (tmp_path / "traces").iterdir()
    assert trace.name.startswith("rank0.iterations_2-3.")
    assert sorted(_step_spans(json.loads(trace.read_text())["traceEvents"])) == [2, 3]


def test_a_trace_that_cannot_be_written_is_dropped_and_training_goes_on(tmp_path, monkeypatch,
                                                                       capsys):
    def full_disk(self, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", full_disk)
    result = _train(tmp_path, "--train-iters", "3", "--profile", "--use-pytorch-profiler",
                    "--profile-step-start", "1", "--profile-step-end", "2",
                    "--profile-dir", str(tmp_path / "traces"))

    assert sorted(result.losses) == [1, 2, 3]
    assert re.search(r"rank 0: the profile of iterations 1-1 could not be written to \S+"
                     r"traces/rank0\.iterations_1-1\.\d+\.pt\.trace\.json \(\[Errno 28\] No "
                     r"space left on device.*\); training goes on without it",
                     capsys.readouterr().out)


def test_a_run_resumed_after_the_window_profiles_nothing(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, "--train-iters", "3", "--lr-decay-iters", "5", "--save", str(ckpt))
    _train(tmp_path, "--train-iters", "5", "--lr-decay-iters", "5", "--save", str(ckpt),
           "--load", str(ckpt),
           "--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
           "--profile-step-end", "4")

    assert ("rank 0: not profiling: the run resumed after iteration 3, past "
            "--profile-step-end 4") in capsys.readouterr().out
    assert list((ckpt / "profile").iterdir()) == []  # made writable by the flag checks


@pytest.mark.slow
@pytest.mark.distributed
def test_only_the_profile_ranks_write_a_trace(tmp_path):
    from distributed.harness import run_torchrun

    flags = tiny_flags(write_corpus(tmp_path), patching_mode="none")
    run = run_torchrun(2, [REPO_ROOT / "pretrain_lst.py", *flags, "--train-iters", "2",
                           "--profile", "--use-pytorch-profiler", "--profile-step-start", "1",
                           "--profile-step-end", "2", "--profile-ranks", "1",
                           "--profile-dir", str(tmp_path / "traces")])
    assert run.returncode == 0, run.output[-3000:]
    assert [t.name.split(".")[:2] for t in (tmp_path / "traces").iterdir()] == [
        ["rank1", "iterations_1-1"]]


# --- --manual-gc ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, collections", [
    # a full collection before iteration 1, after 2 and 4, and before the validation after
    # iteration 5; the youngest generation after it
    ([], [(0, 2), (2, 2), (4, 2), (5, 2), (5, 0)]),
    (["--no-manual-gc-eval"], [(0, 2), (2, 2), (4, 2)]),
])
def test_manual_gc_collects_at_the_interval_and_around_validation_only(tmp_path, monkeypatch,
                                                                       flags, collections):
    steps, enabled_in_steps, collected = [], [], []
    train_step = loop.train_step

    def recording_train_step(*args, **kwargs):
        enabled_in_steps.append(gc.isenabled())
        result = train_step(*args, **kwargs)
        steps.append(result)
        return result

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start" and not gc.isenabled():  # not an automatic collection
            collected.append((len(steps), info["generation"]))

    monkeypatch.setattr(loop, "train_step", recording_train_step)
    assert gc.isenabled()
    gc.callbacks.append(on_collection)  # the list gc calls, not a copy
    try:
        _train(tmp_path, "--train-iters", "5", "--manual-gc", "--manual-gc-interval", "2",
               *flags)
    finally:
        gc.callbacks.remove(on_collection)

    assert enabled_in_steps == [False] * 5
    assert collected == collections
    assert gc.isenabled()  # back on once training returns


def test_manual_gc_turns_automatic_collection_back_on_when_training_fails(tmp_path, monkeypatch):
    def failing_train_step(*args, **kwargs):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(loop, "train_step", failing_train_step)
    with pytest.raises(RuntimeError, match="the step failed"):
        _train(tmp_path, "--train-iters", "2", "--manual-gc")
    assert gc.isenabled()


def test_manual_gc_turns_automatic_collection_back_on_when_the_metrics_file_fails_to_close(
        tmp_path, monkeypatch):
    """A full disk that fails the metrics file's last flush left automatic collection off for
    the rest of the process (the demo trains several models in one)."""
    def failing_close(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop.MetricsFile, "close", failing_close)
    with pytest.raises(OSError, match="No space left"):
        _train(tmp_path, "--train-iters", "2", "--manual-gc")
    assert gc.isenabled()


# --- the flag checks -----------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--use-pytorch-profiler"], r"--use-pytorch-profiler only takes effect with --profile: add "
                                 r"--profile or drop it"),
    (["--profile-dir", "p", "--use-pytorch-profiler"],
     r"--use-pytorch-profiler, --profile-dir only take effect with --profile"),
    (["--profile", "--profile-dir", "p"],
     r"--profile-dir only takes effect with --use-pytorch-profiler: add --use-pytorch-profiler "
     r"or drop it"),
    (["--manual-gc-interval", "5"], r"--manual-gc-interval only takes effect with --manual-gc"),
    (["--no-manual-gc-eval"], r"--no-manual-gc-eval only takes effect with --manual-gc"),
    # silently ignored: a user who forgot --profile got no trace and no word of why
    (["--profile-step-start", "3", "--profile-ranks", "1"],
     r"--profile-step-start, --profile-ranks only take effect with --profile: add --profile "
     r"or drop them"),
    (["--manual-gc", "--manual-gc-interval", "-1"],
     r"--manual-gc-interval must be >= 0 \(0: collect only around validation\), got -1"),
    (["--profile", "--profile-step-start", "0"],
     r"--profile-step-start 0 and --profile-step-end 12 must satisfy 1 <= start < end"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"],
     r"--profile-step-start 5 and --profile-step-end 5 must satisfy 1 <= start < end: the "
     r"iterations start .. end - 1 are profiled"),
    (["--profile", "--profile-step-start", "11", "--profile-step-end", "20"],
     r"--profile-step-start 11 is past --train-iters 10: nothing would be profiled"),
    (["--profile", "--use-pytorch-profiler", "--profile-ranks", "0", "2", "-1"],
     r"--profile-ranks -1 2: not a global rank of this launch of 2 processes \(ranks 0 .. 1\)"),
    (["--profile", "--use-pytorch-profiler"],
     r"--use-pytorch-profiler writes a trace per profiled rank to --profile-dir \(default: "
     r"--tensorboard-dir, else <--save>/profile\): give one of them"),
])
def test_bad_profiling_and_gc_flags_are_refused_with_the_fix(flags, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(parse_args([*BASE, *flags]), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_cuda_profiler_is_refused_without_a_gpu():
    with pytest.raises(ArgumentError, match=r"--profile without --use-pytorch-profiler starts "
                                            r"CUDA's profiler .* no CUDA device: add "
                                            r"--use-pytorch-profiler"):
        validate_args(parse_args([*BASE, "--profile"]), 1)


def test_profile_dir_defaults_to_the_tensorboard_dir_then_the_save_dir(tmp_path):
    profiled = [*BASE, "--profile", "--use-pytorch-profiler", "--save", str(tmp_path / "s")]
    assert validate_args(parse_args(profiled), 1).profile_dir == str(tmp_path / "s" / "profile")
    # the rule alone: validate_args takes --tensorboard-dir only where tensorboard is installed
    args = parse_args([*profiled, "--tensorboard-dir", str(tmp_path / "tb")])
    profiling.validate_profiling(args, 1)
    assert args.profile_dir == str(tmp_path / "tb")


def test_an_unwritable_profile_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ArgumentError, match=r"--profile-dir .*file/traces cannot be written .*: "
                                            r"the profiler's traces go there"):
        validate_args(parse_args([*BASE, "--profile", "--use-pytorch-profiler",
                                  "--profile-dir", str(blocker / "traces")]), 1)
