"""Worker for test_harness.py: reports each rank's view of the process group.

`--fail-on-rank R` makes rank R raise instead, to check that failures reach the test.
"""

import argparse

import torch
import torch.distributed as dist
from distributed.harness import init_gloo, report_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fail-on-rank", type=int)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    init_gloo()
    rank = dist.get_rank()
    if rank == args.fail_on_rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    report_results(args.results, {"rank": rank, "world_size": dist.get_world_size(),
                                  "rank_sum": total.item()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
