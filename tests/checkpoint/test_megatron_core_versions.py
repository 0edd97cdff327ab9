"""Checkpoints cross between the installed megatron-core and another release, both ways.

Runs only where LST_OTHER_MEGATRON_CORE names an unpacked megatron-core (a folder holding
`megatron/core`; `tools/megatron_core_compat.py` downloads and unpacks the newest one and sets
it), skipped otherwise. Processes of the "other" side run with that folder first on PYTHONPATH.

  resume     a run trained and saved by one release is resumed by the other (one process, and two
             with the distributed optimizer): the stitched losses are the straight run's, which
             needs the weights, Adam moments and step, schedule, RNG and data position restored
  portable   `lst-convert dist-to-portable` of one release's checkpoint gives the same tensors
             under both; a `portable-to-dist` checkpoint of one release converts back under the
             other to the same tensors
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from distributed.harness import TESTS_DIR, run_distributed
from training.training_cases import tiny_flags, write_corpus

OTHER = os.environ.get("LST_OTHER_MEGATRON_CORE", "")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not OTHER, reason="set LST_OTHER_MEGATRON_CORE to an unpacked megatron-core "
                       "(tools/megatron_core_compat.py does)"),
]
REPO = TESTS_DIR.parent
WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
ITERATIONS = 6


@pytest.fixture(scope="module")
def other() -> Path:
    tree = Path(OTHER).resolve()
    if not (tree / "megatron" / "core" / "__init__.py").is_file():
        pytest.fail(f"LST_OTHER_MEGATRON_CORE={OTHER} holds no megatron/core/__init__.py")
    return tree


def _on(side: str, other: Path, monkeypatch) -> None:
    """Child processes started after this import the `side` release ("installed" or "other")."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() != other]
    if side == "other":
        paths.insert(0, str(other))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *paths]))


def _version(side: str, other: Path, monkeypatch) -> str:
    _on(side, other, monkeypatch)
    return subprocess.run([sys.executable, "-c", "import megatron.core as m; print(m.__version__,"
                           " m.__file__)"], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_the_other_tree_is_another_megatron_core(other, monkeypatch):
    installed, newer = _version("installed", other, monkeypatch), _version("other", other,
                                                                           monkeypatch)
    assert newer.split()[1].startswith(str(other)), newer
    assert installed.split()[0] != newer.split()[0], (installed, newer)


def _losses(run: dict) -> dict[int, float]:
    return {int(k): v for k, v in run["losses"].items()}


@pytest.mark.parametrize(("writer", "reader", "nprocs"), [
    ("installed", "other", 1), ("other", "installed", 1), ("other", "installed", 2),
    ("installed", "other", 2)])
def test_a_run_saved_by_one_release_resumes_under_the_other(other, tmp_path, monkeypatch, writer,
                                                            reader, nprocs):
    base = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--lr-decay-iters", str(ITERATIONS), "--eval-interval", "1000"]
    if nprocs == 2:
        base += ["--use-distributed-optimizer"]
    save = tmp_path / "ckpt"
    straight = base + ["--train-iters", str(ITERATIONS)]
    first_half = base + ["--train-iters", str(ITERATIONS // 2), "--save", str(save)]
    second_half = straight + ["--load", str(save), "--save", str(save)]

    _on(writer, other, monkeypatch)
    [[whole, before], *_] = run_distributed(WORKER, nprocs, [
        "--training-run", shlex.join(straight), "--training-run", shlex.join(first_half)],
        timeout=600)
    _on(reader, other, monkeypatch)
    [[after], *_] = run_distributed(WORKER, nprocs, ["--training-run", shlex.join(second_half)],
                                    timeout=600)

    assert after["resumed_from"] == ITERATIONS // 2
    stitched = {**_losses(before), **_losses(after)}
    assert sorted(stitched) == list(range(1, ITERATIONS + 1))
    for iteration, loss in _losses(whole).items():
        assert stitched[iteration] == pytest.approx(loss, rel=1e-6, abs=0), iteration


def _convert(side: str, other: Path, monkeypatch, *args: str) -> None:
    _on(side, other, monkeypatch)
    done = subprocess.run([sys.executable, "-m", "megatron_lst.checkpoint.cli", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"lst-convert {' '.join(args)} on the {side} release:\n" \
                                 f"{done.stdout[-2000:]}{done.stderr[-4000:]}"


def _tensors(portable: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(portable / "model.safetensors"))


def _assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize(("writer", "reader"), [("installed", "other"), ("other", "installed")])
def test_portable_conversions_agree_across_releases(other, tmp_path, monkeypatch, writer, reader):
    flags = tiny_flags(write_corpus(tmp_path / "data")) + [
        "--train-iters", "2", "--eval-interval", "1000", "--save", str(tmp_path / "ckpt")]
    _on(writer, other, monkeypatch)
    run_distributed(WORKER, 1, ["--training-run", shlex.join(flags)], timeout=600)

    for side in (writer, reader):
        _convert(side, other, monkeypatch, "dist-to-portable", "--load", str(tmp_path / "ckpt"),
                 "--output", str(tmp_path / f"portable_{side}"))
    _assert_same_tensors(tmp_path / f"portable_{writer}", tmp_path / f"portable_{reader}")

    _convert(writer, other, monkeypatch, "portable-to-dist", "--portable",
             str(tmp_path / f"portable_{writer}"), "--save", str(tmp_path / "back"))
    _convert(reader, other, monkeypatch, "dist-to-portable", "--load", str(tmp_path / "back"),
             "--output", str(tmp_path / "back_portable"))
    _assert_same_tensors(tmp_path / f"portable_{writer}", tmp_path / "back_portable")
