"""Resuming `pretrain_lst`'s loop continues the same run, single-process and under TP=2 x PP=2;
data parallelism gives the single-process losses.

The tiny models train in fp32 on gloo, where every reduction is deterministic: N iterations
straight and N/2 + stop + `--load` + N/2 must give the same losses (relative 1e-9), which needs
the model, optimizer, scheduler, RNG, data position and curriculum step all restored. The run that stops is a shorter `--train-iters` with the straight run's
`--lr-decay-iters`, so both follow one learning-rate schedule.
"""

import argparse
import shlex
from pathlib import Path

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from megatron_lst.training.flag_checks import flag_name
from megatron_lst.training.resume_check import (
    ResumeConfigError,
    ResumePosition,
    check_resume_flags,
)
from training.training_cases import tiny_flags, write_corpus

WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
ITERATIONS = 6


def _command(flags: list[str]) -> str:
    return shlex.join(flags)


def _losses(run: dict) -> dict[int, float]:
    return {int(k): v for k, v in run["losses"].items()}


@pytest.mark.distributed
def test_stop_and_resume_gives_the_straight_run_losses(tmp_path):
    base = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--lr-decay-iters", str(ITERATIONS), "--eval-interval", "1000"]
    straight = base + ["--train-iters", str(ITERATIONS)]
    first_half = base + ["--train-iters", str(ITERATIONS // 2), "--save", str(tmp_path / "ckpt")]
    second_half = straight + ["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")]

    [runs] = run_distributed(WORKER, 1, [
        "--training-run", _command(straight), "--training-run", _command(first_half),
        "--training-run", _command(second_half)], timeout=240)
    whole, before, after = runs

    assert before["checkpoints"][-1].endswith(f"iter_{ITERATIONS // 2:07d}")
    assert after["resumed_from"] == ITERATIONS // 2
    assert after["consumed_samples"] == whole["consumed_samples"] == 4 * ITERATIONS
    stitched = {**_losses(before), **_losses(after)}
    assert sorted(stitched) == list(range(1, ITERATIONS + 1))
    for iteration, loss in _losses(whole).items():
        assert stitched[iteration] == pytest.approx(loss, rel=1e-9, abs=0), iteration
    # The FLOP count continues across the resume.
    assert after["flops"][str(ITERATIONS)] == pytest.approx(whole["flops"][str(ITERATIONS)])


def _parallel_flags(data_path: list[str], patching_mode: str = "curriculum") -> list[str]:
    return tiny_flags(data_path, patching_mode) + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--lr", "1e-2"]


def _resume_runs(base: list[str], save_dir: Path) -> list[str]:
    """Worker arguments: 4 iterations straight, then 2 + save, then `--load` + 2 more."""
    base = base + ["--lr-decay-iters", "4", "--eval-interval", "1000"]
    straight = base + ["--train-iters", "4"]
    first_half = base + ["--train-iters", "2", "--save", str(save_dir)]
    second_half = straight + ["--load", str(save_dir)]
    return ["--training-run", _command(straight), "--training-run", _command(first_half),
            "--training-run", _command(second_half)]


def _assert_resumed_exactly(whole: dict, before: dict, after: dict) -> None:
    assert after["resumed_from"] == 2
    stitched = {**_losses(before), **_losses(after)}
    assert stitched == pytest.approx(_losses(whole), rel=1e-9, abs=0)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """One TP=2 x PP=2 launch (4 processes): LST for 16 iterations with an evaluation every 4,
    then the token baseline's stop-and-resume runs."""
    root = tmp_path_factory.mktemp("parallel")
    data_path = write_corpus(root / "data")
    lst = _parallel_flags(data_path) + ["--train-iters", "16", "--eval-interval", "4"]
    return run_distributed(WORKER, 4, [
        "--training-run", _command(lst),
        *_resume_runs(_parallel_flags(data_path, "none"), root / "baseline_ckpt")], timeout=300)


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_lst_lowers_the_validation_loss(parallel_runs):
    first = parallel_runs[0][0]
    for other in parallel_runs[1:]:  # every rank reports the same global-batch losses
        assert _losses(other[0]) == pytest.approx(_losses(first), rel=1e-12)
    eval_losses = {int(k): v for k, v in first["eval_losses"].items()}
    assert sorted(eval_losses) == [4, 8, 12, 16]
    assert eval_losses[16] < eval_losses[4] - 0.1, eval_losses


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_baseline_resumes_exactly(parallel_runs):
    for rank_runs in parallel_runs:
        _assert_resumed_exactly(*rank_runs[1:])


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_lst_resumes_exactly(tmp_path):
    flags = _parallel_flags(write_corpus(tmp_path / "data"))
    ranks = run_distributed(WORKER, 4, _resume_runs(flags, tmp_path / "ckpt"), timeout=300)
    for rank_runs in ranks:
        _assert_resumed_exactly(*rank_runs)


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_run_has_the_single_process_losses(tmp_path):
    """Two data-parallel ranks each take one micro-batch of every global batch; the token-mean
    loss over the global batch, and so the whole run, must match one process taking both."""
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "4", "--eval-interval", "2"]
    [[single]] = run_distributed(WORKER, 1, ["--training-run", _command(flags)], timeout=240)
    ranks = run_distributed(WORKER, 2, ["--training-run", _command(flags)], timeout=240)
    for [run] in ranks:
        assert _losses(run) == pytest.approx(_losses(single), rel=1e-5)
        assert run["eval_losses"] == pytest.approx(single["eval_losses"], rel=1e-5)


# --- what a resume may change (no processes) ---------------------------------------------

SAVED_FLAGS = {"patching_mode": "static", "patch_size": 4, "seq_length": 32, "max_tokens": 96,
               "seed": 1234, "global_batch_size": 8, "micro_batch_size": 2,
               "data_path": ["/data/mls"], "split": "969,30,1", "train_iters": 10,
               "speech_only_fraction": 0.0, "task": "lm"}
AT_ITERATION_10 = ResumePosition(iteration=10, consumed_samples=80)


def resumed_with(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**SAVED_FLAGS, "train_iters": 20, **changes})


def test_unchanged_data_flags_resume_without_a_note():
    assert check_resume_flags(SAVED_FLAGS, resumed_with(), AT_ITERATION_10, "ckpt") == []


@pytest.mark.parametrize("flag, value, why", [
    ("patch_size", 6, "--patch-size 4 -> 6 (it patches every row)"),
    ("patching_mode", "aligned", "--patching-mode static -> aligned (it patches every row)"),
    ("seq_length", 64, "--seq-length 32 -> 64 (it cuts the documents into rows)"),
    ("seed", 7, "--seed 1234 -> 7 (it orders the documents)"),
    ("speech_only_fraction", 0.5,
     "--speech-only-fraction 0.0 -> 0.5 (it lays out the speech documents)"),
    ("task", "asr", "--task lm -> asr (it makes the rows)"),
])
def test_a_change_of_the_rows_is_refused_naming_the_flag(flag, value, why):
    with pytest.raises(ResumeConfigError) as refused:
        check_resume_flags(SAVED_FLAGS, resumed_with(**{flag: value}), AT_ITERATION_10, "ckpt")
    assert why in str(refused.value)
    assert "stands at sample 80" in str(refused.value)


@pytest.mark.parametrize("mode, flag, value", [
    ("static", "curriculum_tau1", 20),
    ("static", "mixed_static_prob", 0.3),
    ("static", "silence_patching", "merged"),
    ("aligned", "patch_size", 6),
    ("mixed", "curriculum_tau2", 40),
    ("curriculum", "mixed_static_prob", 0.3),
    ("none", "patch_size", 6),
])
def test_a_patching_flag_the_mode_does_not_read_may_change(mode, flag, value):
    """A static run resumed without the --curriculum-tau1 its config once carried was refused
    as if the flag had 'set the curriculum': only the modes that read a patching flag build rows
    with it."""
    saved = {**SAVED_FLAGS, "patching_mode": mode, "curriculum_tau1": None,
             "curriculum_tau2": None, "mixed_static_prob": 0.5, "silence_patching": "separate"}
    resumed = argparse.Namespace(**{**saved, "train_iters": 20, flag: value})
    assert check_resume_flags(saved, resumed, AT_ITERATION_10, "ckpt") == []


@pytest.mark.parametrize("mode, flag, value", [
    ("static", "patch_size", 6),
    ("aligned", "silence_patching", "merged"),
    ("mixed", "mixed_static_prob", 0.3),
    ("mixed", "patch_size", 6),
    ("curriculum", "curriculum_tau1", 3),
    ("curriculum", "silence_patching", "merged"),
])
def test_a_patching_flag_the_mode_reads_is_refused(mode, flag, value):
    saved = {**SAVED_FLAGS, "patching_mode": mode, "curriculum_tau1": 2, "curriculum_tau2": 6,
             "mixed_static_prob": 0.5, "silence_patching": "separate"}
    resumed = argparse.Namespace(**{**saved, "train_iters": 20, flag: value})
    with pytest.raises(ResumeConfigError, match=f"{flag_name(flag)} .* -> {value}"):
        check_resume_flags(saved, resumed, AT_ITERATION_10, "ckpt")


def test_moved_data_and_another_micro_batch_size_resume_with_notes():
    notes = check_resume_flags(SAVED_FLAGS, resumed_with(data_path=["/scratch/mls"],
                                                         micro_batch_size=4),
                               AT_ITERATION_10, "ckpt")
    assert "--data-path changed from ['/data/mls'] to ['/scratch/mls']" in notes
    assert "--micro-batch-size changed from 2 to 4" in notes
    assert any("continues at sample 80" in note for note in notes)


def test_a_split_that_moves_the_training_documents_is_refused_as_changed_data_is():
    """It was a note: the run went on at sample 80 of rows cut from other training documents,
    while the same documents rewritten under the same prefix (the fingerprint check) are
    refused."""
    with pytest.raises(ResumeConfigError) as refused:
        check_resume_flags(SAVED_FLAGS, resumed_with(split="949,50,1"), AT_ITERATION_10, "ckpt")
    message = str(refused.value)
    assert ("--split 969,30,1 -> 949,50,1 (it cuts the training documents of each --data-path "
            "dataset: the first 0.969 of them -> 0.949)") in message
    assert "stands at sample 80" in message and "--finetune" in message


def test_a_split_that_keeps_the_training_documents_resumes_with_a_note():
    notes = check_resume_flags(SAVED_FLAGS, resumed_with(split="1938,50,12"),
                               AT_ITERATION_10, "ckpt")
    assert notes == ["--split changed from 969,30,1 to 1938,50,12"]
    whole = {**SAVED_FLAGS, "data_path": None, "train_data_path": ["/data/mls"]}
    resumed = argparse.Namespace(**{**whole, "train_iters": 20, "split": "50,50,0"})
    assert check_resume_flags(whole, resumed, AT_ITERATION_10, "ckpt") == [
        "--split changed from 969,30,1 to 50,50,0"]  # --train-data-path trains on all of it


def test_a_lower_global_batch_size_is_refused_with_the_sample_arithmetic():
    with pytest.raises(ResumeConfigError) as refused:
        check_resume_flags(SAVED_FLAGS, resumed_with(global_batch_size=4), AT_ITERATION_10,
                           "ckpt")
    message = str(refused.value)
    assert "consumed 80 samples in 10 iterations of 8" in message
    assert "20 x 4 = 80 rows" in message
    assert "would read rows 80..119: 40 rows short" in message
    assert "whatever --train-iters is, so raising it does not help" in message
    assert "Resume with --global-batch-size 8" in message


def test_a_higher_global_batch_size_resumes_with_a_note_except_under_the_curriculum():
    [note] = check_resume_flags(SAVED_FLAGS, resumed_with(global_batch_size=16),
                                AT_ITERATION_10, "ckpt")
    assert "--global-batch-size changed from 8 to 16" in note
    curriculum = {**SAVED_FLAGS, "patching_mode": "curriculum"}
    with pytest.raises(ResumeConfigError, match="row 80, where the run continues, would be patched as step 5 instead of 10"):
        check_resume_flags(curriculum, resumed_with(patching_mode="curriculum",
                                                    global_batch_size=16), AT_ITERATION_10, "c")


SAVED_SCHEDULE = {**SAVED_FLAGS, "lr": 3e-3, "min_lr": 3e-4, "lr_decay_iters": 10}
SAME_SCHEDULE = {"lr": 3e-3, "min_lr": 3e-4, "lr_decay_iters": 10}


def test_a_changed_learning_rate_schedule_needs_a_choice_of_schedule():
    """The checkpoint's schedule won silently: a resume with another --lr kept the old one."""
    changed = {"lr": 1e-2, "min_lr": 3e-4, "lr_decay_iters": 20}
    with pytest.raises(ResumeConfigError, match=r"--lr 0.003 -> 0.01; --lr-decay-iters 10 -> 20 "
                                                r"\(--lr-decay-iters defaults to --train-iters\)"):
        check_resume_flags(SAVED_SCHEDULE, resumed_with(**changed), AT_ITERATION_10, "c")
    [kept] = check_resume_flags(SAVED_SCHEDULE, resumed_with(
        **changed, use_checkpoint_opt_param_scheduler=True), AT_ITERATION_10, "c")
    assert kept.startswith("the checkpoint's learning-rate schedule is kept")
    [replaced] = check_resume_flags(SAVED_SCHEDULE, resumed_with(
        **changed, override_opt_param_scheduler=True), AT_ITERATION_10, "c")
    assert "replaces the checkpoint's (--override-opt_param-scheduler): --lr 0.003 -> 0.01" in replaced
    fresh = resumed_with(**changed, no_load_optim=True)  # no schedule is loaded
    assert check_resume_flags(SAVED_SCHEDULE, fresh, AT_ITERATION_10, "c") == []
    same = resumed_with(lr=3e-3, min_lr=3e-4, lr_decay_iters=10)
    assert check_resume_flags(SAVED_SCHEDULE, same, AT_ITERATION_10, "c") == []


def test_another_global_batch_size_changes_the_schedule_it_counts_in_samples():
    """The checkpoint's decay, over 10 x 8 samples, was kept silently at 16 per iteration: the
    learning rate reached --min-lr after 15 of the run's 20 iterations."""
    with pytest.raises(ResumeConfigError, match=r"--global-batch-size 8 -> 16 \(the schedule "
                                                r"counts samples"):
        check_resume_flags(SAVED_SCHEDULE, resumed_with(**SAME_SCHEDULE, global_batch_size=16),
                           AT_ITERATION_10, "c")
    [kept, batch] = check_resume_flags(SAVED_SCHEDULE, resumed_with(
        **SAME_SCHEDULE, global_batch_size=16, use_checkpoint_opt_param_scheduler=True),
        AT_ITERATION_10, "c")
    assert "kept (--use-checkpoint-opt_param-scheduler), not this run's --global-batch-size 8 -> 16" in kept
    assert batch.startswith("--global-batch-size changed from 8 to 16")
    curriculum = {**SAVED_SCHEDULE, "patching_mode": "curriculum"}  # the data's refusal first
    with pytest.raises(ResumeConfigError, match="under curriculum patching"):
        check_resume_flags(curriculum, resumed_with(**SAME_SCHEDULE, patching_mode="curriculum",
                                                    global_batch_size=16), AT_ITERATION_10, "c")


def test_the_schedule_a_resume_asks_for_is_the_one_it_follows(tmp_path):
    """Extending a run from 2 to 4 iterations: --override-opt_param-scheduler decays over the 4
    (the straight 4-iteration run's learning rates), --use-checkpoint-opt_param-scheduler stays
    at the end of the 2-iteration decay (--min-lr), no flag is refused."""
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain
    from megatron_lst.training.metrics import read_metrics

    base = tiny_flags(write_corpus(tmp_path / "data")) + ["--eval-interval", "1000"]

    def run(save: Path, *flags: str):
        return pretrain(validate_args(parse_args(base + ["--save", str(save), *flags]), 1))

    def learning_rates(save: Path) -> dict[int, float]:
        return {r["iteration"]: r["learning_rate"] for r in read_metrics(save)}

    run(tmp_path / "straight", "--train-iters", "4")
    for name in ("override", "keep", "refused"):
        run(tmp_path / name, "--train-iters", "2")
    extend = ["--train-iters", "4"]
    run(tmp_path / "override", *extend, "--load", str(tmp_path / "override"),
        "--override-opt_param-scheduler")
    run(tmp_path / "keep", *extend, "--load", str(tmp_path / "keep"),
        "--use-checkpoint-opt_param-scheduler")
    with pytest.raises(ResumeConfigError, match="--lr-decay-iters 2 -> 4"):
        run(tmp_path / "refused", *extend, "--load", str(tmp_path / "refused"))

    straight, override = learning_rates(tmp_path / "straight"), learning_rates(tmp_path / "override")
    assert straight[3] > 3e-4  # still decaying
    assert [override[i] for i in (3, 4)] == pytest.approx([straight[i] for i in (3, 4)])
    assert learning_rates(tmp_path / "keep")[3] == pytest.approx(3e-4)


@pytest.mark.parametrize("optimizer_flag", ["--no-use-distributed-optimizer",
                                            "--use-distributed-optimizer"])
def test_a_resume_with_another_peak_lr_follows_it_when_asked(tmp_path, optimizer_flag):
    """megatron-core 0.19 pairs saved parameter groups with the optimizer's by their max_lr and
    min_lr too: a resume with another --lr and --min-lr failed there ("Could not find parameter
    group with key ...", a KeyError with the distributed optimizer). With
    --override-opt_param-scheduler it follows the new schedule from the checkpoint's position."""
    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain
    from megatron_lst.training.metrics import read_metrics

    base = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--eval-interval", "1000", "--lr-decay-iters", "4", optimizer_flag]
    new_peak = ["--lr", "6e-3", "--min-lr", "6e-4"]

    def run(save: Path, *flags: str):
        return pretrain(validate_args(parse_args(base + ["--save", str(save), *flags]), 1))

    run(tmp_path / "straight", "--train-iters", "4", *new_peak)
    run(tmp_path / "resumed", "--train-iters", "2")
    run(tmp_path / "resumed", "--train-iters", "4", *new_peak, "--load", str(tmp_path / "resumed"),
        "--override-opt_param-scheduler")

    def learning_rates(save: Path) -> dict[int, float]:
        return {r["iteration"]: r["learning_rate"] for r in read_metrics(save)}

    straight, resumed = learning_rates(tmp_path / "straight"), learning_rates(tmp_path / "resumed")
    assert resumed[1] == pytest.approx(3e-3)  # the first run's peak
    # the new peak's decay (the old one's is half of it at every iteration)
    assert [resumed[i] for i in (3, 4)] == pytest.approx([straight[i] for i in (3, 4)])


def test_flags_an_older_checkpoint_does_not_record_are_not_compared():
    saved = {k: v for k, v in SAVED_FLAGS.items() if k != "max_tokens"}
    assert check_resume_flags(saved, resumed_with(max_tokens=200), AT_ITERATION_10, "c") == []


@pytest.mark.parametrize("saved_dtype, dtype, message", [
    ("float32", "bfloat16", r"trained in float32 \(neither --bf16 nor --fp16\) and this run "
                            r"trains in bfloat16 \(--bf16\).*Resume with neither --bf16 nor "
                            r"--fp16, or add --no-load-optim"),
    ("bfloat16", "float32", r"trained in bfloat16 \(--bf16\) .*Resume with --bf16"),
])
def test_a_resume_between_fp32_and_mixed_precision_is_refused_unless_the_optimizer_is_fresh(
        saved_dtype, dtype, message):
    """megatron.core failed with a KeyError on the optimizer state (fp32_param, pre_wd_mult)."""
    saved = {**SAVED_FLAGS, "params_dtype_name": saved_dtype}
    with pytest.raises(ResumeConfigError, match=message):
        check_resume_flags(saved, resumed_with(params_dtype_name=dtype), AT_ITERATION_10, "c")
    fresh_optimizer = resumed_with(params_dtype_name=dtype, no_load_optim=True)
    assert check_resume_flags(saved, fresh_optimizer, AT_ITERATION_10, "c") == []
    other_half = resumed_with(params_dtype_name="float16")  # both keep fp32 main weights
    assert check_resume_flags({**SAVED_FLAGS, "params_dtype_name": "bfloat16"}, other_half,
                              AT_ITERATION_10, "c") == []


@pytest.mark.parametrize("saved_distributed, distributed, message", [
    (True, False, r"trained with --use-distributed-optimizer and this run is started without "
                  r"it.*Resume with --use-distributed-optimizer"),
    (False, True, r"trained without --use-distributed-optimizer and this run is started with "
                  r"it.*Resume without --use-distributed-optimizer"),
])
def test_a_resume_between_the_plain_and_the_distributed_optimizer_is_refused_unless_fresh(
        saved_distributed, distributed, message):
    """megatron.core failed with a KeyError ('pre_wd_mult', or the distributed optimizer's
    'optimizer.state.param.*' missing from the plain optimizer's checkpoint)."""
    saved = {**SAVED_FLAGS, "use_distributed_optimizer": saved_distributed}
    with pytest.raises(ResumeConfigError, match=message):
        check_resume_flags(saved, resumed_with(use_distributed_optimizer=distributed),
                           AT_ITERATION_10, "c")
    fresh_optimizer = resumed_with(use_distributed_optimizer=distributed, no_load_optim=True)
    assert check_resume_flags(saved, fresh_optimizer, AT_ITERATION_10, "c") == []
    same_optimizer = resumed_with(use_distributed_optimizer=saved_distributed)
    assert check_resume_flags(saved, same_optimizer, AT_ITERATION_10, "c") == []


@pytest.mark.slow
def test_a_weights_only_checkpoint_is_refused_for_resuming_and_fine_tunes(tmp_path, capsys):
    """`lst-convert portable-to-dist` writes weights only; `lst-train --load` of it without
    `--finetune` ended in megatron's KeyError about the missing optimizer state (a traceback,
    exit status 1) instead of saying what to pass."""
    from megatron_lst.checkpoint.cli import main as convert
    from megatron_lst.training import cli

    flags = tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "2"]
    trained, portable, weights = tmp_path / "trained", tmp_path / "portable", tmp_path / "weights"
    assert cli.main(flags + ["--save", str(trained)]) == 0
    assert convert(["dist-to-portable", "--load", str(trained), "--output", str(portable)]) == 0
    assert convert(["portable-to-dist", "--portable", str(portable), "--save", str(weights)]) == 0
    capsys.readouterr()
    assert cli.main(flags + ["--load", str(weights), "--save", str(tmp_path / "resumed")]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lst-train: ") and "holds model weights only" in last
    assert "--finetune" in last
    # A fresh optimizer (--no-load-optim) or --finetune trains from the weights.
    assert cli.main(flags + ["--load", str(weights), "--no-load-optim",
                             "--save", str(tmp_path / "fresh")]) == 0
    capsys.readouterr()
    assert cli.main(flags + ["--load", str(weights), "--finetune",
                             "--save", str(tmp_path / "tuned")]) == 0
    # It said "resumed from ... at iteration 0, 0 samples consumed", as if resuming.
    assert (f"fine-tuning from the weights of {weights / 'iter_0000000'}: iteration 0, a new "
            f"optimizer and schedule") in capsys.readouterr().out
