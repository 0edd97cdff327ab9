"""`lst-eval`/`lst-generate --load` given a checkpoint of another form than lst-train's: the error
names the form and the `lst-convert` commands that turn it into one they load (it said only "holds
no complete checkpoint ... pass the --save directory of a run")."""

import pytest

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.evaluation.loading import load_inference_model

PORTABLE_TO_DIST = "`lst-convert portable-to-dist --portable {} --save NEW_DIR`, then pass --load NEW_DIR"


def make(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
        else:
            path.write_bytes(b"")


@pytest.mark.parametrize("names, load", [
    (["model.safetensors", "lst_config.json"], ""),
    (["model.safetensors", "lst_config.json"], "model.safetensors"),
], ids=["directory", "weights-file"])
def test_a_portable_checkpoint_is_named_with_its_conversion(tmp_path, names, load):
    make(tmp_path, names)
    with pytest.raises(CheckpointError) as refused:
        load_inference_model(tmp_path / load)
    assert str(refused.value) == (
        f"{tmp_path / load} is a portable checkpoint (model.safetensors + lst_config.json), not a "
        f"dist checkpoint of lst-train: convert it with {PORTABLE_TO_DIST.format(tmp_path)}")


@pytest.mark.parametrize("names, load", [
    (["consolidated.pth", "params.json"], ""),
    (["consolidated/consolidated.pth", "consolidated/params.json"], ""),
    ([".metadata", "__0_0.distcp", "params.json"], ""),
    (["consolidated.pth"], "consolidated.pth"),
], ids=["export", "step-directory-consolidated", "step-directory", "pth-file"])
def test_a_reference_checkpoint_is_named_with_its_import(tmp_path, names, load):
    make(tmp_path, names)
    with pytest.raises(CheckpointError) as refused:
        load_inference_model(tmp_path / load)
    assert str(refused.value) == (
        f"{tmp_path / load} holds a checkpoint of the reference implementation, not a dist "
        f"checkpoint of lst-train: import it with `lst-convert import-reference --reference-ckpt "
        f"{tmp_path / load} --output PORTABLE_DIR`, convert that with "
        f"{PORTABLE_TO_DIST.format('PORTABLE_DIR')}")


def test_a_directory_of_no_checkpoint_asks_for_a_save_directory(tmp_path):
    make(tmp_path, ["notes.txt"])
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint \(no iter_XXXXXXX "
                                              r"with lst_checkpoint.json\); pass the --save"):
        load_inference_model(tmp_path)


def test_a_checkpoint_under_another_name_is_told_the_name_to_have(tmp_path):
    """An lst-train checkpoint copied as `best/` holds a .metadata too: it was taken for the
    reference's step directory, with the advice to import it with import-reference."""
    make(tmp_path, ["best/.metadata", "best/__0_0.distcp", "best/metadata.json",
                    "best/lst_checkpoint.json"])
    with pytest.raises(CheckpointError) as refused:
        load_inference_model(tmp_path / "best")
    assert str(refused.value).startswith(
        f"{tmp_path / 'best'} is one lst-train checkpoint (it holds lst_checkpoint.json) under "
        f"another name than iter_XXXXXXX, by which --load finds checkpoints: copy or rename it")
