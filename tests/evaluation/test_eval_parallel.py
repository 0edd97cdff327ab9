"""Scores are the same under TP=1, TP=2 (with and without sequence parallelism), PP=2 and DP=2
(each replica scores half the items), on every rank (fp32, gloo on CPU)."""

from pathlib import Path

import numpy as np
import pytest
from distributed.harness import run_distributed

WORKER = Path(__file__).resolve().parent / "eval_parallel_worker.py"

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
