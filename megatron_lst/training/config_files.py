"""YAML run configurations that map one-to-one onto command-line flags.

A config file is a flat YAML mapping whose keys are flag names without the leading dashes
(`micro-batch-size` or `micro_batch_size`) and whose values are what the flag takes: a scalar, a
list for flags with several values (`data-path`), and true/false for switches (`bf16`). Nothing
else is allowed, so every file reads as a command line:

    seq-length: 2048          ->  --seq-length 2048
    bf16: true                ->  --bf16
    data-path: [0.67, a, 0.33, b]  ->  --data-path 0.67 a 0.33 b

Each flag may appear once (a key repeated, or spelled both ways, is an error rather than a silent
last-one-wins), and `null` only for a flag whose default is "not given"; flags given on the
command line override the file's values. A flag's value is the text the file writes, read by
the flag's own type as the command line reads it: YAML 1.1 would read `save: 0755` as the octal
number 493, `data-path: 2024_01` as 202401 and `seq-length: 0x10` as 16, but the command line
`--save 0755` means the directory `0755` and refuses `--seq-length 0x10`, and so does the file.
Only switches take YAML's true/false.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from megatron_lst.data.input_files import read_bounded_bytes


class ConfigError(ValueError):
    """A config file that does not map onto the command-line flags."""


class ConfigValues(dict):
    """A config file's flat mapping of keys to YAML values; `written` keeps each top-level
    value as the file spells it (strings, lists of strings), for flags that take text."""

    def __init__(self, values: Mapping[str, Any], written: Mapping[Any, Any]):
        super().__init__(values)
        self.written = dict(written)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat mapping (keys not yet checked against the flags)."""
    path = Path(path)
    # the input-files rule: a readable regular file (a FIFO blocked, /dev/zero read forever)
    data = read_bounded_bytes(path, lambda message: ConfigError(f"--config {message}"), "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start}); save it as UTF-8") from None
    try:
        config = yaml.load(text, Loader=_loader_for(path))
        # Every scalar as the text it is written as (no numbers, booleans or dates).
        written = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML: {err}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"--config {path}: its values nest lists or mappings too deeply to "
                          f"read; a config is a flat mapping of flags to values") from None
    except ConfigError:  # _UniqueKeyLoader's, naming the file
        raise
    except ValueError:  # int() of an integer past Python's digit limit (a raw ValueError once)
        raise ConfigError(f"--config {path}: holds an integer of more than "
                          f"{sys.get_int_max_str_digits()} digits, more than any flag takes; "
                          f"fix its value") from None
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"--config {path} must be a mapping of flag names to values, got a "
            f"{type(config).__name__}"
        )
    return ConfigValues(config, written if isinstance(written, Mapping) else {})


def _loader_for(path: Path):
    """`_UniqueKeyLoader` naming `path` in its errors (it reads a string, not the file)."""
    def make(stream):
        loader = _UniqueKeyLoader(stream)
        loader.name = str(path)
        return loader
    return make


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last) or
    merges another (`<<:`, whose values the file's written text would not hold: `<<: {save:
    0755}` set --save 493)."""

    def construct_mapping(self, node, deep=False):
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f"--config {self.name}: line {key_node.start_mark.line + 1} "
                                  f"merges a mapping into this one (<<); write each flag as a "
                                  f"key of its own")
        self.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # not a flag name: config_to_defaults names it
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"--config {self.name}: key {key!r} appears twice (lines "
                                  f"{seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def config_to_defaults(config: Mapping[str, Any], parser: argparse.ArgumentParser,
                       source: str | Path | None = None) -> dict[str, Any]:
    """Flag destinations -> converted values, for `parser.set_defaults`.

    Values go through each flag's own type and choices, so a config file accepts exactly what
    the command line accepts. Raises ConfigError naming the key, and for an unknown key the
    closest flag.
    """
    where = f"--config {source}" if source is not None else "config"
    return {action.dest: _convert(action, _as_written(config, key, value, action),
                                  f"{where}: {key}", flag_of_key(key))
            for key, value, action in _keyed_actions(config, parser, where)}


def config_to_argv(config: Mapping[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """The command line equivalent to `config` (switches set to false are left out)."""
    argv: list[str] = []
    for key, value, action in _keyed_actions(config, parser, "config"):
        converted = _convert(action, _as_written(config, key, value, action), f"config: {key}",
                             flag_of_key(key))
        flag = long_flag(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            if converted is not None:
                argv.append(flag if converted else "--no-" + flag[2:])
        elif _is_switch(action):
            if converted != action.default:
                argv.append(flag)
        elif converted is None:
            continue
        elif isinstance(converted, list):
            argv += [flag, *(str(v) for v in converted)]
        else:
            argv += [flag, str(converted)]
    return argv


def _as_written(config: Mapping[str, Any], key: str, value: Any, action: argparse.Action) -> Any:
    """For a flag that is no switch, the value as the file writes it, for the flag's type to read
    as it reads the command line (`0755`, not 493; `2024_01`, not 202401; `0x10`, not 16; `yes`,
    not True); `value` for a switch or a mapping not read from a file. `null` stays None."""
    written = getattr(config, "written", {}).get(key)
    if value is None or written is None or _is_switch(action):
        return value
    if isinstance(value, list) and isinstance(written, list) and len(written) == len(value):
        return [w if isinstance(w, str) and v is not None and not isinstance(v, (list, Mapping))
                else v for v, w in zip(value, written, strict=True)]
    if isinstance(written, str) and not isinstance(value, (list, Mapping)):
        return written
    return value


def flag_of_key(key: str) -> str:
    """The flag a YAML key names: `seq_length`, `seq-length` and `--seq-length` are --seq-length."""
    return "--" + key.lstrip("-").replace("_", "-")


def _keyed_actions(config: Mapping[str, Any], parser: argparse.ArgumentParser, where: str
                   ) -> list[tuple[str, Any, argparse.Action]]:
    """`(key, value, action)` of every key of `config`; two keys of one flag (`seq-length` and
    `seq_length`, or `x` and `no-x`) are an error, not a silent last-one-wins."""
    keyed, key_of_dest = [], {}
    for key, value in config.items():
        action = _action_for_key(key, parser, where)
        if action.dest in key_of_dest:
            raise ConfigError(f"{where}: keys {key_of_dest[action.dest]!r} and {key!r} both set "
                              f"{long_flag(action)}; keep one")
        key_of_dest[action.dest] = key
        keyed.append((key, value, action))
    return keyed


def _action_for_key(key: Any, parser: argparse.ArgumentParser, where: str) -> argparse.Action:
    if not isinstance(key, str):
        raise ConfigError(f"{where}: key {key!r} is not a flag name")
    flag = flag_of_key(key)
    # Keyed by the flag's spelling with dashes: `override-opt_param-scheduler` and
    # `override_opt_param_scheduler` both name --override-opt_param-scheduler.
    by_flag = {flag_of_key(s): a for a in parser._actions for s in a.option_strings}
    action = by_flag.get(flag)
    if action is None or flag in ("--help", "--config"):
        known = [s for a in parser._actions for s in a.option_strings
                 if s.startswith("--") and s not in ("--help", "--config")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.0)
        hint = f"; did you mean {close[0].lstrip('-')!r} ({close[0]})?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    return action


def long_flag(action: argparse.Action) -> str:
    """The flag's first long spelling (`--reset-attention-mask`, not `--no-reset-attention-mask`)."""
    return next(s for s in action.option_strings if s.startswith("--"))


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction))


def _convert(action: argparse.Action, value: Any, where: str, flag: str) -> Any:
    """`value` as `flag` (the spelling the key used, e.g. "--no-x") stores it."""
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {long_flag(action)} is a switch; write true or false, "
                              f"got {value!r}")
        # A store_false flag (`--no-x: true`) stores False in its destination; a `--x/--no-x`
        # pair takes `x: true|false` (or `no-x: true|false`) for its destination.
        negated = isinstance(action, argparse._StoreFalseAction) or (
            isinstance(action, argparse.BooleanOptionalAction)
            and flag != flag_of_key(long_flag(action)))
        return not value if negated else value
    if value is None:
        if action.default is not None:
            raise ConfigError(f"{where}: {long_flag(action)} cannot be null; give a value, or "
                              f"leave the key out for its default {action.default!r}")
        return None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        _refuse_a_command_line_in_one_string(action, value, where)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if action.nargs == "+" and not items:
            raise ConfigError(f"{where}: {long_flag(action)} needs at least one value")
        if any(item is None for item in items):  # str(None) would be the value 'None'
            raise ConfigError(f"{where}: {long_flag(action)} takes a list without nulls, got "
                              f"{value!r}; leave the null out, or quote 'null' if it is a name")
        return [_convert_one(action, v, where) for v in items]
    if isinstance(value, (list, tuple, Mapping, set, frozenset)):
        raise ConfigError(f"{where}: {long_flag(action)} takes one value, got {value!r}")
    return _convert_one(action, value, where)


def _refuse_a_command_line_in_one_string(action: argparse.Action, value: Any, where: str) -> None:
    """`data-path: "0.67 a 0.33 b"` is one value, the path '0.67 a 0.33 b' (a manifest that is
    not found); a string of several words whose first is a number is that mistake, not a path."""
    if not isinstance(value, str) or len(value.split()) < 2:
        return
    try:
        float(value.split()[0])
    except ValueError:
        return
    items = ", ".join(value.split())
    raise ConfigError(f"{where}: {long_flag(action)} takes a list, and {value!r} is one string; "
                      f"write [{items}] (a YAML list), or quote a path with spaces as the only "
                      f"item of a list")


def _type_name(kind) -> str:
    """What a flag of type `kind` takes, as an error says it ("takes an integer", not "a int")."""
    known = {int: "an integer", float: "a number", str: "text"}
    return known.get(kind, f"a {getattr(kind, '__name__', kind)}")


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple, Mapping, set, frozenset)):  # `!!set {a, b}` is a set
        raise ConfigError(f"{where}: nested value {value!r} is not a flag value")
    kind = action.type or str
    if kind is int and (isinstance(value, bool) or (isinstance(value, float)
                                                      and not value.is_integer())):
        raise ConfigError(f"{where}: {long_flag(action)} takes an integer, got {value!r}")
    if kind is float and isinstance(value, bool):
        raise ConfigError(f"{where}: {long_flag(action)} takes a number, got {value!r}")
    if kind not in (int, float, str) and not isinstance(value, str):
        value = str(value)  # a flag's own type parses text, as on the command line (1.5 -> 1)
    try:
        converted = kind(int(value) if kind is int and isinstance(value, float) else value)
    except argparse.ArgumentTypeError as error:  # the flag's own type says what is wrong
        raise ConfigError(f"{where}: {long_flag(action)}: {error}") from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {long_flag(action)} takes {_type_name(kind)}, got {value!r}"
                          ) from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: {converted!r} is not one of {list(action.choices)}")
    return converted
