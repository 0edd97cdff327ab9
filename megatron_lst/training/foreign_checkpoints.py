"""What a `--load` path that is no `lst-train --save` directory holds, when it is a checkpoint in
another of the formats `lst-convert` reads, and the commands that make a training checkpoint of it;
or when it is one lst-train checkpoint under another name than `iter_XXXXXXX` (copied as `best/`),
by which loading finds checkpoints.

Recognised from file and directory names only (nothing is read):

    renamed lst-train checkpoint  DIR/lst_checkpoint.json, DIR not named iter_XXXXXXX
    portable checkpoint           DIR/model.safetensors + DIR/lst_config.json
    reference step directory      DIR/.metadata (torch.distributed.checkpoint), DIR/consolidated/
    reference weights             a .pth / .pt / .safetensors file, or a directory holding one
    reference checkpoints folder  DIR/0000001000/ ... (its step directories, 10 digits)
"""

from __future__ import annotations

import re
from pathlib import Path

_PORTABLE_FILES = ("model.safetensors", "lst_config.json")
_DCP_METADATA = ".metadata"
_CONSOLIDATED_FOLDER = "consolidated"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
_REFERENCE_STEP = re.compile(r"^\d{10}$")
_LST_TRAIN_RECORD = "lst_checkpoint.json"
_LST_TRAIN_NAME = re.compile(r"^iter_\d{7,}$")


def foreign_checkpoint_advice(path: str | Path) -> str | None:
    """A sentence saying which other checkpoint format `path` holds and how to train from it
    (`lst-convert`, then `--load ... --finetune`); None when it looks like none of them."""
    path = Path(path)
    renamed = renamed_checkpoint_advice(path)
    if renamed is not None:  # before the reference's: it holds a .metadata too
        return renamed
    to_dist = ("`lst-convert portable-to-dist --portable {portable} --save NEW_SAVE_DIR`, and "
               "train from it with --load NEW_SAVE_DIR --finetune")
    if path.is_dir() and all((path / name).is_file() for name in _PORTABLE_FILES):
        return (f"{path} is a portable checkpoint ({' + '.join(_PORTABLE_FILES)}), which holds "
                f"weights only; make a training checkpoint of it with "
                + to_dist.format(portable=path))
    reference = _reference_checkpoint(path)
    if reference is None:
        return None
    what, target = reference
    return (f"{path} looks like a checkpoint of the reference implementation ({what}); import it "
            f"with `lst-convert import-reference --reference-ckpt {target} --output IMPORTED` "
            f"(give --reference-args params.json where none lies beside it), then "
            + to_dist.format(portable="IMPORTED"))


def renamed_checkpoint_advice(path: str | Path) -> str | None:
    """A sentence for a `path` that is one lst-train checkpoint under another name than
    `iter_XXXXXXX` (which `--load` takes as a save directory, finding no checkpoint in it) saying
    how to load it; None for any other path."""
    path = Path(path)
    if not (path / _LST_TRAIN_RECORD).is_file() or _LST_TRAIN_NAME.match(path.name):
        return None
    return (f"{path} is one lst-train checkpoint (it holds {_LST_TRAIN_RECORD}) under another "
            f"name than iter_XXXXXXX, by which --load finds checkpoints: copy or rename it to "
            f"iter_ and its iteration in 7 digits ('iteration' in its {_LST_TRAIN_RECORD}, e.g. "
            f"iter_0000100) inside a directory of its own, and pass that directory to --load")


def _reference_checkpoint(path: Path) -> tuple[str, Path] | None:
    """(what `path` holds, the path to import) for a reference checkpoint, else None."""
    if path.is_file():
        return (f"a {path.suffix} weights file", path) if path.suffix in _WEIGHT_SUFFIXES else None
    if not path.is_dir():
        return None
    if (path / _DCP_METADATA).is_file():
        return "a torch.distributed.checkpoint step directory", path
    if (path / _CONSOLIDATED_FOLDER).is_dir():
        return f"a step directory with {_CONSOLIDATED_FOLDER}/", path / _CONSOLIDATED_FOLDER
    weights = sorted(entry.name for entry in path.iterdir()
                     if entry.is_file() and entry.suffix in _WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return f"the weights file {weights[0]}", path / weights[0]
    if weights:
        chosen = "consolidated.pth" if "consolidated.pth" in weights else "ONE_OF_THEM"
        return f"the weights files {', '.join(weights)}", path / chosen
    steps = sorted(entry.name for entry in path.iterdir()
                   if entry.is_dir() and _REFERENCE_STEP.match(entry.name))
    if steps:
        return f"step directories {steps[0]} ... {steps[-1]}", path / steps[-1]
    return None
