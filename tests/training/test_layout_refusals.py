"""Flag combinations refused only once the datasets and the model were built (megatron.core's
assertions, a resume its checkpoint's flags refuse): `validate_args` refuses them first, naming
the flags and what runs instead, while a resume under another parallel layout still runs."""

import json
from pathlib import Path

import pytest

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.training import cli
from megatron_lst.training.args_json import args_to_dict
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpoint_flags import UnresumableFlagsError
from megatron_lst.training.checkpointing import FORMAT_VERSION, METADATA_FILENAME
from training.training_cases import fake_checkpoint

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--train-iters", "10", "--lr", "1e-3"]


def valid(*extra: str, world_size: int = 1):
    return validate_args(parse_args([*BASE, *extra]), world_size)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sgd_with_the_distributed_optimizer_is_refused_up_front(world_size):
    with pytest.raises(ArgumentError, match=r"--use-distributed-optimizer shards Adam's state "
                                            r"only .* not --optimizer sgd's: use --optimizer adam, "
                                            r"or drop --use-distributed-optimizer"):
        valid("--optimizer", "sgd", "--use-distributed-optimizer", world_size=world_size)


def test_sgd_and_the_distributed_optimizer_each_still_run():
    assert valid("--optimizer", "sgd", world_size=2).optimizer == "sgd"
    assert valid("--use-distributed-optimizer", world_size=2).use_distributed_optimizer
    assert valid("--optimizer", "sgd", "--use-distributed-optimizer",
                 "--no-use-distributed-optimizer").optimizer == "sgd"


# --- a resume its checkpoint's flags refuse -------------------------------------------------

def saved_run(tmp_path, *flags: str, world_size: int = 1) -> Path:
    """A save directory holding the record (`lst_checkpoint.json`) of a checkpoint at iteration 2
    of a run of `flags` on `world_size` processes, without tensors: what the flag checks read."""
    args = valid("--train-iters", "4", *flags, world_size=world_size)
    checkpoint = fake_checkpoint(tmp_path / "run", 2)
    (checkpoint / METADATA_FILENAME).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "iteration": 2,
        "extra_state": {"consumed_samples": 2 * args.global_batch_size},
        "scheduler": {}, "sharded_state_metadata": {}, "parallel_layout": {}, "vocab": None,
        "args": args_to_dict(args)}))
    return tmp_path / "run"


@pytest.mark.parametrize("flags, named", [
    (["--bf16"], r"trained in float32 \(neither --bf16 nor --fp16\) and this run trains in "
                 r"bfloat16 \(--bf16\)"),
    (["--use-distributed-optimizer"], r"trained without --use-distributed-optimizer"),
    (["--lr", "2e-3"], r"learning-rate schedule that this run's flags change: --lr 0.001 -> 0.002"),
    (["--seq-length", "32"], r"--seq-length 16 -> 32 \(it cuts the documents into rows\)"),
])
def test_a_resume_its_checkpoint_refuses_is_refused_by_the_flag_checks(tmp_path, flags, named):
    load = saved_run(tmp_path)
    with pytest.raises(UnresumableFlagsError, match=named) as refused:
        valid("--train-iters", "4", "--load", str(load), *flags, world_size=2)
    assert isinstance(refused.value, CheckpointError)  # lst-train's checkpoint status, 3


def test_the_flag_checks_let_a_resume_change_the_layout(tmp_path):
    load = saved_run(tmp_path, "--global-batch-size", "4", world_size=4)
    for flags, world_size in ((["--tensor-model-parallel-size", "2"], 4),
                              (["--pipeline-model-parallel-size", "2"], 2), ([], 1)):
        args = valid("--train-iters", "4", "--global-batch-size", "4", "--load", str(load),
                     *flags, world_size=world_size)
        assert args.resume_from == str(load / "iter_0000002")


@pytest.mark.parametrize("flags", [["--no-load-optim"], ["--finetune"]])
def test_no_optimizer_state_loaded_lets_the_precision_change(tmp_path, flags):
    load = saved_run(tmp_path)
    assert valid("--train-iters", "4", "--load", str(load), "--bf16", *flags).bf16


def test_lst_train_refuses_the_resume_before_reading_any_data(tmp_path):
    """The data path names no dataset: reading it would exit with the bad-data status (4)."""
    load = saved_run(tmp_path)
    status = cli.main([*BASE, "--train-iters", "4", "--load", str(load), "--bf16",
                       "--data-path", str(tmp_path / "no_such_dataset")])
    assert status == cli.EXIT_CHECKPOINT_REFUSED


@pytest.mark.parametrize("saved, resumed", [("adam", "sgd"), ("sgd", "adam")])
def test_a_resume_with_another_optimizer_is_refused_by_the_flag_checks(tmp_path, saved, resumed):
    load = saved_run(tmp_path, "--optimizer", saved)
    with pytest.raises(UnresumableFlagsError, match=rf"trained with --optimizer {saved} and this "
                                                    rf"run uses --optimizer {resumed}"):
        valid("--train-iters", "4", "--load", str(load), "--optimizer", resumed)
    assert valid("--train-iters", "4", "--load", str(load), "--optimizer", resumed,
                 "--no-load-optim").optimizer == resumed
