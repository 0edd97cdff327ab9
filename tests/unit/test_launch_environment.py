"""`launch_environment`: the rank and world size the launcher's environment gives, read in one
place, and a malformed value refused naming its variable."""

import pytest

from megatron_lst.launch_environment import (
    LaunchEnvironmentError,
    launch_rank,
    launch_world_size,
)


def test_without_a_launcher_the_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (launch_rank(), launch_world_size()) == (0, 1)


def test_the_launchers_values_are_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (launch_rank(), launch_world_size()) == (3, 8)


@pytest.mark.parametrize("variable, value", [
    ("RANK", "one"), ("RANK", "-1"), ("RANK", ""), ("WORLD_SIZE", "0"), ("WORLD_SIZE", "2.5"),
])
def test_a_malformed_value_is_refused_naming_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    read = launch_rank if variable == "RANK" else launch_world_size
    with pytest.raises(LaunchEnvironmentError, match=rf"{variable}={value!r} is not a whole "
                                                     r"number .*launch with torchrun"):
        read()
