"""Worker for test_integrity.py: every rank runs `verify_checkpoint` on `--checkpoint`, rank
`--failing-rank` failing (EIO) the step `--unreadable` names: hashing its share of the files
("files"), reading the manifest ("manifest"), listing the directory ("listing"), reading the
index ("index"), checking the files the index points into ("bounds"), reading common.pt
("common") or megatron's metadata.json ("config"), or seeing an index that lists one object
fewer than rank 0's ("stale-index"); every rank reports what it raised (`[error
type, message]`, or None)."""


def main() -> None:
    import argparse
    import builtins
    import errno
    import pathlib

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.checkpoint import integrity, safe_pickle

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--unreadable", required=True, choices=[
        "files", "manifest", "listing", "index", "bounds", "common", "config",
        "stale-index"])
    parser.add_argument("--failing-rank", type=int, default=1)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    init_gloo()
    checkpoint = pathlib.Path(own.checkpoint)

    def unreadable(name: str | None = None):
        """A stand-in that fails with EIO, naming `name` in `checkpoint` (None: no file)."""
        def fail(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error",
                          *([] if name is None else [str(checkpoint / name)]))
        return fail

    unreadable_files = {  # module, function, file its failure names
        "files": (integrity, "digest_file", None),
        "listing": (integrity, "_listed_files", ""),
        "index": (safe_pickle, "read_dcp_metadata", ".metadata"),
        "bounds": (safe_pickle, "check_file_bounds", "__0_0.distcp"),
        "common": (safe_pickle, "check_common_state", "common.pt"),
        "config": (integrity, "_megatron_config_problems", "metadata.json"),
    }
    if torch.distributed.get_rank() == own.failing_rank and own.unreadable == "manifest":
        opened = builtins.open
        builtins.open = lambda path, *args, **kwargs: (
            unreadable()() if str(path).endswith(f"/{integrity.MANIFEST_FILENAME}")
            else opened(path, *args, **kwargs))
    elif torch.distributed.get_rank() == own.failing_rank and own.unreadable == "stale-index":
        byte_items = safe_pickle.byte_items
        safe_pickle.byte_items = lambda metadata: byte_items(metadata)[:-1]
    elif torch.distributed.get_rank() == own.failing_rank:
        module, function, name = unreadable_files[own.unreadable]
        setattr(module, function, unreadable(name))
    try:
        integrity.verify_checkpoint(own.checkpoint)
        raised = None
    except Exception as error:
        raised = [type(error).__name__, str(error)]
    report_results(own.results, raised)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
