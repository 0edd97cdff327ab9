"""Flag combinations that megatron.core refuses only once the datasets and the model are built:
`validate_args` refuses them first, naming the flags and what runs instead."""

import pytest

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args

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
