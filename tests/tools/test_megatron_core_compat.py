"""tools/megatron_core_compat.py's wheel download, without the network: pip's outcome decides
between running, skipping (index unreachable) and failing (no such release), and a pinned
release already in the cache needs no index at all."""

import subprocess
import zipfile

import pytest
from tool_modules import load_tool

WHEEL = "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl"
# What pip 24 prints when an index (an extra one here) cannot be reached, word for word.
RETRY_WARNING = ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, "
                 "status=None)) after connection broken by 'NewConnectionError('<pip._vendor."
                 "urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new "
                 "connection: [Errno 111] Connection refused')': /simple/megatron-core/\n")


def _pip_answers(monkeypatch, compat, returncode: int, output: str) -> list[list[str]]:
    """subprocess.run replaced by a pip that prints `output`; the commands run are returned."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=output)

    monkeypatch.setattr(compat.subprocess, "run", run)
    return commands


def _no_such_version(version: str, releases: str) -> str:
    return (f"ERROR: Could not find a version that satisfies the requirement "
            f"megatron-core=={version} (from versions: {releases})\n"
            f"ERROR: No matching distribution found for megatron-core=={version}\n")


@pytest.mark.parametrize(("retries", "releases", "outcome"), [
    # A slow or partly unreachable index logs connection retries on its way to an answer: when
    # it answered with its releases, a missing one is a bad --version (CI fails), not an
    # unreachable index (CI skips the check).
    (1, "0.15.0, 0.16.1, 0.19.2", "BadRelease"),
    (5, "none", "Unreachable"),
])
def test_pip_outcome_tells_a_missing_release_from_an_unreachable_index(
        tmp_path, monkeypatch, retries, releases, outcome):
    compat = load_tool("megatron_core_compat")
    _pip_answers(monkeypatch, compat, 1, RETRY_WARNING * retries
                 + _no_such_version("0.19.9", releases))
    with pytest.raises(getattr(compat, outcome)):
        compat.download_wheel("0.19.9", tmp_path)


def test_a_download_that_does_not_finish_in_time_is_unreachable(tmp_path, monkeypatch):
    compat = load_tool("megatron_core_compat")

    def run(command, timeout=None, **kwargs):
        assert timeout is not None  # a slow index must not hold CI until its own limit
        raise subprocess.TimeoutExpired(command, timeout, output="Collecting megatron-core\n")

    monkeypatch.setattr(compat.subprocess, "run", run)
    with pytest.raises(compat.Unreachable, match="did not finish"):
        compat.download_wheel("0.19.2", tmp_path)


def test_a_pinned_release_in_the_cache_is_used_without_the_index(tmp_path, monkeypatch):
    compat = load_tool("megatron_core_compat")
    with zipfile.ZipFile(tmp_path / WHEEL, "w") as wheel:
        wheel.writestr("megatron/core/__init__.py", "")
    commands = _pip_answers(monkeypatch, compat, 1, RETRY_WARNING)
    assert compat.download_wheel("0.19.2", tmp_path) == tmp_path / WHEEL
    assert commands == []
    # the newest release is whatever the index says: asked every time
    with pytest.raises(compat.Unreachable):
        compat.download_wheel(None, tmp_path)
    assert len(commands) == 1


def test_a_damaged_cached_wheel_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    compat = load_tool("megatron_core_compat")
    (tmp_path / WHEEL).write_bytes(b"half a download")
    _pip_answers(monkeypatch, compat, 1, RETRY_WARNING)
    assert compat.main(["--version", "0.19.2", "--cache", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / WHEEL} is damaged" in error and "delete it" in error
