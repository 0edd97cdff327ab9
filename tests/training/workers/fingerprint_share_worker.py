"""Worker for test_data_fingerprint.py: every rank takes `training_data_fingerprints` of
`--prefix` (each given once or more; `{rank}` in it: that rank's own copy) and reports them, the
`.idx` files it digested whole, and the DatasetError it raised (None: none)."""


def main() -> None:
    import argparse

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.data.dataset import DatasetError
    from megatron_lst.training import data_fingerprint

    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", action="append", required=True)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    init_gloo()
    rank = torch.distributed.get_rank()
    digested = []
    digest_file = data_fingerprint.digest_file

    def counting_digest_file(path):
        digested.append(str(path))
        return digest_file(path)

    data_fingerprint.digest_file = counting_digest_file
    try:
        fingerprints = data_fingerprint.training_data_fingerprints(
            [(None, prefix.format(rank=rank)) for prefix in own.prefix])
        error = None
    except DatasetError as raised:
        fingerprints, error = None, str(raised)
    report_results(own.results, {"fingerprints": fingerprints, "digested": digested,
                                 "error": error})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
