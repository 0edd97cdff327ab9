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


@pytest.mark.parametrize("patching", ["static", "none"])
def test_the_first_fine_tuning_loss_is_the_cross_entropy_of_the_answers_alone(tmp_path, patching):
    """The loss the loop reports at iteration 1 (the pretrained weights, before any update) equals
    a hand computation: the full model's log-probabilities of each row's last len(answer) + 1
    tokens (the transcript or the units, then EOS, counted from the stored utterance, not from
    the dataset's mask), averaged over those tokens of the batch. LST's static patches of 3 put
    `<s>` and the first units of a TTS row in one patch, across the prompt/answer boundary."""
    import numpy as np
    import torch

    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.training.checkpoint_load import load_checkpoint
    from megatron_lst.training.model_provider import build_model_chunks

    speech = str(write_store(tmp_path / "speech", "aligned", 40, seed=1))
    pretrained = tmp_path / "pretrained"
    base = tiny_flags(["1.0", speech], patching_mode=patching)
    pretrain(validate_args(parse_args(base + ["--train-iters", "2", "--save", str(pretrained)]),
                           1))
    rows = (TASK_ROWS if patching != "none" else
            ["--seq-length", "400", "--max-position-embeddings", "400"])
    static_3 = ["--patch-size", "3"] if patching != "none" else []
    for task in ("asr", "tts"):
        args = validate_args(parse_args(base + rows + static_3 + [
            "--train-iters", "2", "--load", str(pretrained), "--finetune", "--task", task,
            "--eval-iters", "0"]), 1)
        reported = pretrain(args).losses[1]

        datasets = build_datasets(args)
        train, vocab = datasets.train.datasets[0], datasets.vocab
        initialize_parallel(seed=0)
        try:
            chunks, _ = build_model_chunks(args, vocab.size, eos_id=vocab.eos_id)
            load_checkpoint(str(pretrained), chunks, None, None, args, vocab)
            model = chunks[0].eval()
            total, count = 0.0, 0
            for index in range(args.global_batch_size):  # the rows of iteration 1
                row, lengths = train.row(index)
                stored = train.store[train.document_id(index)[1]]
                answer = len(stored.text_ids if task == "asr" else stored.unit_ids) + 1  # + EOS
                tokens = torch.from_numpy(row.doc.tokens.astype(np.int64))  # [n]
                with torch.no_grad():
                    logits = model(tokens[None, :-1], torch.from_numpy(lengths)[None])  # [1, n-1, V]
                logprobs = torch.log_softmax(logits[0].double(), dim=-1)
                targets = torch.arange(len(tokens) - 1 - answer, len(tokens) - 1)  # inputs
                total -= logprobs[targets, tokens[targets + 1]].sum().item()
                count += answer
        finally:
            destroy_parallel()
        assert reported == pytest.approx(total / count, rel=1e-5), task
