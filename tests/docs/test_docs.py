"""The documentation cannot drift silently from the code.

- every repository path named in `docs/*.md` and README.md exists (links to a page anchor: the
  heading exists too);
- every command-line flag named there exists in one of the project's real parsers (collected
  from the parsers themselves), or belongs to an external command named in the same paragraph
  (`EXTERNAL_FLAGS`); every `make` target named there exists in the Makefile;
- every flag of lst-train (docs/training.md) and of lst-eval / lst-generate
  (docs/evaluation.md) is documented; every `--help` description is a whole sentence;
- the worked examples of docs/data.md marked `<!-- docs-test: run -->` run as written, in order,
  in a scratch directory, and the output block marked `<!-- docs-test: output -->` is what the
  example before it prints;
- no file outside docs/ points to a document the repository does not have, and a section named
  by its title (`docs/training.md, "The log line"`) is a heading of its page.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from megatron_lst.training.megatron_flags import UNSUPPORTED_MEGATRON_FLAGS

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = ("architecture.md", "data.md", "evaluation.md", "training.md", "kernels.md",
         "audio.md")
DOC_FILES = [DOCS / page for page in PAGES] + [REPO / "README.md", REPO / "kernels" / "README.md",
                                              REPO / "benchmarks" / "README.md"]

# Flags of commands that are not ours, keyed by the words that name the command: a flag in this
# table is accepted only in a paragraph that names its command.
EXTERNAL_FLAGS: dict[tuple[str, ...], frozenset[str]] = {
    # torchrun (torch.distributed.run): examples/pretrain_lst_torchrun.sh and the SLURM script
    ("torchrun",): frozenset({"--standalone", "--nnodes", "--nproc-per-node", "--rdzv-backend",
                              "--rdzv-endpoint", "--rdzv-id", "--max-restarts",
                              "--signals-to-handle"}),
    # sbatch / srun options of examples/pretrain_lst_slurm.sbatch
    ("sbatch", "srun", "SLURM"): frozenset({"--signal", "--requeue", "--export", "--nodes",
                                            "--time", "--partition"}),
    # pip: the wheels the GPU suite installs offline (benchmarks/README.md)
    ("pip",): frozenset({"--no-index", "--no-deps", "--no-build-isolation", "--find-links",
                         "--only-binary", "--python-version", "--implementation", "--platform"}),
    # Nsight Systems, which --profile drives without --use-pytorch-profiler (docs/training.md)
    ("nsys",): frozenset({"--capture-range", "--capture-range-end"}),
    # building NVIDIA apex from source (README, "GPU extras")
    ("apex",): frozenset({"--cpp_ext", "--cuda_ext"}),
    # Megatron-LM flags lst-train refuses by name
    # (docs/training.md, "Where we differ from Megatron-LM")
    ("Not supported",): frozenset(UNSUPPORTED_MEGATRON_FLAGS),
}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
MAKE_TARGET = re.compile(r"(?:^|`)make ([\w-]+)", re.MULTILINE)
RUN_MARKER = "<!-- docs-test: run -->"
OUTPUT_MARKER = "<!-- docs-test: output -->"
FENCED = r"\s*\n```(\w*)\n(.*?)\n```"


# --- the parsers --------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def _capture_parser(main: Callable[..., object], *args) -> argparse.ArgumentParser:
    """The parser `main` builds, taken at its `parse_args` call (nothing after it runs)."""
    def parse_args(self, *_, **__):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        try:
            main(*args)
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{main} never parsed its arguments")


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of its subcommands."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _option_strings(sub)
    return flags


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _script_parsers() -> Iterator[argparse.ArgumentParser]:
    """The parser of every script under tools/ and examples/ that has one."""
    for path in sorted([*REPO.glob("tools/*.py"), *REPO.glob("examples/**/*.py")]):
        module = _load_script(path)
        if hasattr(module, "build_parser"):
            yield module.build_parser()
        elif hasattr(module, "main") and "parse_args" in path.read_text():
            yield _capture_parser(module.main)


@pytest.fixture(scope="module")
def project_parsers() -> list[argparse.ArgumentParser]:
    from megatron_lst.checkpoint.cli import build_parser as convert_parser
    from megatron_lst.evaluation.eval_cli import build_eval_parser
    from megatron_lst.evaluation.generate_cli import build_generate_parser
    from megatron_lst.evaluation.importers import import_main
    from megatron_lst.training.arguments import build_parser as train_parser

    return [train_parser(), build_eval_parser(), build_generate_parser(), convert_parser(),
            _capture_parser(import_main, []), *_script_parsers()]


@pytest.fixture(scope="module")
def project_flags(project_parsers: list[argparse.ArgumentParser]) -> set[str]:
    flags = set().union(*(_option_strings(p) for p in project_parsers))
    assert {"--seq-length", "--max-tokens", "--items", "--prompt-text", "--reference-ckpt",
            "--units-dir", "--input-format", "--budget-flops"} <= flags  # every kind was found
    return flags


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.MULTILINE))


# --- reading the docs ---------------------------------------------------------------------

def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@functools.cache
def _top_level_names() -> frozenset[str]:
    """Top-level files and directories of the repository: git's, where git is at hand (outputs
    such as runs/ or .venv/ are not the repository's), else what is on disk."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tracked = [p.name for p in REPO.iterdir() if not p.name.startswith(".")]
    return frozenset(name.split("/")[0] for name in tracked) | {"docs"}


def _named_paths(text: str) -> Iterator[tuple[str, str]]:
    """(path, the text before it) for every repository path the text names."""
    top = sorted(_top_level_names(), key=len, reverse=True)
    pattern = re.compile(
        r"(?<![\w./-])((?:" + "|".join(map(re.escape, top)) + r")(?:/[\w.*<>#-]*)*"
        r"|(?:[\w-]+/)+[\w-]+\.py)(?![\w/])")
    for match in pattern.finditer(text):
        path = match.group(1).rstrip(".,:;")
        if "/" in path or "." in path or path in _top_level_names():
            yield path, text[:match.start()]


def _is_output_argument(before: str) -> bool:
    return re.search(r"(--out|--output|--json|>)\s*$", before) is not None


def _check_path(path: str, base: Path) -> str | None:
    """None when `path` (relative to the repository, or to `base` for a page link) is real."""
    path, _, anchor = path.partition("#")
    if "<" in path:  # a placeholder: its fixed part must exist
        path = path[:path.index("<")].rsplit("/", 1)[0]
    for root in (REPO, base):
        target = root / path
        exists = any(root.glob(path)) if "*" in path else target.exists()
        if exists:
            if anchor and target.suffix == ".md" and anchor not in _anchors(target):
                return f"{path} has no heading for #{anchor}"
            return None
    return f"{path} does not exist"


# --- the tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(doc: Path):
    text = doc.read_text()
    problems = [f"{path}: {error}" for path, before in _named_paths(text)
                if not _is_output_argument(before)
                and (error := _check_path(path, doc.parent)) is not None]
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    problems += [f"link {link}: {error}" for link in links if not link.startswith("http")
                 and (error := _check_path(link or "#", doc.parent)) is not None]
    anchors = re.findall(r"\]\(#([\w-]+)\)", text)
    problems += [f"link #{a}: no such heading" for a in anchors if a not in _anchors(doc)]
    assert not problems, f"{doc.relative_to(REPO)} names what is not there: {problems}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_flags_exist(doc: Path, project_flags: set[str]):
    unknown = []
    for paragraph in _paragraphs(doc.read_text()):
        external = set().union(*(flags for commands, flags in EXTERNAL_FLAGS.items()
                                 if any(c in paragraph for c in commands)))
        unknown += [f for f in FLAG.findall(paragraph) if f not in project_flags | external]
    assert not unknown, (f"{doc.relative_to(REPO)} names flags no parser has: "
                         f"{sorted(set(unknown))}")
    targets = _make_targets()
    missing = [t for t in MAKE_TARGET.findall(doc.read_text()) if t not in targets]
    assert not missing, f"{doc.relative_to(REPO)} names make targets the Makefile lacks: {missing}"


def _documented_flags(page: str) -> set[str]:
    return set(FLAG.findall((DOCS / page).read_text()))


def test_every_user_facing_flag_is_documented():
    """A new flag of lst-train, lst-eval or lst-generate needs its row in the docs."""
    from megatron_lst.evaluation.eval_cli import build_eval_parser
    from megatron_lst.evaluation.generate_cli import build_generate_parser
    from megatron_lst.training.arguments import build_parser as train_parser

    for page, parsers in (("training.md", [train_parser()]),
                          ("evaluation.md", [build_eval_parser(), build_generate_parser()])):
        flags = set().union(*(_option_strings(p) for p in parsers)) - {"-h", "--help"}
        missing = sorted(flags - _documented_flags(page))
        assert not missing, f"docs/{page} does not document {missing}"


def test_help_descriptions_are_whole_sentences(project_parsers: list[argparse.ArgumentParser]):
    """`--help` opens with the script's first docstring paragraph; its first line alone cut
    three of them mid-sentence ("... against the token")."""
    cut = [p.description for p in project_parsers if not p.description.rstrip().endswith(".")]
    assert not cut, f"--help descriptions cut short: {cut}"


def test_every_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [p for p in PAGES if f"](docs/{p})" not in readme] == []
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)


def _marked_blocks(text: str, marker: str) -> list[tuple[int, str]]:
    """(offset, body) of every fenced block right after `marker`."""
    return [(m.start(), m.group(2)) for m in re.finditer(re.escape(marker) + FENCED, text,
                                                         re.DOTALL)]


@pytest.mark.slow  # about 30 s: five Python processes that import torch and megatron.core
def test_data_examples_run_as_written(tmp_path: Path):
    text = (DOCS / "data.md").read_text()
    runs = _marked_blocks(text, RUN_MARKER)
    outputs = _marked_blocks(text, OUTPUT_MARKER)
    assert len(runs) >= 5 and len(outputs) == 1
    (tmp_path / "tools").symlink_to(REPO / "tools")  # the blocks run "from the repository root"
    env = dict(os.environ,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    printed = {}
    for offset, script in runs:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (f"docs/data.md example failed:\n{script}\n"
                                        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        printed[offset] = result.stdout
    for offset, expected in outputs:
        before = max(o for o in printed if o < offset)
        assert printed[before].strip() == expected.strip()


def _files_outside_docs() -> Iterator[Path]:
    for path in sorted(REPO.iterdir()):
        if path.name.startswith(".") or path.name in ("docs", "__pycache__"):
            continue
        if path.is_file():
            yield path
        elif path.is_dir() and path.name in {"megatron_lst", "kernels", "tools", "tests",
                                             "examples", "benchmarks"}:
            yield from (p for p in sorted(path.rglob("*"))
                        if p.is_file() and "__pycache__" not in p.parts)


def test_no_file_points_to_a_missing_document():
    # Built from parts so that this file does not name them itself.
    absent = [name + ".md" for name in ("DESIGN", "STYLE")]
    problems = []
    for path in _files_outside_docs():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        where = path.relative_to(REPO)
        problems += [f"{where}: {name}" for name in absent if name in text]
        for link in sorted(set(re.findall(r"docs/[\w/-]+\.md(?:#[\w-]+)?", text))):
            if (error := _check_path(link, REPO)) is not None:
                problems.append(f"{where}: {error}")
    assert not problems, f"files point to documents the repository lacks: {problems}"


# A section named by its heading after the page: `docs/training.md, "The log line"`.
SECTION_REFERENCE = re.compile(
    r"(docs/[\w-]+\.md|README(?:\.md)?),?\s+[\"']([A-Z][^\"'\n]{2,60})[\"']")


def test_sections_named_by_their_heading_exist():
    """A message or comment that sends the reader to a section by its title (an error's advice,
    a script's exit status) names a heading the page has: a section renamed, or a title that was
    never a heading, leaves the reader searching."""
    problems = []
    for path in [*_files_outside_docs(), *DOC_FILES]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for page, title in SECTION_REFERENCE.findall(text):
            target = REPO / ("README.md" if page.startswith("README") else page)
            if _slug(title) not in _anchors(target):
                problems.append(f"{path.relative_to(REPO)}: {page} has no heading {title!r}")
    assert not problems, "sections named that their pages lack:\n" + "\n".join(problems)


# --- every fenced command parses with its own command's parser ------------------------------

# Commands shown in fenced blocks that are not ours, or that take no flags of ours.
FOREIGN_COMMANDS = ("make", "bash", "sbatch", "mfa", "python - <<")
TORCHRUN_SWITCHES = {"--standalone"}  # torchrun options without a value


def _fenced_commands(text: str) -> Iterator[str]:
    """Every command line of the fenced shell blocks of `text`: continuation lines joined, a
    `for VAR in A B; do` loop's `$VAR` replaced by its first value."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        if match.group(1) in ("json", "python"):
            continue
        loop_values: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", match.group(2)).splitlines():
            line = line.strip()
            if loop := re.match(r"for (\w+) in (\S+)", line):
                loop_values[loop.group(1)] = loop.group(2)
            for name, value in loop_values.items():
                line = line.replace(f"${name}", value)
            if re.match(r"(\w+=\S+ )*(python|lst-|torchrun)", line):
                yield line


def _our_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(what runs, its arguments) of a command line, or None for a command not ours."""
    while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # environment assignments
        argv = argv[1:]
    if argv[0] == "torchrun":  # torchrun's options, then the script or `-m module`
        i = 1
        while argv[i].startswith("--"):
            i += 1 if argv[i] in TORCHRUN_SWITCHES or "=" in argv[i] else 2
        argv = ["python", *argv[i:]]
    if argv[0].startswith("lst-"):
        return argv[0], argv[1:]
    if argv[0] in ("python", "python3"):
        if argv[1] == "-m":  # our modules only (not pytest, pip, venv)
            return (argv[2], argv[3:]) if argv[2].startswith("megatron_lst") else None
        return argv[1], argv[2:]
    return None


def _parse_as_command(command: str, argv: list[str]) -> None:
    """Parse `argv` with `command`'s own parser; SystemExit (argparse's error) when it fails."""
    from megatron_lst.checkpoint.cli import build_parser as convert_parser
    from megatron_lst.evaluation.eval_cli import build_eval_parser
    from megatron_lst.evaluation.generate_cli import build_generate_parser
    from megatron_lst.evaluation.importers import import_main
    from megatron_lst.training.arguments import ArgumentError
    from megatron_lst.training.arguments import parse_args as parse_train_args

    def train(args: list[str]) -> None:
        try:
            parse_train_args(args)
        except ArgumentError as error:  # a --config file that does not map onto the flags
            raise SystemExit(str(error)) from None

    parsers: dict[str, Callable[[list[str]], object]] = {
        "lst-train": train, "pretrain_lst.py": train,
        "lst-eval": build_eval_parser().parse_args,
        "megatron_lst.evaluation.eval_cli": build_eval_parser().parse_args,
        "megatron_lst.training.cli": train,
        "lst-generate": build_generate_parser().parse_args,
        "lst-convert": convert_parser().parse_args,
        "lst-import-eval": _capture_parser(import_main, []).parse_args,
    }
    if command in parsers:
        parsers[command](argv)
        return
    path = REPO / command
    assert path.suffix == ".py" and path.is_file(), f"no parser known for {command!r}"
    module = _load_script(path)
    parser = (module.build_parser() if hasattr(module, "build_parser")
              else _capture_parser(module.main))
    if "--" in argv:  # tools/bench_step.py: its own flags, then lst-train's after `--`
        train(argv[argv.index("--") + 1:])
        argv = argv[:argv.index("--")]
    parser.parse_args(argv)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_fenced_commands_parse(doc: Path, monkeypatch: pytest.MonkeyPatch):
    """Every command a fenced block shows is accepted by the parser of the command it runs: each
    flag belongs to that command (not merely to some parser of the project), its value has the
    right type and is one of its choices, and the required arguments are there. `--config` files
    are read from the repository root, as the docs run them."""
    import contextlib
    import io
    import shlex

    monkeypatch.chdir(REPO)
    problems, parsed = [], 0
    for line in _fenced_commands(doc.read_text()):
        if line.startswith(FOREIGN_COMMANDS) or (command := _our_command(
                shlex.split(line, comments=True))) is None:
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                _parse_as_command(*command)
            parsed += 1
        except SystemExit as exit_:
            message = stderr.getvalue().strip().splitlines()[-1:] or [str(exit_.code)]
            problems.append(f"{line}\n    -> {message[0]}")
    assert not problems, (f"{doc.relative_to(REPO)} shows commands their parsers refuse:\n"
                          + "\n".join(problems))
    if re.search(r"^```bash\n(lst-|python tools/)", doc.read_text(), re.MULTILINE):
        assert parsed, f"{doc.relative_to(REPO)}: no command of its shell blocks was found"


# --- the documented defaults are the parsers' ----------------------------------------------

def _model_field_default(option: str) -> object:
    """The dataclass default of the model configuration field behind a model flag of lst-train
    (whose parser default is None, "not given"); None when the field has none."""
    import dataclasses

    from megatron_lst.models import config
    from megatron_lst.training.model_flags import MODEL_FLAGS

    classes = {None: config.LSTConfig, "cross_attention": config.CrossAttentionConfig,
               "documents": config.DocumentMaskingConfig, "global_model": config.GlobalModelConfig,
               "encoder": config.LocalModelConfig, "decoder": config.LocalModelConfig}
    flag = next((f for f in MODEL_FLAGS if f.flag == option), None)
    if flag is None:
        return None
    field = next(f for f in dataclasses.fields(classes[flag.part]) if f.name == flag.name)
    return None if field.default is dataclasses.MISSING else field.default


def _documented_default_matches(cell: str, action: argparse.Action, default: object) -> bool | None:
    """Whether a table's default cell states `default`; None when the cell is prose (a rule, a
    derived value) that this check cannot read."""
    cell = cell.split(" (")[0].strip().strip("`")
    if cell == "required":
        return action.required
    if cell in ("on", "off"):
        return bool(default) == (cell == "on")
    if default is None or not re.fullmatch(r"[\w.,+-]+", cell):
        return None
    if isinstance(default, list) and len(default) == 1:
        default = default[0]
    if isinstance(default, bool):
        return None
    if isinstance(default, int | float):
        try:
            return float(cell) == float(default)
        except ValueError:
            return None
    return cell == str(default)


def _default_tables(text: str) -> Iterator[tuple[str, list[str], str]]:
    """(the `## ` section, the flags of a row, its default cell) of every `| flag | default |`
    table row."""
    section = ""
    in_table = False
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if re.match(r"\|\s*flag\s*\|\s*default\s*\|", line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
        elif in_table and "`--" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            yield section, FLAG.findall(cells[0]), cells[1]


def test_documented_defaults_are_the_parsers():
    """The "default" column of the flag tables (docs/training.md: lst-train; docs/evaluation.md:
    lst-eval, then lst-generate under "Generation") states each parser's default: a literal value,
    `on` / `off`, or `required`. A model flag of lst-train, which defaults to "not given",
    is compared with its configuration field's default. Prose defaults ("preset", a rule) are
    not read."""
    from megatron_lst.evaluation.eval_cli import build_eval_parser
    from megatron_lst.evaluation.generate_cli import build_generate_parser
    from megatron_lst.training.arguments import build_parser as train_parser

    parsers = {"training.md": lambda section: train_parser(),
               "evaluation.md": lambda section: (build_generate_parser() if section == "Generation"
                                                 else build_eval_parser())}
    wrong, checked = [], 0
    for page, parser_of in parsers.items():
        for section, flags, cell in _default_tables((DOCS / page).read_text()):
            actions = {o: a for a in parser_of(section)._actions for o in a.option_strings}
            flags = [f for f in flags if not f.startswith("--no-")]  # a switch's negative form
            values = [v.strip() for v in cell.split(",")] if len(flags) > 1 else [cell]
            if len(values) != len(flags):
                values = [cell] * len(flags)  # one value for every flag of the row
            for flag, value in zip(flags, values, strict=True):
                action = actions[flag]
                default = action.default if action.default is not None else (
                    _model_field_default(flag) if page == "training.md" else None)
                verdict = _documented_default_matches(value, action, default)
                checked += verdict is not None
                if verdict is False:
                    wrong.append(f"docs/{page} {flag}: documented {value!r}, parser has "
                                 f"{'required' if action.required else repr(default)}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 60, f"only {checked} documented defaults could be read"


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_help_defaults_are_the_parsers(project_parsers: list[argparse.ArgumentParser]):
    """A `--help` line that states its default ("(default 512)", "(default: text)") states the
    parser's: a changed default otherwise leaves the help saying the old one."""
    wrong, checked = [], 0
    for parser in project_parsers:
        for sub in _subparsers(parser):
            for action in sub._actions:
                stated = re.search(r"\(default:? ([^;),]+)", action.help or "")
                if not stated or action.default is None or not action.option_strings:
                    continue
                value = stated.group(1).split(":")[0].strip()
                verdict = _documented_default_matches(value, action, action.default)
                checked += verdict is not None
                if verdict is False:
                    wrong.append(f"{sub.prog} {action.option_strings[0]}: help says {value!r}, "
                                 f"parser has {action.default!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 10, f"only {checked} stated defaults could be read"
