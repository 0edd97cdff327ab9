"""The GPU suite: offline install, CUDA correctness, the paper-1b step benchmark and the kernel
microbenchmarks in one command, whose results come back as one archive and one summary.

    bash tools/gpu_suite.sh                 # on the GPU machine (benchmarks/README.md)
    bash tools/gpu_suite.sh --cpu-dry-run   # the same stages on CPU at tiny shapes (CI)

Carried beside the checkout, both ignored by git: `wheels/` (megatron-core==MEGATRON_CORE_VERSION
for the machine's Python) and `fixtures/reference_lst/` (the reference LST fixtures; the dry run
skips that check without them). Stages, most important first; each has a time limit (capped by
what is left of --budget), and a failed, timed-out or skipped stage never stops the next one:

  install          a fresh venv that sees the machine's packages (torch, triton, setuptools, ...)
                   through a .pth file, like --system-site-packages does for a plain Python (the
                   machine's python3 is itself a venv, whose packages --system-site-packages would
                   not see); then `pip install --no-index --no-deps --no-build-isolation
                   --find-links wheels megatron-core==PIN -e .` into it, and a provenance check
  correctness      tools/gpu_suite_checks.py: Triton vs PyTorch kernels in a whole LST forward and
                   backward (fp32, bf16; fp32 on packed documents too, with a check that no
                   document reads the one before it), the reference fixture logits in fp32
  kernel_tests     the CUDA kernel tests (`pytest -m gpu tests/kernels`) but those of every
                   autotune config; on CPU a few of the same tests under the Triton interpreter
  step_lst         tools/bench_step.py: paper-1b LST, all 25 global layers, 4 rows x 4096 global
                   positions, bf16, distributed optimizer, synthetic rows blended 67/33 text/speech
  step_baseline    the same for the token baseline
  kernel_bench     tools/bench_kernels.py at the paper's shapes
  speech_heavy     tools/bench_model.py: LST and the baseline at equal global positions on the
                   reference's speech-heavy rows (static p=4, N/P about 3.1), the LST/baseline
                   raw tokens/s ratio next to its FLOP ceiling
  kernel_tile_tests  the kernel tests at every autotune config's tiles, warps and stages, last:
                   dozens of compilations that must not take time from the benchmarks

Every log and JSON goes into OUT/gpu_suite.tar.gz, rewritten while stages run (a command killed
from outside still leaves the stages done so far); OUT/summary.txt has the figures. Exit status:
0 when every stage passed, 1 otherwise. Only the Python standard library is used here: this runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
MEGATRON_CORE_VERSION = "0.16.1"  # the version CI tests
ARCHIVE = "gpu_suite.tar.gz"
SUMMARY = "summary.txt"
ARCHIVE_EVERY_SECONDS = 20.0
MIN_STAGE_SECONDS = 10.0  # a stage is skipped when less of the budget is left
# H200 SXM dense bf16 peak, NVIDIA H200 datasheet (1,979 TFLOPS with sparsity); the MFU denominator
# of bench_step (megatron_lst.training.device_peak.PEAK_DENSE_FLOPS).
PEAK_SOURCE = "dense bf16 peak from the NVIDIA datasheet (H100/H200 SXM: 989 TFLOP/s)"


@dataclass
class Mode:
    """What differs between the GPU run and the CPU dry run: shapes, limits and budget."""

    name: str
    budget_seconds: float
    limits: dict[str, float]
    step_steps: tuple[int, int]  # (warmup, measured)
    lst_flags: list[str]
    baseline_flags: list[str]
    speech_heavy_flags: list[str]
    kernel_bench_flags: list[str]
    kernel_tests: list[str]
    kernel_tile_tests: list[str]
    correctness_flags: list[str]
    stage_env: dict[str, str] = field(default_factory=dict)
    """Added to every stage's environment."""
    kernel_check_env: dict[str, str] = field(default_factory=dict)
    """Added for the stages that run the Triton kernels against the references."""


AUTOTUNE_TILE_TESTS = "autotuner_tiles"  # tests/kernels/test_triton_kernels.py, by name
PAPER_ROWS = ["--seq-length", "4096", "--micro-batch-size", "4", "--global-batch-size", "4",
              "--bf16", "--use-distributed-optimizer"]
TINY_ROWS = ["--micro-batch-size", "2", "--global-batch-size", "2", "--bf16",
             "--use-distributed-optimizer"]

GPU = Mode(
    name="gpu", budget_seconds=400,
    # correctness autotunes every kernel in fp32 and in bf16 (5 configs of 5 kernels in 2 dtypes:
    # at least 50 Triton compilations) besides building seven models
    limits={"install": 60, "correctness": 100, "kernel_tests": 100, "step_lst": 100,
            "step_baseline": 60, "kernel_bench": 90, "speech_heavy": 90, "kernel_tile_tests": 60},
    step_steps=(3, 10),
    lst_flags=["--config", "examples/configs/paper_1b_lst.yaml", *PAPER_ROWS,
               "--max-tokens", "16384"],
    baseline_flags=["--config", "examples/configs/paper_1b_baseline.yaml", *PAPER_ROWS],
    # N = 12800 tokens per row: P about 4096 patches, the step benchmark's positions per row
    speech_heavy_flags=["--device", "cuda", "--presets", "paper-1b", "--tokens", "12800",
                        "--batch-size", "4", "--warmup", "2", "--steps", "5"],
    kernel_bench_flags=["--device", "cuda"],
    kernel_tests=["-m", "gpu", "tests/kernels", "-k", f"not {AUTOTUNE_TILE_TESTS}"],
    kernel_tile_tests=["-m", "gpu", "tests/kernels/test_triton_kernels.py", "-k",
                       AUTOTUNE_TILE_TESTS],
    correctness_flags=["--device", "cuda"],
)
CPU_DRY_RUN = Mode(
    # About 100 s of CPU time in all; the limits only stop a hang, with room for a busy CI host.
    name="cpu-dry-run", budget_seconds=1200,
    limits=dict.fromkeys(GPU.limits, 300),
    step_steps=(1, 2),
    lst_flags=["--config", "examples/configs/tiny_cpu_lst.yaml", *TINY_ROWS],
    baseline_flags=["--config", "examples/configs/tiny_cpu_baseline.yaml", *TINY_ROWS],
    speech_heavy_flags=["--device", "cpu", "--presets", "tiny", "--tokens", "96",
                        "--batch-size", "2", "--warmup", "1", "--steps", "1", "--threads", "1"],
    kernel_bench_flags=["--device", "cpu", "--tiny"],
    # The compiled kernel tests need CUDA; the same file runs interpreted (a few cases).
    kernel_tests=["tests/kernels/test_triton_kernels.py", "-k",
                  f"((segment_pool and 0-max) or (cross_attention and 2-3-)) and not "
                  f"{AUTOTUNE_TILE_TESTS}"],
    kernel_tile_tests=["tests/kernels/test_triton_kernels.py", "-k",
                       f"{AUTOTUNE_TILE_TESTS} and 0-"],
    correctness_flags=["--device", "cpu", "--tiny"],
    stage_env={"CUDA_VISIBLE_DEVICES": ""},
    kernel_check_env={"TRITON_INTERPRET": "1"},
)


# --- running stages --------------------------------------------------------------------------

@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: why"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Suite:
    """Runs stages as process groups with time limits and keeps the archive current."""

    def __init__(self, mode: Mode, out: Path, work: Path, command: str):
        self.mode, self.out, self.work, self.command = mode, out, work, command
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.deadline = time.monotonic() + mode.budget_seconds
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.results: list[StageResult] = []
        self.summary_lines: Callable[[], list[str]] = list

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, commands: list[list[str]], env: dict[str, str],
            check: Callable[[Path], str | None] | None = None) -> StageResult:
        """Run `commands` in order under one time limit; `check(log)` may fail the stage."""
        if self.remaining() < MIN_STAGE_SECONDS:
            return self._record(StageResult(name, "skipped: the suite's budget is spent"))
        limit = min(self.mode.limits[name], self.remaining())
        log_path = self.logs / f"{name}.log"
        start = time.monotonic()
        status = "ok"
        print(f"=== {name} (limit {limit:.0f} s)", flush=True)
        with open(log_path, "w") as log:
            for command in commands:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                code = self._run_one(command, env, log, start + limit)
                if code is None:
                    status = f"timed out after {limit:.0f} s"
                    break
                if code != 0:
                    status = f"failed (exit {code})"
                    break
        if status == "ok" and check is not None:
            problem = check(log_path)
            if problem:
                status = f"failed: {problem}"
                with open(log_path, "a") as log:
                    log.write(f"\n{status}\n")
        result = StageResult(name, status, time.monotonic() - start)
        if not result.ok:
            print(f"=== {name}: {status}; last lines of {log_path.name}:", flush=True)
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-25:]), flush=True)
        return self._record(result)

    def _run_one(self, command, env, log, deadline: float) -> int | None:
        process = subprocess.Popen(command, cwd=CHECKOUT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                code = process.wait(timeout=max(0.1, min(ARCHIVE_EVERY_SECONDS,
                                                         deadline - time.monotonic())))
                _kill_group(process)  # workers it left behind (compilers, data loaders)
                return code
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    _kill_group(process)
                    return None
                self.write_archive()

    def _record(self, result: StageResult) -> StageResult:
        self.results.append(result)
        print(f"=== {result.name}: {result.status} ({result.seconds:.0f} s)", flush=True)
        self.write_archive()
        return result

    def write_archive(self) -> None:
        """OUT/summary.txt and OUT/gpu_suite.tar.gz (work folder + summary), each replaced
        atomically."""
        summary = "\n".join(self._summary()) + "\n"
        (self.work / SUMMARY).write_text(summary)
        partial = self.out / f"{ARCHIVE}.partial"
        with tarfile.open(partial, "w:gz") as archive:
            archive.add(self.work, arcname="gpu_suite")
        os.replace(partial, self.out / ARCHIVE)
        (self.out / f"{SUMMARY}.partial").write_text(summary)
        os.replace(self.out / f"{SUMMARY}.partial", self.out / SUMMARY)

    def _summary(self) -> list[str]:
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - self.started).total_seconds()
        lines = [f"megatron-lst GPU suite ({self.mode.name}), started "
                 f"{self.started.isoformat(timespec='seconds')}, {elapsed:.0f} s so far",
                 f"command: {self.command}", "", f"{'stage':<18}{'seconds':>8}  status"]
        lines += [f"{r.name:<18}{r.seconds:>8.0f}  {r.status}" for r in self.results]
        try:
            lines += ["", *self.summary_lines()]
        except Exception as error:  # a summary must never lose the archive
            lines += ["", f"(summary incomplete: {type(error).__name__}: {error})"]
        return lines


def _kill_group(process: subprocess.Popen) -> None:
    """End a stage's process group (its own session): TERM, then KILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its group may linger a moment
            time.sleep(0.2)


# --- the stages ------------------------------------------------------------------------------

def machine_site_dirs() -> list[str]:
    """The running Python's site-packages folders (a venv's own when it is one)."""
    dirs = list(site.getsitepackages())
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in dirs:
            dirs.append(path)
    return [d for d in dirs if Path(d).is_dir()]


def link_machine_site(venv: Path) -> None:
    """Make the fresh venv see the running (machine's) Python's packages: a .pth file in its
    site-packages that adds the machine's folders with their own .pth files, as
    --system-site-packages would. Its own site-packages stays first on sys.path."""
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in machine_site_dirs()]
    pth = Path(purelib, "machine_site.pth")
    pth.write_text("\n".join(lines) + "\n")
    print(f"{pth}:\n" + "\n".join(lines))


def stage_env(mode: Mode) -> dict[str, str]:
    """The stages' environment: nothing from the caller's PYTHONPATH or kernel override."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LST_KERNEL_BACKEND", "PYTHONHOME")}
    env.update(PYTHONUNBUFFERED="1", **mode.stage_env)
    return env


def kernel_tests_check(log: Path, gpu: bool) -> str | None:
    """The pytest stage must have run tests, and on the GPU skipped none (a skip there means
    CUDA was not seen)."""
    tail = log.read_text(errors="replace").splitlines()[-5:]
    text = "\n".join(tail)
    if " passed" not in text:
        return "no test passed"
    if gpu and " skipped" in text:
        return "tests were skipped: CUDA not seen by pytest?"
    return None


# --- summary ---------------------------------------------------------------------------------

def _load(work: Path, name: str) -> dict | None:
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(work: Path) -> list[str]:
    """The figures and the issue's targets, from the stages' JSON files (what exists so far)."""
    lines: list[str] = []
    env = _load(work, "environment") or {}
    prov = _load(work, "provenance") or {}
    if env:
        lines.append(f"machine: {env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch "
                     f"{env.get('torch')}, triton {env.get('triton')}, megatron-core "
                     f"{prov.get('megatron-core', 'not installed yet')}; checkout "
                     f"{env.get('commit')}")
    correctness = _load(work, "correctness")
    if correctness:
        for part in ("backends", "reference"):
            for c in correctness[part].get("checks", []):
                error = c.get("relative_error", c.get("max_abs_error"))
                lines.append(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {error:.3g} "
                             f"(limit {c['limit']:.3g})")
            if "skipped" in correctness[part]:
                lines.append(f"skipped: {part}: {correctness[part]['skipped']}")
    kernels = _load(work, "kernel_bench")
    card = (kernels or {}).get("card") or {}
    for name, label in (("step_lst", "LST, 67/33 mix"), ("step_baseline", "baseline")):
        bench = _load(work, name)
        if bench:
            lines += ["", *_step_lines(label, bench, card)]
    speech_heavy = _load(work, "speech_heavy")
    if speech_heavy:
        lines += ["", *_speech_heavy_lines(speech_heavy)]
    lst = _load(work, "step_lst")
    if lst:
        local = sum(lst["split_seconds"].get(p, 0.0) for p in ("local encoder", "local decoder"))
        share = local / lst["median_step_seconds"]
        mfu = lst.get("mfu")
        lines.append(f"LST step (67/33): MFU {_pct(mfu)} (target >= 40%); local modules + "
                     f"kernels {share:.0%} of the step (target <= 20%)")
    if kernels:
        lines += ["", *_kernel_lines(kernels)]
    return lines


def _speech_heavy_lines(report: dict) -> list[str]:
    """bench_model.py's LST/baseline pairs: raw tokens/s ratio against its FLOP ceiling."""
    results = report["results"]
    baselines = {(r["preset"], r["patches_per_row"]): r for r in results
                 if r["model"] == "baseline"}
    lines = []
    for lst in (r for r in results if r["model"] == "lst"):
        base = baselines.get((lst["preset"], lst["patches_per_row"]))
        if base is None:
            continue
        ratio = lst["raw_tokens_per_second"] / base["raw_tokens_per_second"]
        ceiling = (lst["tokens_per_row"] / base["tokens_per_row"]) * (
            base["step_flops"] / lst["step_flops"])
        shares = ", ".join(f"{k} {v:.0%}" for k, v in (lst.get("shares") or {}).items())
        lines += [
            f"speech-heavy rows ({lst['preset']}, {report['args']['dtype']}, B={lst['batch']}, "
            f"N={lst['tokens_per_row']}, P={lst['patches_per_row']}, N/P "
            f"{lst['tokens_per_row'] / lst['patches_per_row']:.2f}): LST "
            f"{1e3 * lst['step_seconds']:.1f} ms/step, {lst['peak_memory_mb'] / 1024:.1f} GiB "
            f"peak ({shares}); baseline {1e3 * base['step_seconds']:.1f} ms/step, "
            f"{base['peak_memory_mb'] / 1024:.1f} GiB peak",
            f"  LST raw tokens/s over the baseline's: {ratio:.2f}x; FLOP ceiling {ceiling:.2f}x; "
            f"{ratio / ceiling:.0%} of it (target >= 90%)"]
    return lines


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _step_lines(label: str, bench: dict, card: dict) -> list[str]:
    step = bench["median_step_seconds"]
    measured = card.get("bf16_matmul_TFLOPs")
    mfu = (f"MFU {_pct(bench['mfu'])} of {bench['peak_tflops']:.0f} TFLOP/s ({PEAK_SOURCE})"
           if bench.get("mfu") is not None else "MFU n/a (no known peak for this device)")
    lines = [
        f"step benchmark, {label} ({bench['device']}): {1e3 * step:.1f} ms/step median; "
        f"{bench['tokens_per_second']:,.0f} tokens/s, {bench['global_positions_per_second']:,.0f}"
        f" global positions/s; {bench['tflops_per_device']:.3g} model TFLOP/s; {mfu}"
        + (f", {bench['tflops_per_device'] / measured:.0%} of the bf16 matmul rate measured in "
           f"this run ({measured:.0f} TFLOP/s)" if measured else ""),
        f"  peak memory {bench['peak_memory_gib']:.1f} GiB; set-up {bench['setup_seconds']:.1f} s;"
        f" first step (compile/autotune) {bench['first_step_seconds']:.1f} s; "
        f"{bench['tokens_per_step'] / bench['global_positions_per_step']:.2f} tokens per position",
        "  share of the step: " + ", ".join(
            f"{part} {seconds / step:.0%}" for part, seconds in bench["split_seconds"].items()),
    ]
    return lines


def _kernel_lines(kernels: dict) -> list[str]:
    card = kernels.get("card") or {}
    lines = []
    if card:
        lines.append(f"card, measured here: copy {card['copy_GBps']:.0f} GB/s, bf16 matmul "
                     f"{card['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    for r in kernels["results"]:
        if not r.get("ratios"):
            continue
        s = r["shape"]
        shape = (f"pool {s['reduce']} N{s['tokens']} D{s['dim']} {s['lengths']}"
                 if r["kernel"] == "segment_pool" else
                 f"attn {s['direction']} N{s['tokens']} W{s['window']} k{s['slots']} "
                 f"hd{s['head_dim']}")
        ratios = ", ".join(f"{name} {v['time']:.1f}x time"
                           + (f" {v['memory']:.1f}x mem" if "memory" in v else "")
                           for name, v in r["ratios"].items())
        of_card = f", {r['of_card']:.0%} of card" if r.get("of_card") is not None else ""
        lines.append(f"{shape}: {r['fwd_bwd_ms']:.3f} ms fwd+bwd{of_card}; vs {ratios}")
    return lines + _kernel_targets(kernels["results"])


def _kernel_targets(results: list[dict]) -> list[str]:
    """The issue's kernel targets, each as the worst case over the shapes measured."""
    ours = [r for r in results if r.get("ratios")]
    pools = [r for r in ours if r["kernel"] == "segment_pool"]
    largest = max((r["shape"]["tokens"] for r in ours if r["kernel"] != "segment_pool"),
                  default=None)
    attention = [r for r in ours if r["kernel"] != "segment_pool"
                 and r["shape"]["tokens"] == largest]

    def worst(rows, impl, key):
        values = [r["ratios"][impl][key] for r in rows if key in r["ratios"].get(impl, {})]
        return f"{min(values):.1f}x" if values else "n/a"

    lines = ["", "kernel targets (worst shape):"]
    if pools:
        fractions = [r["of_card"] for r in pools if r.get("of_card") is not None]
        lines.append(f"  segment pool fwd+bwd: {min(fractions):.0%} of the copy bandwidth "
                     f"(target >= 80%); " if fractions else "  segment pool fwd+bwd: ")
        lines[-1] += f"scatter_reduce takes {worst(pools, 'scatter_reduce (LST ref)', 'time')} " \
                     "its time (target >= 3x)"
    if attention:
        lines.append(f"  patch cross-attention fwd+bwd at N={largest}: dense-mask SDPA takes "
                     f"{worst(attention, 'dense-mask SDPA', 'time')} its time (target >= 5x) "
                     f"and {worst(attention, 'dense-mask SDPA', 'memory')} its memory (target "
                     f">= 10x); compiled flex_attention takes "
                     f"{worst(attention, 'flex_attention (LST ref GPU)', 'time')} its time "
                     "(target > 1x)")
    return lines


# --- main ------------------------------------------------------------------------------------

def describe_machine(python: str, env: dict[str, str]) -> dict:
    """Versions and card, from the machine's Python (before anything is installed)."""
    probe = ("import json, platform, torch\n"
             "try:\n import triton; tv = triton.__version__\nexcept ImportError:\n tv = None\n"
             "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
             " 'triton': tv, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available()"
             " else None, 'cuda': torch.version.cuda}))")
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=env)
    info = json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-2000:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    git = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    info["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (no .git)"
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same stages on CPU at tiny shapes (what CI runs)")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or CHECKOUT / "runs" / "gpu_suite"),
                        help="where the archive and the summary go (default: $OUT, else "
                             "runs/gpu_suite)")
    parser.add_argument("--wheels", type=Path, default=CHECKOUT / "wheels",
                        help=f"folder holding megatron-core {MEGATRON_CORE_VERSION}'s wheel")
    parser.add_argument("--fixtures", type=Path, default=CHECKOUT / "fixtures" / "reference_lst",
                        help="the reference_lst fixture folder (required on the GPU)")
    parser.add_argument("--fetch-wheel", action="store_true",
                        help=f"first download megatron-core=={MEGATRON_CORE_VERSION} for this "
                        "Python into --wheels (needs an index; CI's dry run)")
    parser.add_argument("--budget", type=float, help="seconds for all stages (default: 400 on "
                        "the GPU, 1200 for the dry run)")
    parser.add_argument("--link-machine-site", type=Path, help=argparse.SUPPRESS)  # a stage step
    args = parser.parse_args(argv)
    if args.link_machine_site:
        link_machine_site(args.link_machine_site)
        return 0
    mode = CPU_DRY_RUN if args.cpu_dry_run else GPU
    if args.budget:
        mode = dataclasses.replace(mode, budget_seconds=args.budget)
    if args.fetch_wheel:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", "--dest", str(args.wheels),
                        f"megatron-core=={MEGATRON_CORE_VERSION}"], check=True)
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not any(args.wheels.glob(f"megatron_core-{MEGATRON_CORE_VERSION}-{python_tag}-*.whl")):
        parser.error(f"no megatron_core-{MEGATRON_CORE_VERSION} wheel for {python_tag} in "
                     f"{args.wheels}: download it first (benchmarks/README.md)")
    fixtures = args.fixtures if (args.fixtures / "config_A.json").is_file() else None
    if fixtures is None and not args.cpu_dry_run:
        parser.error(f"no reference fixtures at {args.fixtures}: copy the reference_lst fixture "
                     "folder there (benchmarks/README.md)")

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work, venv = scratch / "gpu_suite", scratch / "venv"
    command = shlex.join(["bash", "tools/gpu_suite.sh", *(argv if argv is not None
                                                         else sys.argv[1:])])
    suite = Suite(mode, args.out, work, command)
    suite.summary_lines = lambda: summarise(work)
    env = stage_env(mode)
    (work / "environment.json").write_text(json.dumps(describe_machine(sys.executable, env),
                                                      indent=1))

    python = str(venv / "bin" / "python")

    suite.run("install", [
        [sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)],
        [sys.executable, str(Path(__file__).resolve()), "--link-machine-site", str(venv)],
        # pip is the machine's, seen through the link; --ignore-installed: a megatron-core that
        # the machine may have must not stand in for the pinned one
        [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
         "--ignore-installed", "--no-cache-dir", "--disable-pip-version-check",
         "--find-links", str(args.wheels), f"megatron-core=={MEGATRON_CORE_VERSION}", "-e", "."],
        [python, "tools/gpu_suite_checks.py", "provenance", "--megatron-core",
         MEGATRON_CORE_VERSION, "--prefix", str(venv), "--json", str(work / "provenance.json")],
    ], env)
    if not suite.results[-1].ok:
        python = sys.executable  # the later stages still tell what else is broken
    kernel_check_env = {**env, **mode.kernel_check_env}
    suite.run("correctness", [[python, "tools/gpu_suite_checks.py", "correctness",
                               *mode.correctness_flags,
                               *(["--fixtures", str(fixtures)] if fixtures else []),
                               "--json", str(work / "correctness.json")]], kernel_check_env)

    def kernel_test_stage(name: str, selection: list[str]) -> None:
        suite.run(name, [[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]],
                  kernel_check_env, check=lambda log: kernel_tests_check(log, gpu=not args.cpu_dry_run))

    kernel_test_stage("kernel_tests", mode.kernel_tests)
    warmup, steps = mode.step_steps
    for name, flags in (("step_lst", mode.lst_flags), ("step_baseline", mode.baseline_flags)):
        suite.run(name, [[python, "tools/bench_step.py", "--warmup", str(warmup), "--steps",
                          str(steps), "--json", str(work / f"{name}.json"), "--", *flags]], env)
    suite.run("kernel_bench", [[python, "tools/bench_kernels.py", *mode.kernel_bench_flags,
                                "--out", str(work / "kernel_bench.json")]], env)
    suite.run("speech_heavy", [[python, "tools/bench_model.py", *mode.speech_heavy_flags,
                                "--json", str(work / "speech_heavy.json")]], env)
    kernel_test_stage("kernel_tile_tests", mode.kernel_tile_tests)
    suite.write_archive()
    print((args.out / SUMMARY).read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r.ok for r in suite.results) else 1


if __name__ == "__main__":
    sys.exit(main())
