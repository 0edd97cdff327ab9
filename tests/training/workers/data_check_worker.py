"""Worker for test_data_fingerprint.py: every rank compares the fingerprints of its own copy of
a dataset (`--prefix-per-rank`, `{rank}` in it) with `--saved` (a JSON file) through
`checkpoint_load._check_training_data`, and reports the refusal it raised (None: none)."""


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.training.checkpoint_load import _check_training_data
    from megatron_lst.training.data_fingerprint import training_data_fingerprints
    from megatron_lst.training.resume_check import ResumeConfigError, ResumePosition

    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix-per-rank", required=True)
    parser.add_argument("--saved", required=True)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    init_gloo()
    prefix = own.prefix_per_rank.format(rank=torch.distributed.get_rank())
    saved = json.loads(Path(own.saved).read_text())
    try:
        _check_training_data(saved, training_data_fingerprints([(None, prefix)]),
                             ResumePosition(2, 8), Path("ckpt/iter_0000002"))
        refusal = None
    except ResumeConfigError as error:
        refusal = str(error)
    report_results(own.results, {"refusal": refusal})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
