"""Worker for test_slow_row_index.py: `build_datasets` on every rank under a process group whose
collectives time out after `--timeout-seconds`, with rank 0's build slowed down past it.

Reports each rank's train rows and whether the rank found rank 0's cached row indices.
"""

import argparse
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from distributed.harness import init_gloo, report_results

from megatron_lst.training import data_provider
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.stop_together import attempt_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--timeout-seconds", type=float, required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--results", required=True)
    args, flags = parser.parse_known_args()

    init_gloo()  # the ranks may start seconds apart on a busy machine
    dist.barrier()
    attempt_token()  # the one broadcast of this process's first rank_zero_first, in step here
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=args.timeout_seconds))
    rank = dist.get_rank()
    build = data_provider._build_datasets

    found_cache = []

    def slow_build(run_args, cache_root):
        found_cache.append(any(Path(args.cache).rglob("lst_rows_*.npy")))
        if rank == 0:  # a corpus whose row indices take longer than the collectives may wait
            time.sleep(3 * args.timeout_seconds)
        return build(run_args, cache_root)

    data_provider._build_datasets = slow_build
    datasets = data_provider.build_datasets(validate_args(parse_args(flags), 2), args.cache)
    # Rank 0 sees rank 1 finish up to a poll (1 s) late: on a busy machine, more than the short
    # timeout that rank 1 would wait for it in the gathering of the results.
    dist.distributed_c10d._set_pg_timeout(timedelta(minutes=5))
    report_results(args.results, {"rank": rank, "train_rows": len(datasets.train),
                                  "found_rank0_cache": found_cache == [True]})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
