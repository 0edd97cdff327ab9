"""Scores are the same under TP=1, TP=2 (with and without sequence parallelism), PP=2 and DP=2
(each replica scores half the items), on every rank (fp32, gloo on CPU); for a model with the
newest features (grouped key/value heads, head sizes other than hidden / heads, packed-document
attention and RoPE positions) under TP=2 and PP=2 too, and its greedy generation under TP=2 gives
one process's tokens and logits, with and without the KV caches."""

from pathlib import Path

import numpy as np
import pytest
from distributed.harness import run_distributed

WORKER = Path(__file__).resolve().parent / "eval_parallel_worker.py"
MODES = ("S->S", "T->S", "S->T", "T->T")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def single_process():
    (record,) = run_distributed(WORKER, 1, ["--tp", "1", "--pp", "1"], timeout=300)
    return record["no_sp"]


@pytest.mark.parametrize("tp,pp,sequence_parallel", [(2, 1, "both"), (1, 2, "off"), (1, 1, "off")],
                         ids=["tp2", "pp2", "dp2"])
def test_scores_match_single_process(single_process, tp, pp, sequence_parallel):
    # Two processes each: the 1 x 1 layout is two data-parallel replicas.
    records = run_distributed(WORKER, 2, ["--tp", tp, "--pp", pp, "--sequence-parallel",
                                          sequence_parallel], timeout=300)
    for rank, record in enumerate(records):
        for variant, scores in record.items():
            for mode, expected in single_process.items():
                got = np.array(scores[mode])
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5,
                                           err_msg=f"rank {rank}, {variant}, {mode}")
    # The endings' scores differ, so equal scores are not an artefact of a constant model.
    assert np.ptp(single_process["S->S"]) > 1.0


@pytest.fixture(scope="module")
def single_process_newest_features():
    (record,) = run_distributed(WORKER, 1, ["--tp", "1", "--pp", "1", "--newest-features"],
                                timeout=300)
    return record["no_sp"]


def assert_same_generation(got: dict, expected: dict, where: str) -> None:
    for variant in ("cached", "full"):
        assert got[variant]["tokens"] == expected[variant]["tokens"], f"{where}, {variant}"
        for step, (logits, want) in enumerate(zip(got[variant]["logits"],
                                                  expected[variant]["logits"], strict=True)):
            np.testing.assert_allclose(np.array(logits), np.array(want), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{where}, {variant}, step {step}")


@pytest.mark.parametrize("tp,pp,sequence_parallel", [(2, 1, "both"), (1, 2, "off")],
                         ids=["tp2", "pp2"])
def test_newest_features_score_and_generate_as_one_process(single_process_newest_features, tp,
                                                           pp, sequence_parallel):
    expected = single_process_newest_features
    assert len(expected["generated"]["cached"]["tokens"]) > 1
    assert expected["generated"]["cached"]["tokens"] == expected["generated"]["full"]["tokens"]
    records = run_distributed(WORKER, 2, ["--tp", tp, "--pp", pp, "--sequence-parallel",
                                          sequence_parallel, "--newest-features"], timeout=300)
    for rank, record in enumerate(records):
        for variant, scores in record.items():
            for mode in MODES:
                np.testing.assert_allclose(np.array(scores[mode]), expected[mode], rtol=1e-6,
                                           atol=1e-5, err_msg=f"rank {rank}, {variant}, {mode}")
            if "generated" in scores:
                assert_same_generation(scores["generated"], expected["generated"],
                                       f"rank {rank}, {variant}")
    assert any("generated" in scores for scores in records[0].values()) == (pp == 1)
