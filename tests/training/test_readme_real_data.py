"""README "Using it on real data", run as written on a small real sample.

The sample is the reference's MLS chunk (10 utterances) where the shared fixtures are present, a
generated one in the same format otherwise. The README's commands run through bash in a scratch
directory holding the files they name (`words.txt`, `mls.*.on_the_fly`, `text.jsonl`,
`sStoryCloze.jsonl`), with only these changes, each asserted to match the README's text (so the
test follows the README when it changes):
- `--vocab-size 32000` becomes the largest size the sample allows, as the README's size fails
  to say (a 10-utterance sample cannot give 32000 pieces);
- the launch script gets the documented environment knobs `GPUS_PER_NODE=1` and a `CONFIG` that
  is `examples/configs/tiny_cpu_lst.yaml` cut to 2 iterations;
- `sbatch` (no SLURM here) and `lst-convert import-reference` (no reference checkpoint) are not
  run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint.conftest import REFERENCE_FIXTURES

REPO = Path(__file__).resolve().parents[2]
SEP = "<LST MODE SEP>"
SAMPLE_WORDS = ("in the pleasant time of year when the birds sing and the days grow long she "
                "walked home").split()
# No SLURM here, and no reference checkpoint to import (that path, import -> portable-to-dist ->
# train, eval, generate, is tests/checkpoint/test_any_reference_model_trains.py).
NOT_RUN = ("sbatch ", "lst-convert import-reference ", "lst-convert portable-to-dist --portable imported")

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The bash commands of the README's "Using it on real data" block, continuation lines
    joined, comments dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using it on real data"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", 8)]
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def _utterances(sample: Path) -> list[list[tuple[str, list[int]]]]:
    """(word or [SIL], units) segments of each line of a reference JSONL file."""
    utterances = []
    for line in sample.read_text().splitlines():
        parts = json.loads(line)["interleaved"].split(SEP)[1:]
        words = [p.split(" ", 1)[1].strip() for p in parts[::2]]
        units = [[int(u) for u in p.split()[1:]] for p in parts[1::2]]
        utterances.append(list(zip(words, units, strict=True)))
    return utterances


def _generated_sample(path: Path, lines: int = 10) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for n in range(lines):
            parts = []
            for _ in range(int(rng.integers(30, 50))):
                word = "[SIL]" if rng.random() < 0.3 else str(rng.choice(SAMPLE_WORDS))
                units = rng.integers(0, 500, int(rng.integers(1, 9)))
                parts.append(f"{SEP}TEXT {word} {SEP}HUBERT {' '.join(map(str, units))}")
            f.write(json.dumps({"file_id": f"generated/{n}", "interleaved": " ".join(parts)})
                    + "\n")
    return path


def _part(segments: list[tuple[str, list[int]]]) -> dict:
    words = [w for w, _ in segments if w != "[SIL]"]
    return {"text": " ".join(words), "units": [u for _, units in segments for u in units],
            "segments": [[w, len(units)] for w, units in segments]}


def _stage_inputs(directory: Path) -> None:
    """The files the README's commands name, made from the sample."""
    reference = REFERENCE_FIXTURES / "mls.chunk.00.on_the_fly"
    sample = directory / "mls.chunk.00.on_the_fly"
    if reference.is_file():
        sample.write_bytes(reference.read_bytes())
    else:
        _generated_sample(sample)
    utterances = _utterances(sample)
    texts = [" ".join(w for w, _ in u if w != "[SIL]") for u in utterances]
    (directory / "words.txt").write_text("".join(t + "\n" for t in texts))
    (directory / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    items = []
    for i, utterance in enumerate(utterances):  # own ending vs the next utterance's ending
        other = utterances[(i + 1) % len(utterances)]
        cut, other_cut = len(utterance) // 2, len(other) // 2
        items.append({"id": f"sample-{i}", "context": _part(utterance[:cut]),
                      "endings": [_part(utterance[cut:]), _part(other[other_cut:])], "label": 0})
    (directory / "sStoryCloze.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    config = (REPO / "examples/configs/tiny_cpu_lst.yaml").read_text()
    for key, value in (("train-iters", 2), ("save-interval", 2), ("eval-interval", 2),
                       ("log-interval", 1), ("lr-warmup-iters", 1), ("eval-iters", 1)):
        config, count = re.subn(rf"^{key}: .*$", f"{key}: {value}", config, flags=re.M)
        assert count == 1, key
    (directory / "tiny.yaml").write_text(config)


def _run(command: str, directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=300)


def test_readme_real_data_steps(tmp_path):
    commands = readme_commands()
    assert commands[0].startswith("python tools/train_tokenizer.py ") and "--vocab-size 32000" in \
        commands[0]
    _stage_inputs(tmp_path)
    # The README runs from the repository root (`tools/...`, `examples/...`, and the launch
    # script's `pretrain_lst.py`): link them here.
    for name in ("tools", "examples", "pretrain_lst.py"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, GPUS_PER_NODE="1", CONFIG=str(tmp_path / "tiny.yaml"),
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))

    too_large = _run(commands[0], tmp_path, env)
    assert too_large.returncode != 0
    largest = re.search(r"--vocab-size 32000 is larger than words.txt allows: .* at most (\d+) "
                        r"pieces", too_large.stderr)
    assert largest, too_large.stderr

    ran = []
    for command in commands:
        if command.startswith(NOT_RUN):
            continue
        command = command.replace("--vocab-size 32000", f"--vocab-size {largest[1]}")
        result = _run(command, tmp_path, env)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append((command, result.stdout))
    assert [c.split()[0] for c, _ in ran] == ["python"] * 4 + ["bash", "lst-eval", "lst-generate",
                                                                "lst-convert"]

    outputs = dict((c.split()[0] if c.split()[0] != "python" else c.split()[1], out)
                   for c, out in ran)
    assert re.search(r"sStoryCloze.jsonl S->S: accuracy [01]\.\d+", outputs["lst-eval"])
    assert re.search(r"sStoryCloze.jsonl T->T: accuracy [01]\.\d+", outputs["lst-eval"])
    generated = json.loads(outputs["lst-generate"].strip().splitlines()[-1])
    assert generated["units"], "--continue-in speech generated no units"
    assert (tmp_path / "ckpt/lst/latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "lst_portable").exists()
