"""Run megatron-lst's compatibility tests against another megatron-core release.

    python tools/megatron_core_compat.py [--version X] [--subset ci|full] [--skip-if-unreachable]
    make compat-megatron-core [MEGATRON_CORE=X]

setup.py asks for megatron-core>=0.16: pip resolves 0.16.1 on Python 3.11 (what CI runs) and the
newest release on Python 3.12 (GPU clusters). This downloads megatron-core X (default: the newest
on the package index) as its cp312 manylinux wheel with `pip download`, unpacks it under --cache
(its Python sources run on this Python; nothing is installed), then runs with it:

  1. the tests that exercise megatron.core (models, training, checkpoints, evaluation, the CPU
     layer; multi-process and slow ones included, about 25 min on 2 cores) with the unpacked
     tree first on PYTHONPATH
  2. tests/checkpoint/test_megatron_core_versions.py with LST_OTHER_MEGATRON_CORE set to it:
     checkpoints saved by the installed release resume and convert under the other, and back

--subset ci keeps what runs in a few minutes on 2 cores: the CPU layer, the checkpoint-layout and
integrity tests, a resume with another --lr, lst-eval's clean-output test, generation's KV cache
against full recomputation (its keys cached rotated, through megatron's attention), and
single-process resumes across the releases both ways.

A --version whose wheel is already in --cache is used from there, without the package index.

Exit status: 0 when every test passed; 1 when a test failed; 2 for a bad --version or wheel; 3
when the wheel could not be downloaded because the package index is unreachable (network errors
in pip's output and no list of releases from the index, or no wheel after DOWNLOAD_TIMEOUT_S), or
0 then with --skip-if-unreachable, after a line saying the check was SKIPPED. Only that case is
skipped: a version the index does not have, and every test failure, fail.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary "
                         r"failure in name resolution|Network is unreachable|ProxyError|"
                         r"ConnectTimeout|ReadTimeout|Max retries exceeded|SSLError")
# pip's "Could not find a version that satisfies ... (from versions: 0.15.0, ...)": the index
# answered with the releases it has ("none" when it could not be read).
INDEX_ANSWERED = re.compile(r"\(from versions: (?!none\))")
# The longest a wheel download may take (pip's own timeout is per read: a slow index that keeps
# sending could hold CI for as long as it likes).
DOWNLOAD_TIMEOUT_S = 600
VERSIONS_TEST = "tests/checkpoint/test_megatron_core_versions.py"
FULL_SUBSET = ["tests/unit", "tests/models", "tests/training", "tests/checkpoint",
               "tests/evaluation"]
CI_SUBSET = ["tests/unit", "tests/checkpoint/test_megatron_core_layouts.py",
             "tests/checkpoint/test_integrity.py",
             "tests/training/test_resume.py::test_a_resume_with_another_peak_lr_follows_it_when_asked",
             "tests/evaluation/test_eval_cli.py::"
             "test_loading_a_checkpoint_prints_no_torch_deprecation_warnings",
             *(f"tests/evaluation/test_generation.py::{test}" for test in (
                 "test_greedy_cache_gives_the_tokens_of_full_recomputation",
                 "test_long_cached_generation_gives_the_full_models_tokens",
                 "test_models_with_document_rules_generate_one_document",
                 "test_cached_steps_rotate_each_global_position_once",
                 "test_a_megatron_that_skips_the_rotation_hook_fails_loudly",
                 "test_a_megatron_self_attention_without_the_arguments_read_is_refused_at_build"))]
CI_VERSIONS_SELECTION = "other_tree or installed-other-1 or other-installed-1"


class Unreachable(RuntimeError):
    """pip could not reach the package index."""


class BadRelease(RuntimeError):
    """No such megatron-core release or wheel."""


def download_wheel(version: str | None, dest: Path) -> Path:
    """The megatron-core wheel (cp312, manylinux) of `version` (None: the newest) in `dest`: the
    one already there for a given `version` (no index needed), else downloaded."""
    cached = sorted(dest.glob(f"megatron_core-{version}-*.whl")) if version else []
    if cached:
        return cached[-1]
    requirement = f"megatron-core=={version}" if version else "megatron-core"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", WHEEL_PYTHON, "--platform", WHEEL_PLATFORM,
               "--disable-pip-version-check", "--dest", str(dest), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"pip download {requirement} did not finish in {DOWNLOAD_TIMEOUT_S} s "
                          f"(the package index is too slow)") from None
    if done.returncode != 0:
        output = done.stdout + done.stderr
        # Retries are logged on the way to an answer too (a slow index, an unreachable extra
        # index): an index that listed its releases was reached.
        if UNREACHABLE.search(output) and not INDEX_ANSWERED.search(output):
            raise Unreachable(f"pip download {requirement} could not reach the package index:\n"
                              f"{output[-1500:]}")
        raise BadRelease(f"pip download {requirement} failed (not a network error: is there "
                         f"such a release for Python {WHEEL_PYTHON}?):\n{output[-1500:]}")
    names = re.findall(r"megatron_core-[^\s/]+?\.whl", done.stdout + done.stderr)
    wheels = [dest / name for name in names if (dest / name).is_file()] or sorted(
        dest.glob("megatron_core-*.whl"), key=lambda p: p.stat().st_mtime)[-1:]
    if not wheels:
        raise BadRelease(f"pip download {requirement} left no megatron_core wheel in {dest}")
    return wheels[-1]


def unpack(wheel: Path, cache: Path) -> Path:
    """`wheel` unpacked under `cache` (once); returns the folder holding `megatron/core`."""
    version = wheel.name.split("-")[1]
    tree = cache / f"megatron-core-{version}"
    marker = tree / ".unpacked"
    if not marker.is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tree)
        marker.write_text(wheel.name)
    if not (tree / "megatron" / "core" / "__init__.py").is_file():
        raise BadRelease(f"{wheel} holds no megatron/core package")
    return tree


def run_tests(tree: Path, subset: str) -> int:
    """Run the compatibility tests with `tree`; pytest's exit status (0 when both runs pass)."""
    env = dict(os.environ)
    pythonpath = [str(CHECKOUT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    selection = CI_SUBSET if subset == "ci" else FULL_SUBSET
    ignore = [] if subset == "ci" else [f"--deselect={VERSIONS_TEST}"]
    markers = "not distributed and not slow" if subset == "ci" else ""
    under_other = subprocess.run(
        [*pytest, "-m", markers, *ignore, *selection], cwd=CHECKOUT,
        env={**env, "PYTHONPATH": os.pathsep.join([str(tree), *pythonpath])})
    across = subprocess.run(
        [*pytest, "-m", "", VERSIONS_TEST,
         *(["-k", CI_VERSIONS_SELECTION] if subset == "ci" else [])],
        cwd=CHECKOUT, env={**env, "PYTHONPATH": os.pathsep.join(pythonpath),
                           "LST_OTHER_MEGATRON_CORE": str(tree)})
    return under_other.returncode or across.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="the megatron-core release (default: the newest)")
    parser.add_argument("--wheel", type=Path, help="a megatron-core wheel already downloaded "
                        "(instead of --version)")
    parser.add_argument("--cache", type=Path, default=CHECKOUT / ".cache" / "megatron-core",
                        help="where wheels are downloaded and unpacked (default: %(default)s)")
    parser.add_argument("--subset", choices=("ci", "full"), default="full",
                        help="which tests to run (default: full)")
    parser.add_argument("--skip-if-unreachable", action="store_true",
                        help="exit 0 with a SKIPPED line when the package index is unreachable")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        wheel = args.wheel or download_wheel(args.version, args.cache)
        if not wheel.is_file() or not wheel.name.startswith("megatron_core-"):
            raise BadRelease(f"--wheel {wheel} is not a megatron_core wheel file")
        tree = unpack(wheel, args.cache)
    except Unreachable as error:
        print(f"megatron-core compatibility check SKIPPED: {error}", file=sys.stderr)
        return 0 if args.skip_if_unreachable else 3
    except zipfile.BadZipFile as error:  # a wheel cut short, or damaged in the cache
        print(f"megatron-core compatibility check: {wheel} is damaged ({error}); delete it "
              f"(a wheel in --cache is downloaded again by the next run)", file=sys.stderr)
        return 2
    except BadRelease as error:
        print(f"megatron-core compatibility check: {error}", file=sys.stderr)
        return 2
    print(f"megatron-core compatibility: {wheel.name} unpacked at {tree}", flush=True)
    status = run_tests(tree, args.subset)
    print(f"megatron-core compatibility with {wheel.name.split('-')[1]}: "
          f"{'passed' if status == 0 else 'FAILED'}", flush=True)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
