"""Ranks wait for rank 0's row indices for as long as building them takes, beyond the process
group's timeout (which a collective wait would hit)."""

import pytest
from training.training_cases import tiny_flags, write_corpus

from distributed.harness import WORKERS_DIR, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_row_index_build_longer_than_the_distributed_timeout_is_waited_for(tmp_path):
    # Was a broadcast on gloo/NCCL: rank 1 died in a timeout after --distributed-timeout-minutes.
    flags = tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "3"]
    records = run_distributed(WORKERS_DIR / "slow_row_index.py", 2,
                              ["--timeout-seconds", "2", "--cache", tmp_path / "cache", *flags],
                              timeout=240)
    assert [record["train_rows"] for record in records] == [12, 12]  # 3 iterations x 4 rows
    # Rank 1 looked for the cache only after rank 0 had written it.
    assert [record["found_rank0_cache"] for record in records] == [False, True]
