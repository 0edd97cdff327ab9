"""Worker for test_coalesced_sum.py: `all_reduce_coalesced` over every rank of a gloo group.

Each rank fills tensors of three shapes and two dtypes (one of them a view into a larger buffer,
as megatron's `main_grad` is) with values that depend on the rank, sums them in place, and
reports them next to the buffer that holds the view.
"""

import argparse

import torch
import torch.distributed as dist
from distributed.harness import init_gloo, report_results

from megatron_lst.models.replicated_parameters import all_reduce_coalesced


def rank_tensors(rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    buffer = torch.full((10,), -1.0)  # [10] fp32, the view covers [2:8]
    tensors = [
        torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1),  # [2, 3]
        torch.full((4,), float(rank), dtype=torch.float64),  # [4]
        buffer[2:8].view(3, 2).fill_(rank + 0.5),  # [3, 2] view into buffer
    ]
    return tensors, buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    init_gloo()
    tensors, buffer = rank_tensors(dist.get_rank())
    all_reduce_coalesced(tensors, dist.group.WORLD)
    report_results(args.results, {"tensors": [t.tolist() for t in tensors],
                                  "dtypes": [str(t.dtype) for t in tensors],
                                  "buffer": buffer.tolist()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
