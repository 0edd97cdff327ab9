"""Worker for test_process_group_release.py: builds the parallel layout with
`initialize_parallel`, tears it down with `destroy_parallel` and fails naming the gloo threads
still running in this process (none, once every group is released)."""

import argparse
import pathlib

from distributed.harness import report_results


def gloo_threads() -> list[str]:
    """Names of this process's threads that gloo started (Linux: /proc/self/task)."""
    names = [(task / "comm").read_text().strip()
             for task in pathlib.Path("/proc/self/task").iterdir()]
    return sorted(name for name in names if "gloo" in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    report_results(args.results, None)  # a collective: before the groups go
    destroy_parallel()
    leftover = gloo_threads()
    if leftover:
        raise SystemExit(f"gloo threads still running after destroy_parallel: {leftover}")


if __name__ == "__main__":
    main()
