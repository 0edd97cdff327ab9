"""Worker for test_virtual_pipeline_story_eval.py: one `pretrain` run of real `lst-train` flags
with `--eval-data`, reporting per rank the story accuracy by iteration and every ending's
log-probability each evaluation scored (`score_items`, recorded in call order).

    story_eval_worker.py --training-run "FLAGS" --results FILE

dist-checkpoint saving spawns a helper that re-imports this file: everything heavy is imported
under the __main__ guard only.
"""


def main() -> None:
    import argparse
    import os
    import shlex

    import torch
    from distributed.harness import init_gloo, report_results

    from megatron_lst.evaluation import scoring
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain

    parser = argparse.ArgumentParser()
    parser.add_argument("--training-run", required=True)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()

    scored = []  # [{"mode", "logprob" [R]}] per score_items call
    score_items = scoring.score_items

    def recording_score_items(*args, **kwargs):
        scores = score_items(*args, **kwargs)
        scored.append({"mode": scores.mode, "logprob": scores.logprob.tolist()})
        return scores

    scoring.score_items = recording_score_items  # evaluate_items looks it up at each call
    init_gloo()
    args = validate_args(parse_args(shlex.split(own.training_run)),
                         int(os.environ.get("WORLD_SIZE", 1)))
    result = pretrain(args)
    report_results(own.results, {
        "story_accuracy": {str(k): v for k, v in result.story_accuracy.items()},
        "scored": scored,
    })
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
