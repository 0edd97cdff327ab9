"""A crafted --config file is refused naming it, never with a raw traceback."""

from __future__ import annotations

import sys

import pytest

from megatron_lst.training.arguments import parse_args
from megatron_lst.training.flag_checks import ArgumentError


@pytest.mark.parametrize("value", ["1" * (sys.get_int_max_str_digits() + 1),
                                   "1_" + "1" * sys.get_int_max_str_digits()])
def test_an_integer_past_the_digit_limit_is_refused_naming_the_file(tmp_path, value):
    """YAML's int() of it raised a plain ValueError, out of the parser's ArgumentError."""
    config = tmp_path / "run.yaml"
    config.write_text(f"seq-length: {value}\n")
    with pytest.raises(ArgumentError, match=rf"^--config {config}: holds an integer of more than "
                                            rf"{sys.get_int_max_str_digits()} digits, more than "
                                            r"any flag takes; fix its value$"):
        parse_args(["--config", str(config)])


def test_a_repeated_key_is_still_named_as_repeated(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seq-length: 64\nseq-length: 32\n")
    with pytest.raises(ArgumentError, match="key 'seq-length' appears twice"):
        parse_args(["--config", str(config)])
