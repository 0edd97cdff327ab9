"""Smoke test of tools/bench_model.py at the tiny preset: both models step, the report prints the
comparison with its FLOP ceiling, and the speech-heavy batch keeps the batch contract."""

import argparse

import torch
from tool_modules import load_tool


def test_speech_heavy_batch_keeps_the_contract():
    bench = load_tool("bench_model")
    batch = bench.speech_heavy_batch(batch=3, num_tokens=200, patch_size=4, seed=1)
    lengths = batch["patch_lengths"]
    assert (lengths.sum(1) == 201).all() and (lengths[:, 0] == 1).all()
    patches = (lengths > 0).sum(1).float()
    assert 2.5 < float((200 / patches).mean()) < 3.7  # speech-heavy: about 3 tokens per patch


def test_lst_and_baseline_steps_report(capsys):
    bench = load_tool("bench_model")
    args = argparse.Namespace(batch_size=2, patch_size=4, steps=1, warmup=0, threads=1,
                              device="cpu", dtype="float32")
    threads = torch.get_num_threads()
    try:
        results = [bench.measure(kind, "tiny", 96, args) for kind in ("lst", "baseline")]
    finally:
        torch.set_num_threads(threads)
    lst, base = results
    assert lst.tokens_per_row == 96 and base.tokens_per_row == lst.patches_per_row
    assert lst.step_flops > base.step_flops > 0
    assert abs(sum(lst.shares.values()) - 1) < 1e-6
    bench.report(results)
    out = capsys.readouterr().out
    assert "tiny N=96: LST raw tokens/s" in out and "FLOP ceiling" in out
