"""A conversion's output appears whole or not at all: killed while its files move into place, it
left the weights without their config, which the next conversion refused to overwrite."""

import os
import stat

import pytest

from megatron_lst.checkpoint import convert
from megatron_lst.checkpoint.convert import staged_output

FILES = ("model.safetensors", "lst_config.json")


def write_checkpoint(scratch):
    for name in FILES:
        (scratch / name).write_text(name)


@pytest.fixture()
def killed_at_the_second_move(monkeypatch):
    """`os.replace` and `os.rename` raise KeyboardInterrupt (a kill) from their second call."""
    calls = []

    def move(original):
        def interrupted(*args, **kwargs):
            calls.append(args)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        return interrupted

    monkeypatch.setattr(convert.os, "replace", move(os.replace))
    monkeypatch.setattr(convert.os, "rename", move(os.rename))


def test_a_conversion_killed_while_moving_leaves_all_or_nothing(tmp_path,
                                                                killed_at_the_second_move):
    output = tmp_path / "out"
    try:
        with staged_output(output, FILES) as scratch:
            write_checkpoint(scratch)
    except KeyboardInterrupt:
        pass
    held = sorted(path.name for path in output.iterdir()) if output.exists() else []
    assert held in ([], sorted(FILES)), held
    assert not list(tmp_path.glob(".out.partial-*"))  # the scratch is removed either way


def test_the_output_has_the_mode_of_a_new_directory(tmp_path):
    previous = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out", FILES) as scratch:
            write_checkpoint(scratch)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(FILES)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no scratch left


@pytest.mark.parametrize("others", [[], ["README"]], ids=["empty", "holding-others"])
def test_an_existing_directory_is_kept_and_receives_the_files(tmp_path, others):
    """Its owner and mode stay (a shared group directory, a mount point that cannot be renamed
    over), and so do the files it held."""
    output = tmp_path / "out"
    output.mkdir(mode=0o750)
    for name in others:
        (output / name).write_text("notes")
    before = output.stat()
    with staged_output(output, FILES) as scratch:
        write_checkpoint(scratch)
    after = output.stat()
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o750)
    assert sorted(path.name for path in output.iterdir()) == sorted([*FILES, *others])
    assert all((output / name).read_text() == "notes" for name in others)
    assert (output / "lst_config.json").read_text() == "lst_config.json"
