"""`all_reduce_coalesced` (the encoder-replica gradient sum) gives every rank the per-tensor
sums, in each tensor's own dtype and storage (views into a larger buffer included)."""

import pytest
import torch

from distributed.harness import WORKERS_DIR, run_distributed
from distributed.workers.coalesced_sum import rank_tensors

pytestmark = [pytest.mark.distributed]

WORLD_SIZE = 3


def test_every_rank_gets_the_sums_in_place():
    records = run_distributed(WORKERS_DIR / "coalesced_sum.py", WORLD_SIZE, timeout=120)
    per_rank = [rank_tensors(rank) for rank in range(WORLD_SIZE)]
    expected = [sum(tensors[i] for tensors, _ in per_rank) for i in range(3)]
    untouched = torch.full((10,), -1.0)
    untouched[2:8] = expected[2].flatten()
    for rank, record in enumerate(records):
        assert record["dtypes"] == [str(t.dtype) for t in expected], f"rank {rank}"
        for got, want in zip(record["tensors"], expected, strict=True):
            torch.testing.assert_close(torch.tensor(got, dtype=want.dtype), want,
                                       rtol=0, atol=0)
        # the view's buffer holds the sum inside the view and nothing else changed
        torch.testing.assert_close(torch.tensor(record["buffer"]), untouched, rtol=0, atol=0)
