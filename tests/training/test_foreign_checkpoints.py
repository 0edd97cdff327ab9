"""`--load` naming a checkpoint of another format that `lst-convert` reads (portable, the
reference implementation's) says which it is and the commands that make a training checkpoint
of it; it used to say only that the directory holds no lst-train checkpoint."""

import pytest

from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.foreign_checkpoints import (
    foreign_checkpoint_advice,
    renamed_checkpoint_advice,
)
from training.training_cases import tiny_flags

IMPORT = "`lst-convert import-reference --reference-ckpt {} --output IMPORTED`"
TO_DIST = ("`lst-convert portable-to-dist --portable {} --save NEW_SAVE_DIR`, and train from it "
           "with --load NEW_SAVE_DIR --finetune")


def _files(root, *names):
    """Empty files, and directories where a name ends with a slash, under `root`."""
    for name in names:
        if name.endswith("/"):
            (root / name).mkdir(parents=True)
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"")
    return root


@pytest.mark.parametrize("names, load, what, target", [
    (["step/.metadata", "step/__0_0.distcp", "step/params.json"], "step",
     "a torch.distributed.checkpoint step directory", "step"),
    (["step/consolidated/consolidated.pth"], "step", "a step directory with consolidated/",
     "step/consolidated"),
    (["step/consolidated/consolidated.pth"], "step/consolidated",
     "the weights file consolidated.pth", "step/consolidated/consolidated.pth"),
    (["w/consolidated.pth", "w/other.pt"], "w", "the weights files consolidated.pth, other.pt",
     "w/consolidated.pth"),
    (["run/checkpoints/0000001000/", "run/checkpoints/0000002000/"], "run/checkpoints",
     "step directories 0000001000 ... 0000002000", "run/checkpoints/0000002000"),
])
def test_reference_checkpoints_are_named_with_the_import_commands(tmp_path, names, load, what,
                                                                  target):
    _files(tmp_path, *names)
    advice = foreign_checkpoint_advice(tmp_path / load)
    assert advice.startswith(f"{tmp_path / load} looks like a checkpoint of the reference "
                             f"implementation ({what}); import it with ")
    assert IMPORT.format(tmp_path / target) in advice
    assert advice.endswith(TO_DIST.format("IMPORTED"))


def test_a_portable_checkpoint_is_named_with_portable_to_dist(tmp_path):
    portable = _files(tmp_path / "p", "model.safetensors", "lst_config.json")
    assert foreign_checkpoint_advice(portable) == (
        f"{portable} is a portable checkpoint (model.safetensors + lst_config.json), which holds "
        f"weights only; make a training checkpoint of it with " + TO_DIST.format(portable))


@pytest.mark.parametrize("load", ["best", "iter_100"])
def test_an_lst_train_checkpoint_under_another_name_is_told_the_name_to_have(tmp_path, load):
    """Its .metadata made it "a checkpoint of the reference implementation" to import."""
    checkpoint = _files(tmp_path / load, ".metadata", "__0_0.distcp", "metadata.json",
                        "lst_checkpoint.json")
    assert foreign_checkpoint_advice(checkpoint) == (
        f"{checkpoint} is one lst-train checkpoint (it holds lst_checkpoint.json) under another "
        f"name than iter_XXXXXXX, by which --load finds checkpoints: copy or rename it to iter_ "
        f"and its iteration in 7 digits ('iteration' in its lst_checkpoint.json, e.g. "
        f"iter_0000100) inside a directory of its own, and pass that directory to --load")
    assert renamed_checkpoint_advice(checkpoint.rename(tmp_path / "iter_0000100")) is None


@pytest.mark.parametrize("names, load", [
    (["empty/"], "empty"), (["notes.txt"], "notes.txt"), (["d/notes.txt"], "d"), ([], "missing")])
def test_anything_else_gets_no_advice(tmp_path, names, load):
    _files(tmp_path, *names)
    assert foreign_checkpoint_advice(tmp_path / load) is None


@pytest.mark.parametrize("names, load, says", [
    (["p/model.safetensors", "p/lst_config.json"], "p",
     "holds no complete checkpoint (no iter_XXXXXXX directory); point --load at a directory "
     "written by lst-train --save. {root}/p is a portable checkpoint"),
    (["c/consolidated.pth"], "c/consolidated.pth",
     "{root}/c/consolidated.pth is a file, not a directory; point --load at a --save directory, "
     "or one iter_XXXXXXX directory in it. {root}/c/consolidated.pth looks like a checkpoint of "
     "the reference implementation (a .pth weights file)"),
])
def test_lst_train_load_names_the_format_and_the_commands(tmp_path, names, load, says):
    _files(tmp_path, *names)
    flags = tiny_flags(["x"]) + ["--train-iters", "4", "--load", str(tmp_path / load)]
    with pytest.raises(ArgumentError) as refused:
        validate_args(parse_args(flags), 1)
    assert says.format(root=tmp_path) in str(refused.value)
    assert "--load NEW_SAVE_DIR --finetune" in str(refused.value)
