"""Smoke test of tools/bench_kernels.py on CPU at tiny shapes: every path runs and reports."""

import json

import torch
from tool_modules import load_tool


def test_pool_and_attention_benchmarks_run_on_cpu(tmp_path):
    bench = load_tool("bench_kernels")
    results = bench.bench_pool(
        bench.PoolShape(2, 64, 8, "aligned", "max"), "cpu", torch.float32, warmup=0, iters=1
    )
    results += bench.bench_attention(
        bench.AttentionShape(
            "encoder", batch=1, tokens=64, patches=16, slots=2, window=4, heads=2, head_dim=8
        ),
        "cpu",
        torch.float32,
        warmup=0,
        iters=1,
    )
    assert [r.impl for r in results] == [
        "segment_pool[torch-ref]",
        "scatter_reduce (LST ref)",
        "index_reduce",
        "patch_cross_attention[torch-ref]",
        "dense-mask SDPA",
    ]
    assert all(r.fwd_bwd_ms > 0 and r.rate > 0 for r in results), [r.note for r in results]
    bench.add_ratios(results)
    assert set(results[0].ratios) == {"scatter_reduce (LST ref)", "index_reduce"}
    bench.print_table(results, {})


def test_lengths_sum_to_the_token_count():
    bench = load_tool("bench_kernels")
    generator = torch.Generator().manual_seed(0)
    for kind in ("mean4", "aligned"):
        lengths = bench.draw_lengths(kind, 3, 500, generator)
        assert (lengths.sum(1) == 500).all() and lengths.max() <= 20


def test_main_writes_json(tmp_path, monkeypatch, capsys):
    bench = load_tool("bench_kernels")
    monkeypatch.setattr(
        bench,
        "shapes",
        lambda device, quick, tiny: (
            [bench.PoolShape(1, 32, 4, "mean4", "mean")],
            [bench.AttentionShape("decoder", 1, 32, 8, 1, 2, 1, 8)],
            None,
        ),
    )
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["paths"].startswith("PyTorch reference paths only")
    assert {"date", "command", "torch", "triton", "results"} <= set(report)
    assert len(report["results"]) == 5
    assert "segment_pool[torch-ref]" in capsys.readouterr().out
