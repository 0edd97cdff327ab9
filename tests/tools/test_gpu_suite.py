"""tools/gpu_suite.py's own machinery, without running the stages (CI's dry run does that): a
stage past its limit is killed and the next one still runs, the output stays two files, and the
summary's ratios are those of the JSON it reads."""

import json
import sys
import tarfile

from tool_modules import load_tool


def test_timed_out_stage_is_killed_and_the_next_still_runs(tmp_path):
    suite_tool = load_tool("gpu_suite")
    mode = suite_tool.Mode(
        name="test", budget_seconds=60, limits={"slow": 1, "fast": 10}, step_steps=(1, 1),
        lst_flags=[], baseline_flags=[], speech_heavy_flags=[], kernel_bench_flags=[],
        kernel_tests=[], kernel_tile_tests=[], correctness_flags=[])
    out = tmp_path / "out"
    out.mkdir()
    suite = suite_tool.Suite(mode, out, tmp_path / "work", command="test")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    slow = suite.run("slow", [sleeper], env={})
    fast = suite.run("fast", [[sys.executable, "-c", "print('fast done')"]], env={})
    assert slow.status == "timed out after 1 s" and 1 <= slow.seconds < 15
    assert fast.ok
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_suite.tar.gz") as archive:
        names = set(archive.getnames())
        log = archive.extractfile("gpu_suite/logs/slow.log").read().decode()
    assert {"gpu_suite/logs/fast.log", "gpu_suite/summary.txt"} <= names
    assert log.startswith("$ ") and "time.sleep(60)" in log
    assert "timed out after 1 s" in (out / "summary.txt").read_text()


def _step(tokens, positions, flops, seconds, split):
    return {"device": "NVIDIA H200", "median_step_seconds": seconds, "tokens_per_step": tokens,
            "global_positions_per_step": positions, "flops_per_step": flops,
            "tokens_per_second": tokens / seconds, "global_positions_per_second": positions / seconds,
            "tflops_per_device": flops / seconds / 1e12, "peak_tflops": 989.0,
            "mfu": flops / seconds / 989e12, "peak_memory_gib": 50.0, "setup_seconds": 9.0,
            "first_step_seconds": 20.0, "split_seconds": split}


def _model(model, tokens, patches, flops, seconds):
    return {"model": model, "preset": "paper-1b", "tokens_per_row": tokens,
            "patches_per_row": patches, "batch": 4, "step_seconds": seconds,
            "raw_tokens_per_second": 4 * tokens / seconds, "peak_memory_mb": 2048.0,
            "step_flops": flops, "shares": None}


def test_summary_ratios_come_from_the_measurements(tmp_path):
    suite_tool = load_tool("gpu_suite")
    split = {"local encoder": 0.05, "global transformer": 0.6, "local decoder": 0.1, "head": 0.1}
    # Speech-heavy rows: LST 3 tokens per patch at 1.5x the baseline's FLOPs, 3 s per step;
    # the baseline over the 4096 patches as tokens, 2 s per step.
    (tmp_path / "speech_heavy.json").write_text(json.dumps({
        "args": {"dtype": "bfloat16"},
        "results": [_model("lst", 3 * 4096, 4096, 1.5e15, 3.0),
                    _model("baseline", 4096, 4096, 1e15, 2.0)]}))
    (tmp_path / "step_lst.json").write_text(json.dumps(_step(24000, 16384, 1.2e15, 1.0, split)))
    text = "\n".join(suite_tool.summarise(tmp_path))
    # tokens/s ratio (3 * 4096 / 3) / (4096 / 2) = 2; ceiling 3 / 1.5 = 2; 100% of it
    assert "N/P 3.00" in text
    assert "over the baseline's: 2.00x; FLOP ceiling 2.00x; 100% of it" in text
    # MFU 1.2e15 / 1 s / 989e12 = 121.3%; local modules 0.15 s of a 1 s step
    assert "step benchmark, LST, 67/33 mix (NVIDIA H200): 1000.0 ms/step" in text
    assert "MFU 121.3% (target >= 40%); local modules + kernels 15% of the step" in text
