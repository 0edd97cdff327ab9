"""Worker for test_resume.py and test_loop.py: `pretrain` runs of real `lst-train` flags.

    train_worker.py --training-run "FLAGS" [--training-run "FLAGS" ...] --results FILE

Each `--training-run` is one `lst-train` command line (shell-quoted), parsed and validated as
`pretrain_lst.py` does and trained by `megatron_lst.training.loop.pretrain`, one after the other
in the same processes (the process group is created once and kept, so the parallel layout is
set up and torn down per run). Reports per rank the list of runs: losses and eval losses by
iteration, the iteration resumed from, the last iteration, the checkpoints written.

dist-checkpoint saving spawns a helper that re-imports this file: everything heavy is imported
under the __main__ guard only.
"""


def main() -> None:
    import argparse
    import os
    import shlex

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain

    parser = argparse.ArgumentParser()
    parser.add_argument("--training-run", action="append", required=True)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    init_gloo()
    runs = []
    for flags in own.training_run:
        args = validate_args(parse_args(shlex.split(flags)), world_size)
        result = pretrain(args)
        runs.append({
            "losses": {str(k): v for k, v in result.losses.items()},
            "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
            "flops": {str(k): v for k, v in result.flops.items()},
            "resumed_from": result.resumed_from,
            "iteration": result.iteration,
            "consumed_samples": result.consumed_samples,
            "checkpoints": result.checkpoints,
        })
    report_results(own.results, runs)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
