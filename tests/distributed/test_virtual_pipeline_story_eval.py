"""`--eval-data` under virtual pipeline stages: the story items are scored by megatron's
interleaved schedule, each batch split into micro-batches (padding rows dropped), as one process
scores them.

Real `lst-train` flags through `pretrain` (fp32, gloo on CPU), 4 global layers, PP=2 x 2 virtual
stages (one layer per model chunk). Both runs resume the same single-process checkpoint of
iteration 1 and evaluate at iteration 2: 5 items of 3 endings, 2 items per batch (the
--micro-batch-size), so the batches hold 6, 6 and 3 rows and the last is padded to 2 micro-batches
of 2 rows. The interleaved run must log the single process's accuracies and give every ending
the single process's log-probability.
"""

import json
import shlex

import pytest
import torch
from evaluation.eval_cases import random_records, tokenizer
from training.training_cases import tiny_flags, write_corpus

from distributed.harness import TESTS_DIR, run_distributed
from distributed.test_virtual_pipeline_training import train, with_value
from megatron_lst.evaluation.scoring import split_microbatches

WORKER = TESTS_DIR / "distributed" / "workers" / "story_eval_worker.py"
LOGPROB_TOLERANCE = 1e-4  # relative; one training step in fp32 sums of another order


def scored_run(nprocs: int, flags: list[str]) -> dict:
    """Rank 0's report of one run with `--eval-data` on `nprocs` processes."""
    return run_distributed(WORKER, nprocs, ["--training-run", shlex.join(flags)], timeout=400)[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_interleaved_story_eval_scores_as_one_process(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in random_records(3, 5, num_endings=3)))
    base = tiny_flags(write_corpus(tmp_path / "data", tokenizer())) + [
        "--num-layers", "4", "--train-iters", "2", "--lr-decay-iters", "2", "--eval-interval", "2",
        "--tokenizer-model", str(tokenizer().path), "--eval-data", str(items)]
    train(1, with_value(base, "--train-iters", "1") + ["--save", str(tmp_path / "shared")])
    resumed = base + ["--load", str(tmp_path / "shared")]

    reference = scored_run(1, resumed)
    interleaved = scored_run(2, resumed + ["--pipeline-model-parallel-size", "2",
                                           "--num-virtual-stages-per-pipeline-rank", "2"])

    assert list(reference["story_accuracy"]) == ["2"]
    assert interleaved["story_accuracy"] == reference["story_accuracy"]
    assert [s["mode"] for s in interleaved["scored"]] == [s["mode"] for s in reference["scored"]]
    for ours, theirs in zip(interleaved["scored"], reference["scored"], strict=True):
        assert len(ours["logprob"]) == 15
        assert ours["logprob"] == pytest.approx(theirs["logprob"], rel=LOGPROB_TOLERANCE)


def test_split_microbatches_pads_with_the_first_row_and_keeps_the_order():
    batch = {"tokens": torch.arange(6).reshape(3, 2), "mask": torch.tensor([True, False, True])}
    parts = split_microbatches(batch, 2)  # 3 rows -> 2 micro-batches of 2, one padding row
    assert [p["tokens"].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [0, 1]]]
    assert [p["mask"].tolist() for p in parts] == [[True, False], [True, True]]
    assert torch.cat([p["tokens"] for p in parts])[:3].equal(batch["tokens"])
