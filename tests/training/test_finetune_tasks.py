"""`--finetune --task asr|tts`: a pretrained checkpoint fine-tuned on task rows through the
ordinary loop, with a fresh iteration count and loss on the answers only."""

import math

import pytest

from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.data_provider import build_datasets
from megatron_lst.training.loop import pretrain
from training.training_cases import tiny_flags, write_store

TASK_ROWS = ["--seq-length", "400", "--max-tokens", "400", "--max-position-embeddings", "400"]


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_finetune_on_task_rows_trains_the_answers_from_iteration_0(tmp_path, task):
    speech = str(write_store(tmp_path / "speech", "aligned", 40, seed=1))
    pretrained = tmp_path / "pretrained"
    pretrain(validate_args(parse_args(tiny_flags(["1.0", speech]) + [
        "--train-iters", "2", "--save", str(pretrained), "--save-interval", "2"]), 1))

    flags = tiny_flags(["1.0", speech]) + TASK_ROWS + [
        "--train-iters", "3", "--load", str(pretrained), "--finetune", "--task", task,
        "--save", str(tmp_path / task), "--save-interval", "3", "--eval-interval", "3"]
    args = validate_args(parse_args(flags), 1)
    result = pretrain(args)

    assert sorted(result.losses) == [1, 2, 3]  # a new schedule: iterations 1.. again
    assert all(math.isfinite(loss) for loss in result.losses.values())
    assert result.checkpoints[-1].endswith("iter_0000003")
    # The loss counted exactly the answers and EOS of the 12 rows it trained on.
    train = build_datasets(args).train
    answers = sum(len(train.datasets[0].row(i)[0].answer) for i in range(12))
    assert result.tokens == answers
