"""Worker for test_loop.py: rank 0's part of a collective check (`checkpoint_save.on_rank0`, as the
loop runs the --save room check and lock) fails with an OSError, then with the check's own
refusal; every rank reports the error it raised each time, as `[type name, message]`."""


def main() -> None:
    import argparse
    import errno

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.training import checkpoint_save, save_directory

    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    init_gloo()
    failures = {
        "oserror": OSError(errno.EACCES, "Permission denied", "/save"),
        "refusal": save_directory.InsufficientSpaceError("--save /save has 0.0 MiB free"),
    }
    raised = {}
    for name, failure in failures.items():
        def check(failure=failure):
            raise failure

        try:
            checkpoint_save.on_rank0(check, save_directory.InsufficientSpaceError)
            raised[name] = None
        except Exception as error:
            raised[name] = [type(error).__name__, str(error)]
    report_results(own.results, raised)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
