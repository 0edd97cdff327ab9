"""Worker for test_integrity.py: every rank runs `verify_checkpoint` on `--checkpoint` (a
directory with a manifest), rank 1 failing to read (EIO) what `--unreadable` names: its share of
the files ("files", while hashing) or the manifest ("manifest"); every rank reports what it
raised (`[error type, message]`, or None)."""


def main() -> None:
    import argparse
    import errno
    import pathlib

    import torch
    from distributed.harness import report_results

    from megatron_lst.checkpoint import integrity

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--unreadable", choices=["files", "manifest"], required=True)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    torch.distributed.init_process_group("gloo")

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    if torch.distributed.get_rank() == 1 and own.unreadable == "files":
        integrity.digest_file = unreadable
    elif torch.distributed.get_rank() == 1:
        read_text = pathlib.Path.read_text
        pathlib.Path.read_text = lambda path, *args, **kwargs: (
            unreadable() if path.name == integrity.MANIFEST_FILENAME
            else read_text(path, *args, **kwargs))
    try:
        integrity.verify_checkpoint(own.checkpoint)
        raised = None
    except Exception as error:
        raised = [type(error).__name__, str(error)]
    report_results(own.results, raised)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
