"""Worker for test_rank_failures.py: every rank hands its part to `share_or_stop` with no
failure, then with rank 1 alone failing, then with ranks 0 and 1 failing; every rank reports
what it got each time (the parts, or `[error type, message]`)."""


def main() -> None:
    import argparse

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.rank_failures import share_or_stop

    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    init_gloo()
    rank = torch.distributed.get_rank()
    failing = {"none": (), "rank 1": (1,), "ranks 0 and 1": (0, 1)}
    got = {}
    for case, ranks in failing.items():
        failure = f"rank {rank} broke" if rank in ranks else None
        try:
            got[case] = share_or_stop({"rank": rank}, failure,
                                      lambda failed: RuntimeError(repr(failed)))
        except RuntimeError as error:
            got[case] = [type(error).__name__, str(error)]
    report_results(own.results, got)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
