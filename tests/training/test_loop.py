"""The training loop: sampling order, model flags, the global-batch token-mean loss, when the
weights are gathered under --overlap-param-gather, and `pretrain_lst.py` as a command (log lines,
exit status, stopping on a signal with a checkpoint)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training import loop
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.data_provider import PretrainingBatchSampler, split_bounds
from megatron_lst.training.loop import _check_vocab_splits
from megatron_lst.training.model_provider import lst_config_from_args
from megatron_lst.training.param_gather import ParamGatherHooks
from training.training_cases import tiny_flags, write_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- sampling ---------------------------------------------------------------------------

def test_sampler_gives_each_data_parallel_rank_its_slice_of_every_micro_batch():
    # Global batch 8 = 2 micro-batches x micro-batch 2 x 2 data-parallel ranks.
    ranks = [list(PretrainingBatchSampler(16, 0, 2, rank, 2)) for rank in range(2)]
    assert ranks[0] == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert ranks[1] == [[2, 3], [6, 7], [10, 11], [14, 15]]


def test_sampler_resumes_at_the_consumed_sample():
    straight = list(PretrainingBatchSampler(24, 0, 2, 1, 2))
    resumed = list(PretrainingBatchSampler(24, 8, 2, 1, 2))
    assert resumed == straight[2:]
    assert len(PretrainingBatchSampler(24, 8, 2, 1, 2)) == len(resumed)


class _CountingLoader:
    """A loader of three batches that counts the passes made over it."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter([{"index": index} for index in range(3)])


def _chunk(pre_process: bool, post_process: bool) -> SimpleNamespace:
    return SimpleNamespace(pre_process=pre_process, post_process=post_process)


def test_the_model_chunks_that_read_batches_share_one_pass_over_the_loader():
    # Virtual pipeline stages on the only pipeline rank: the first chunk holds the first stage,
    # the last the last; without packed documents the middle chunk reads no batches.
    loader = _CountingLoader()
    first, middle, last = loop._data_iterator(loader, SimpleNamespace(documents=None),
                                              [_chunk(True, False), _chunk(False, False),
                                               _chunk(False, True)])
    assert middle is None
    taken_first = [next(first) for _ in range(2)]
    taken_last = [next(last) for _ in range(3)]
    assert [batch["index"] for batch in taken_last] == [0, 1, 2]
    assert taken_first == taken_last[:2]
    assert taken_first[0] is taken_last[0]  # loaded once
    assert loader.passes == 1


def test_with_packed_documents_every_chunk_reads_and_a_lone_reading_chunk_gets_the_iterator():
    loader = _CountingLoader()
    chunks = [_chunk(False, False), _chunk(False, False)]
    both = loop._data_iterator(loader, SimpleNamespace(documents=object()), chunks)
    assert [next(iterator)["index"] for iterator in both] == [0, 0]
    assert loader.passes == 1
    assert loop._data_iterator(loader, SimpleNamespace(documents=None), chunks) == [None, None]
    assert loop._data_iterator(loader, SimpleNamespace(documents=None), chunks[:1]) is None
    assert loader.passes == 1  # no pass for chunks that read nothing
    only = loop._data_iterator(loader, SimpleNamespace(documents=None), [_chunk(True, True)])
    assert next(only) == {"index": 0}


def test_a_vocabulary_that_does_not_split_over_tensor_parallel_ranks_names_the_fix():
    """Was a ModelConfigError traceback on every rank from the model build (torchrun, TP 2, a
    dataset vocabulary of 77 ids); lst-train now exits 4 with this line."""
    _check_vocab_splits(JointVocab(text_size=50, num_units=20), 2)  # 76 ids
    with pytest.raises(VocabularyError, match=r"77 ids \(21 units\) does not split over "
                                              r"--tensor-model-parallel-size 2; preprocess the "
                                              r"datasets with --num-units 22"):
        _check_vocab_splits(JointVocab(text_size=50, num_units=21), 2)


def test_a_vocabulary_that_does_not_split_is_refused_before_the_row_indices_are_built(
        tmp_path, monkeypatch):
    """The check ran on the built datasets: after rank 0 had built every row index (minutes on a
    large corpus)."""
    args = validate_args(parse_args(tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]),
                         1)
    args.tensor_model_parallel_size = 3  # the corpus's 76 ids do not split over 3 ranks

    def build_datasets(*args, **kwargs):
        raise AssertionError("the row indices were built before the vocabulary was checked")

    monkeypatch.setattr(loop, "build_datasets", build_datasets)
    with pytest.raises(VocabularyError, match=r"76 ids \(20 units\) does not split over "
                                              r"--tensor-model-parallel-size 3"):
        loop.setup(args)


def test_sampler_rejects_a_checkpoint_past_the_end():
    with pytest.raises(ValueError, match="raise --train-iters"):
        PretrainingBatchSampler(8, 12, 2, 0, 1)


def test_split_bounds_follow_megatron_rounding():
    assert split_bounds("969,30,1", 1000) == {"train": (0, 969), "valid": (969, 999),
                                              "test": (999, 1000)}
    assert split_bounds("90,10", 60) == {"train": (0, 54), "valid": (54, 60), "test": (60, 60)}


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "7,2,1", "80,15,5", "1,1,1", "99,1",
                                   "0.9,0.05,0.05", "949,50,1"])
def test_split_bounds_are_megatron_cores_to_the_document(split):
    # Cumulative sums of the integer parts, divided once, rounded some edges the other way:
    # "7,2,1" over 15 documents gave valid [10, 14) where Megatron-LM takes [10, 13).
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for documents in range(1, 3001):
        ours = split_bounds(split, documents)
        for name, bookends in zip(("train", "valid", "test"), matrix, strict=True):
            start, stop = ours[name]
            if bookends is None:  # megatron.core builds no dataset for a share of 0
                assert start == stop, (split, documents, name)
            else:
                assert (start, stop) == (round(bookends[0] * documents),
                                         round(bookends[1] * documents)), (split, documents, name)


# --- the model the flags describe --------------------------------------------------------

def test_lst_config_from_the_tiny_preset_flags():
    args = validate_args(parse_args(tiny_flags(["x"]) + ["--train-iters", "2"]), 1)
    config = lst_config_from_args(args, vocab_size=76, eos_id=2)
    assert config.vocab_size == 76
    assert (config.global_model.hidden_size, config.global_model.num_layers,
            config.global_model.num_heads, config.global_model.ffn_hidden_size) == (64, 2, 4, 176)
    assert (config.encoder.hidden_size, config.encoder.num_layers) == (32, 1)
    assert (config.decoder.hidden_size, config.decoder.num_layers) == (32, 1)
    assert config.cross_attention.slots_per_patch == 2
    assert config.cross_attention.encoder_window == config.cross_attention.decoder_window == 16
    assert config.encoder.window == 64
    assert config.max_sequence_length == 32  # --max-position-embeddings: global positions


# --- the loss of one iteration -----------------------------------------------------------

def test_iteration_loss_and_gradient_are_the_token_mean_over_the_global_batch(tmp_path):
    """Two micro-batches with different numbers of real tokens: the loop's loss and gradient
    must be those of sum(CE * mask) / sum(mask) over both, not a mean of micro-batch means."""
    from megatron.core.utils import unwrap_model

    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.training.data_provider import build_loader
    from megatron_lst.training.loop import setup, train_step

    flags = tiny_flags(write_corpus(tmp_path)) + [
        "--train-iters", "2", "--micro-batch-size", "1", "--global-batch-size", "2",
        "--clip-grad", "0", "--weight-decay", "0"]
    args = validate_args(parse_args(flags), 1)
    initialize_parallel(seed=args.seed)
    try:
        state, datasets = setup(args, index_cache_dir=tmp_path / "rows")
        micro_batches = list(build_loader(datasets.train, args))[:2]  # the first iteration
        counts = [float(b["loss_mask"].sum()) for b in micro_batches]
        assert counts[0] != counts[1], "the test needs micro-batches of unequal token counts"

        module = unwrap_model(state.model[0])
        params = [p for p in module.parameters() if p.requires_grad]
        batch = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
        per_token = module(batch["tokens"], batch["patch_lengths"], batch["labels"])  # [2, N]
        expected = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        expected_grads = torch.autograd.grad(expected, params)

        step = train_step(state, iter(micro_batches))
        assert step.num_tokens == sum(counts)
        assert step.loss == pytest.approx(expected.item(), rel=1e-6)
        for param, grad in zip(params, expected_grads, strict=True):
            torch.testing.assert_close(param.main_grad, grad, rtol=1e-4, atol=1e-7)
    finally:
        destroy_parallel()


# --- story-completion evaluation during training -----------------------------------------

def test_eval_data_logs_story_accuracy_at_every_eval_interval(tmp_path, capsys):
    import json

    from evaluation.eval_cases import random_records, tokenizer

    from megatron_lst.training.loop import pretrain

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in random_records(0, 6)))
    flags = tiny_flags(write_corpus(tmp_path, tokenizer())) + [
        "--train-iters", "2", "--eval-interval", "1", "--tokenizer-model", str(tokenizer().path),
        "--eval-data", str(items), "--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    result = pretrain(validate_args(parse_args(flags), 1))

    assert sorted(result.story_accuracy) == [1, 2]
    for accuracy in result.story_accuracy.values():
        assert set(accuracy) == {"S->S", "T->T"}
        for mode in accuracy.values():
            assert mode["num_items"] == 6
            assert mode["accuracy_ci_low"] <= mode["accuracy"] <= mode["accuracy_ci_high"]
    out = capsys.readouterr().out
    assert "story completion at iteration 2 | S->S accuracy" in out
    assert re.search(r"saved checkpoint .*iter_0000002 in \d+\.\d s", out)  # the save's time
    logged = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").open()]
    assert [sorted(r["story_accuracy"]) for r in logged] == [["S->S", "T->T"]] * 2


def test_eval_data_an_aligned_model_cannot_score_is_refused_at_the_start(tmp_path):
    """Items without segments for an aligned model were loaded, and refused at the first
    evaluation, --eval-interval iterations into the run, which it stopped."""
    import json

    from evaluation.eval_cases import random_records, tokenizer, vocab

    from megatron_lst.evaluation.items import ItemError
    from megatron_lst.training.story_eval import StoryCompletionEval

    records = random_records(0, 2)
    del records[1]["context"]["segments"]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = tiny_flags(write_corpus(tmp_path, tokenizer()), patching_mode="aligned") + [
        "--train-iters", "2", "--tokenizer-model", str(tokenizer().path),
        "--eval-data", str(items)]
    args = validate_args(parse_args(flags), 1)
    with pytest.raises(ItemError, match=r"item 'item-0-1' .*, context: aligned patching needs "
                                        r"\"segments\" .* to score it S->S"):
        StoryCompletionEval.from_args(args, vocab())
    args.patching_mode = "curriculum"  # evaluated with static patches: no segments needed
    assert StoryCompletionEval.from_args(args, vocab()).modes == ("S->S", "T->T")


def test_eval_data_mixing_speech_and_text_only_items_is_refused(tmp_path):
    """Such a file was scored T->T only: the speech items' S->S accuracy went unreported for the
    whole run, without a word (lst-eval refuses the text-only item by name)."""
    import json

    from evaluation.eval_cases import random_records, tokenizer, vocab

    from megatron_lst.evaluation.items import ItemError
    from megatron_lst.training.story_eval import StoryCompletionEval

    records = random_records(0, 3)
    for part in (records[1]["context"], *records[1]["endings"]):
        del part["units"], part["segments"]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = tiny_flags(write_corpus(tmp_path, tokenizer())) + [
        "--train-iters", "2", "--tokenizer-model", str(tokenizer().path),
        "--eval-data", str(items)]
    args = validate_args(parse_args(flags), 1)
    with pytest.raises(ItemError, match=rf"^item 'item-0-1' \({items}:2\) has no units but "
                                        r"other items have them; training scores"):
        StoryCompletionEval.from_args(args, vocab())


def test_eval_data_needs_a_tokenizer(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("{}\n")
    with pytest.raises(ArgumentError, match="--eval-data needs --tokenizer-model"):
        validate_args(parse_args(tiny_flags(write_corpus(tmp_path)) + [
            "--train-iters", "2", "--eval-data", str(items)]), 1)


# --- pretrain_lst.py as a command --------------------------------------------------------

def _command(flags: list[str]) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "pretrain_lst.py"), *flags]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# --- --overlap-param-gather -------------------------------------------------------------

class _RecordingChunk:
    """Stands for a megatron DDP chunk: records the forward pre-hook calls."""

    def __init__(self):
        self.calls = []

    def enable_forward_pre_hook(self):
        self.calls.append("on")

    def disable_forward_pre_hook(self, param_sync=True):
        self.calls.append("off+gather" if param_sync else "off")


def test_param_gather_hooks_follow_megatron_lms_training_loop():
    chunk = _RecordingChunk()
    hooks = ParamGatherHooks([chunk], overlap_param_gather=True)
    hooks.start()  # the first iteration runs on weights that agree already
    hooks.after_step(skipped=True)  # a skipped fp16 update changed nothing
    with hooks.synchronised():  # nothing to gather yet
        pass
    assert chunk.calls == ["off"]
    hooks.after_step(skipped=False)
    hooks.after_step(skipped=False)
    with hooks.synchronised():  # evaluation or saving reads the weights
        assert chunk.calls[-1] == "off+gather"
    hooks.finish()
    assert chunk.calls == ["off", "on", "off+gather", "on", "off+gather"]


def test_param_gather_hooks_do_nothing_without_the_flag():
    chunk = _RecordingChunk()
    hooks = ParamGatherHooks([chunk], overlap_param_gather=False)
    hooks.start()
    hooks.after_step(skipped=False)
    with hooks.synchronised():
        pass
    hooks.finish()
    assert chunk.calls == []


def test_bad_flags_exit_with_status_2_and_name_the_flag():
    done = subprocess.run(_command(["--preset", "tiny-cpu", "--seq-length", "8",
                                    "--train-iters", "1", "--lr", "1e-3",
                                    "--patching-mode", "static"]),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--max-tokens" in done.stderr


@pytest.mark.slow
def test_exit_signal_stops_training_with_a_checkpoint_and_status_0(tmp_path):
    """With --exit-signal-handler, SIGUSR1 (SLURM's warning before the wall) ends the run after
    the current iteration, with a checkpoint of that iteration and Megatron-LM's status 0."""
    save = tmp_path / "ckpt"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "2000", "--eval-interval", "2000", "--save", str(save),
        "--exit-signal-handler", "--exit-signal", "SIGTERM", "SIGUSR1"]
    process = subprocess.Popen(_command(flags), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "iteration" in line and "lm loss" in line and len(lines) > 1:
                process.send_signal(signal.SIGUSR1)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "received SIGUSR1" in output
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= saved < 2000
    assert f"exiting after iteration {saved}: received SIGUSR1" in output
    assert (save / f"iter_{saved:07d}" / "lst_checkpoint.json").is_file()


@pytest.mark.parametrize("eod_id, counted", [(None, 5), (2, 3)])
def test_eod_mask_loss_leaves_out_the_predictions_made_at_end_of_document(eod_id, counted):
    # --eod-mask-loss (Megatron-LM's flag; was "unrecognized arguments"): the positions whose
    # input is the end-of-document token drop out of the loss sum and the token count.
    tokens = torch.tensor([[5, 2, 7, 2, 9, 0]])  # [b=1, N=6]; the last position is padding
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.tensor([[1.0, 1, 1, 1, 1, 0]]),
             "patch_lengths": torch.ones(1, 6, dtype=torch.int32)}
    per_token_loss = torch.arange(1.0, 7.0).unsqueeze(0)  # [1, 6]

    def model(tokens, patch_lengths, labels):
        return per_token_loss

    output, loss_func = loop._ForwardStep(None, eod_id)(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(output)
    assert int(num_tokens) == counted
    assert float(loss_sum) == (1 + 3 + 5 if eod_id == 2 else 1 + 2 + 3 + 4 + 5)
    assert parse_args(["--eod-mask-loss"]).eod_mask_loss


@pytest.mark.parametrize("flags, counted", [([], 5), (["--eod-mask-loss"], 3)])
def test_eod_mask_loss_reaches_the_schedule_with_the_vocabulary_eos(monkeypatch, flags, counted):
    # The flag must reach the forward step of training and validation (`_run_schedule`), with the
    # run's EOS id: the test above drives `_ForwardStep` directly and would pass with it unwired.
    import argparse
    from types import SimpleNamespace

    from megatron.core import pipeline_parallel

    tokens = torch.tensor([[5, 7, 9, 7, 9, 0]])  # [b=1, N=6]; 7 plays EOS, the last is padding
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.tensor([[1.0, 1, 1, 1, 1, 0]]),
             "patch_lengths": torch.ones(1, 6, dtype=torch.int32)}

    def one_micro_batch(forward_step_func, data_iterator, model, **_):
        output, loss_func = forward_step_func(data_iterator, model[0])
        return [loss_func(output)[2]]

    monkeypatch.setattr(pipeline_parallel, "get_forward_backward_func", lambda: one_micro_batch)
    args = argparse.Namespace(**{**vars(parse_args(flags)), "num_micro_batches": 1,
                                 "seq_length": 6, "micro_batch_size": 1})
    state = SimpleNamespace(args=args, flop_shape=None, vocab=SimpleNamespace(eos_id=7),
                            model=[lambda tokens, patch_lengths, labels: torch.ones(1, 6)])
    losses, _ = loop._run_schedule(state, iter([batch]), forward_only=True, count_flops=False)
    assert losses[0][loop.LOSS_NAME].tolist() == [counted, counted]


@pytest.mark.distributed
def test_any_failure_of_a_rank_0_check_stops_every_rank_with_its_message():
    """The room check handed the other ranks rank 0's refusal only for its own error type: an
    OSError measuring the free space stopped rank 0 alone, and the others' next collective broke
    with a gloo traceback ('Connection closed by peer')."""
    from distributed.harness import TESTS_DIR, run_distributed

    rank0, rank1 = run_distributed(TESTS_DIR / "training" / "workers" / "rank0_check_worker.py", 2)
    assert rank0 == {"oserror": ["PermissionError", "[Errno 13] Permission denied: '/save'"],
                     "refusal": ["InsufficientSpaceError", "--save /save has 0.0 MiB free"]}
    assert rank1 == {
        "oserror": ["InsufficientSpaceError", "rank 0 stopped with PermissionError: [Errno 13] "
                    "Permission denied: '/save' (its output says where); this rank stops with it"],
        "refusal": ["InsufficientSpaceError", "--save /save has 0.0 MiB free"]}


# --- fp16 updates skipped at the lowest loss scale ----------------------------------------

@pytest.mark.slow
def test_fp16_overflowing_at_the_lowest_loss_scale_stops_with_the_checkpoint_to_go_back_to(
        tmp_path):
    """A loss scale of 2^64, also the lowest, overflows fp16's gradients at every step while the
    loss stays finite: every update was skipped to --train-iters, silently (no NaN stop). After
    --hysteresis (2) + 10 skips in a row at the lowest scale the run stops with status 5."""
    save = tmp_path / "ckpt"
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--fp16", "--initial-loss-scale", str(2.0**64), "--min-loss-scale", str(2.0**64),
        "--train-iters", "40", "--eval-interval", "1000", "--save", str(save),
        "--save-interval", "5"]
    done = subprocess.run(_command(flags), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 5, done.stderr[-3000:]
    assert re.search(
        r"lst-train: iteration 12: the gradients overflowed fp16 \(NaN or infinity\) in each of "
        r"the last 12 iterations with the loss scale at its lowest, 1\.84467e\+19 "
        r"\(--min-loss-scale\), so no update was made since iteration 1 and none would be until "
        r"--train-iters, though the loss is finite \([0-9.]+\)\. Train with --bf16", done.stderr)
    # The checkpoints of iterations 5 and 10 hold the weights that overflow: none to go back to.
    assert done.stderr.rstrip().endswith(
        f"{save / 'iter_0000010'} (iteration 10) is passed over: it holds the weights whose "
        f"gradients overflowed from iteration 1 on. No checkpoint before it was found: start "
        f"again.")
    assert "iteration       13/" not in done.stdout
