"""--pretrained-checkpoint (Megatron-LM's): a fine-tuning job that can be stopped and requeued
with one command. While --load (the run's own save directory) holds no checkpoint the run
fine-tunes from the pretrained one (weights only, iteration 0); once it holds one, the run
resumes it. With --finetune alone the requeued command started again at iteration 0 from the
pretrained weights, and was refused by a --save holding the first run's checkpoints."""

import pytest

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from training.training_cases import fake_checkpoint, tiny_flags, write_corpus

TRACKER = "latest_checkpointed_iteration.txt"


def _validated(tmp_path, *flags: str):
    base = tiny_flags(["x"]) + ["--train-iters", "4", "--no-use-checkpoint-args"]
    return validate_args(parse_args(base + list(flags)), 1)


def test_the_pretrained_checkpoint_is_loaded_until_load_holds_one(tmp_path):
    pretrained, own = tmp_path / "pretrained", tmp_path / "ft"
    fake_checkpoint(pretrained, 100)
    flags = ["--pretrained-checkpoint", str(pretrained), "--load", str(own), "--save", str(own)]
    first = _validated(tmp_path, *flags)
    assert (first.load, first.finetune) == (str(pretrained), True)
    assert first.resume_from == str(pretrained / "iter_0000100")

    fake_checkpoint(own, 2)
    (own / TRACKER).write_text("2")
    requeued = _validated(tmp_path, *flags)
    assert (requeued.load, requeued.finetune) == (str(own), False)
    assert requeued.resume_from == str(own / "iter_0000002")


@pytest.mark.parametrize("extra, message", [
    ([], "--pretrained-checkpoint {p} is loaded only while --load holds no checkpoint of this "
         "run: give --load"),
    (["--load", "{o}", "--finetune"], "with --finetune every resume would start again at "
                                      "iteration 0. Drop --finetune"),
    (["--load", "{o}", "--ckpt-step", "100"], "name its directory: --pretrained-checkpoint "
                                              "DIR/iter_XXXXXXX"),
])
def test_flags_that_do_not_combine_are_refused(tmp_path, extra, message):
    pretrained, own = tmp_path / "pretrained", tmp_path / "ft"
    fake_checkpoint(pretrained, 100)
    fill = {"p": pretrained, "o": own}
    with pytest.raises(ArgumentError) as refused:
        _validated(tmp_path, "--pretrained-checkpoint", str(pretrained),
                   *[value.format(**fill) for value in extra])
    assert message.format(**fill) in str(refused.value)


@pytest.mark.parametrize("load, save", [("pretrained", "ft"), ("pretrained", "pretrained"),
                                        ("pretrained/iter_0000100", "ft")])
@pytest.mark.parametrize("given", ["pretrained", "pretrained/iter_0000100"])
def test_load_in_the_pretrained_run_is_refused(tmp_path, load, save, given):
    """--load naming the pretrained run (a slip for the run's own directory) holds a checkpoint,
    so the job resumed the pretraining run (its iteration and optimizer, under the fine-tuning
    flags) and never fine-tuned from the pretrained weights."""
    fake_checkpoint(tmp_path / "pretrained", 100)
    with pytest.raises(ArgumentError) as refused:
        _validated(tmp_path, "--pretrained-checkpoint", str(tmp_path / given), "--load",
                   str(tmp_path / load), "--save", str(tmp_path / save))
    assert (f"--load {tmp_path / load} is the directory of --pretrained-checkpoint "
            f"{tmp_path / given}, so the run would resume the pretraining run instead of "
            f"fine-tuning from it; give --load (and --save) the fine-tuning run's own "
            f"directory") in str(refused.value)


def test_a_pretrained_directory_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "portable").mkdir()
    for name in ("model.safetensors", "lst_config.json"):
        (tmp_path / "portable" / name).write_bytes(b"")
    with pytest.raises(ArgumentError) as refused:
        _validated(tmp_path, "--pretrained-checkpoint", str(tmp_path / "portable"), "--load",
                   str(tmp_path / "ft"), "--save", str(tmp_path / "ft"))
    assert f"--pretrained-checkpoint {tmp_path / 'portable'} holds no complete checkpoint" \
        in str(refused.value)
    assert "lst-convert portable-to-dist" in str(refused.value)


@pytest.mark.slow
def test_a_stopped_fine_tuning_job_resumes_its_own_progress_with_the_same_command(tmp_path):
    from megatron_lst.training.loop import pretrain

    data_path = write_corpus(tmp_path / "data")
    common = tiny_flags(data_path) + ["--eval-interval", "1000"]
    pretrained = tmp_path / "pretrained"
    pretraining = pretrain(validate_args(parse_args(common + ["--train-iters", "2", "--save",
                                                              str(pretrained)]), 1))

    def fine_tune(save, *extra: str):
        flags = common + ["--train-iters", "4", "--pretrained-checkpoint", str(pretrained),
                          "--load", str(save), "--save", str(save), *extra]
        return pretrain(validate_args(parse_args(flags), 1))

    straight = fine_tune(tmp_path / "straight")
    stopped = fine_tune(tmp_path / "ft", "--exit-interval", "2")
    requeued = fine_tune(tmp_path / "ft")
    assert (straight.resumed_from, stopped.resumed_from, stopped.iteration) == (None, None, 2)
    assert (requeued.resumed_from, requeued.iteration) == (2, 4)
    assert {**stopped.losses, **requeued.losses} == straight.losses  # bitwise
    # Iteration 1 reads the rows pretraining's iteration 1 read, with the pretrained weights.
    assert straight.losses[1] != pretraining.losses[1]


def test_a_requeued_fine_tuning_job_that_cannot_resume_is_told_how(tmp_path):
    """A --save holding the first run's checkpoints refused the requeued command with 'Resume from
    the newest with --load FT', which with --finetune still given starts at iteration 0 again
    (and is refused again); with --pretrained-checkpoint and another --load, the same advice
    missed that --load, not --save, is where it looks for the run's own checkpoints."""
    pretrained, own, elsewhere = tmp_path / "pretrained", tmp_path / "ft", tmp_path / "other"
    fake_checkpoint(pretrained, 100)
    fake_checkpoint(own, 2)
    with pytest.raises(ArgumentError) as refused:
        _validated(tmp_path, "--load", str(pretrained), "--finetune", "--save", str(own))
    assert (f"Resume from the newest with --load {own} and without --finetune (or fine-tune "
            f"with --pretrained-checkpoint {pretrained} --load {own} --save {own}, which resumes "
            f"by itself when requeued)") in str(refused.value)
    with pytest.raises(ArgumentError) as refused:
        _validated(tmp_path, "--pretrained-checkpoint", str(pretrained), "--load", str(elsewhere),
                   "--save", str(own))
    assert (f"--pretrained-checkpoint resumes from --load only: give --load {own}, the same "
            f"directory as --save") in str(refused.value)
    # The advice taken: the job resumes its own iteration 2.
    (own / TRACKER).write_text("2")
    resumed = _validated(tmp_path, "--pretrained-checkpoint", str(pretrained), "--load", str(own),
                         "--save", str(own))
    assert (resumed.finetune, resumed.resume_from) == (False, str(own / "iter_0000002"))


def test_a_job_that_saves_nothing_is_warned_that_a_requeue_starts_over(tmp_path, caplog):
    pretrained, own = tmp_path / "pretrained", tmp_path / "ft"
    fake_checkpoint(pretrained, 100)
    assert _validated(tmp_path, "--pretrained-checkpoint", str(pretrained), "--load",
                      str(own)).finetune
    assert (f"--pretrained-checkpoint {pretrained} without --save: this run saves no checkpoint "
            f"in --load {own}, so a requeued run fine-tunes from the pretrained weights again; "
            f"give --save {own} to resume instead") in caplog.text
    caplog.clear()
    _validated(tmp_path, "--pretrained-checkpoint", str(pretrained), "--load", str(own),
               "--save", str(own))
    assert "without --save" not in caplog.text
