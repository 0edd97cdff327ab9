"""The `lst-train` flags a checkpoint records, checked against what each flag can give.

A dist checkpoint's `lst_checkpoint.json` ("args") and a portable checkpoint's `lst_config.json`
("training_args") keep the flags of the run that trained the model; `lst-eval`, `lst-generate`
and the dist checkpoint `portable-to-dist` writes read them back as that run's flags. A value its
flag cannot give (a hand-edited or damaged file) was a TypeError deep in the patcher (`patch_size`
"4" or null), taken as it was (a patch size of 2.5) or a RuntimeError while building (a
`params_dtype_name` of "int8"). Flags this version does not know (older or derived ones) are left
alone.
"""

from __future__ import annotations

import argparse

PARAMS_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def saved_flags_problem(saved_args: dict, parser: argparse.ArgumentParser) -> str | None:
    """What is wrong with the saved flags `saved_args` (`lst-train`'s `parser` judges them), in
    words naming the flag, or None when every one is a value its flag can give."""
    from megatron_lst.training.config_files import long_flag

    actions = {action.dest: action for action in parser._actions}
    for dest, value in saved_args.items():
        action = actions.get(dest)
        if action is not None and not _flag_takes(action, value):
            flag = long_flag(action) if action.option_strings else dest
            return (f"the saved flag {dest} is {value!r}, which {flag} never gives "
                    f"({_what_flag_takes(action)})")
    dtype = saved_args.get("params_dtype_name", "float32")
    if dtype not in PARAMS_DTYPE_NAMES:
        return f"the saved params_dtype_name is {dtype!r}, not one of {list(PARAMS_DTYPE_NAMES)}"
    return None


def _flag_takes(action: argparse.Action, value) -> bool:
    """Whether parsing `action`'s flag can give `value` (JSON-read: ints for floats are fine)."""
    if value is None:
        return action.default is None
    if action.nargs == 0:  # store_true / store_false / --x/--no-x
        return isinstance(value, bool)
    if action.nargs in ("*", "+"):
        return isinstance(value, list) and all(_one_value_fits(action, v) for v in value)
    return _one_value_fits(action, value)


def _one_value_fits(action: argparse.Action, value) -> bool:
    from megatron_lst.training.arguments import seed_flag

    if isinstance(value, bool):
        return False  # no value-taking flag parses to a bool
    if action.choices is not None and value not in action.choices:
        return False
    if action.type is float:
        return isinstance(value, (int, float))
    if action.type in (None, str):
        return isinstance(value, str)
    if action.type in (int, seed_flag):
        return isinstance(value, int)
    return True  # a parser of its own: what it gives is not judged here


def _what_flag_takes(action: argparse.Action) -> str:
    """What `_flag_takes` accepts for `action`, in words (int and seed_flag are the integers)."""
    if action.nargs == 0:
        return "true or false"
    one = (f"one of {list(action.choices)}" if action.choices is not None
           else {float: "a number", None: "a string", str: "a string"}.get(action.type,
                                                                          "an integer"))
    many = f"a list of {one}" if action.nargs in ("*", "+") else one
    return many + (" or null" if action.default is None else "")
