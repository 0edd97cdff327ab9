"""`lst-convert`: every subcommand end to end in one process, its printed self-check, and exit
status 1 with the tensor named for a checkpoint it refuses."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lst.checkpoint.cli import main
from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import WEIGHTS_FILENAME, PortableCheckpoint, save_portable
from megatron_lst.models.config import preset
from megatron_lst.models.reference_config import lst_config_from_reference
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.vocab import JointVocab

VERIFIED = r"verify {}: max \|logits before - after\| = \d\.\d{{3}}e[-+]\d+ \(tolerance 1e-05"


def test_reference_to_portable_to_dist_and_back_to_reference(reference_fixtures, tmp_path, capsys):
    portable, dist, portable_again, exported = (tmp_path / name for name in (
        "portable", "dist", "portable_again", "reference"))
    assert main(["import-reference",
                 "--reference-ckpt", str(reference_fixtures / "state_dict_A.safetensors"),
                 "--reference-args", str(reference_fixtures / "config_A.json"),
                 "--output", str(portable)]) == 0
    assert main(["portable-to-dist", "--portable", str(portable), "--save", str(dist)]) == 0
    assert main(["dist-to-portable", "--load", str(dist), "--output", str(portable_again)]) == 0
    assert main(["export-reference", "--portable", str(portable_again), "--output", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "export of the import == original (68 tensors identical)" in out
    for command in ("import-reference", "portable-to-dist", "dist-to-portable", "export-reference"):
        assert re.search(VERIFIED.format(command), out), (command, out)

    original = load_file(str(reference_fixtures / "state_dict_A.safetensors"))
    round_tripped = torch.load(exported / "consolidated.pth", weights_only=True)["model"]
    assert round_tripped.keys() == original.keys()
    assert all(torch.equal(round_tripped[name], original[name]) for name in original)
    # The dist checkpoint keeps lst-train's flags, not the reference's other options: the args
    # written back describe the same model.
    model_args = json.loads((reference_fixtures / "config_A.json").read_text())["model_args"]
    written = json.loads((exported / "params.json").read_text())["model"]
    assert lst_config_from_reference(written) == lst_config_from_reference(model_args)
    vocab = json.loads((portable_again / "lst_config.json").read_text())["vocab"]
    assert vocab["text_size"] == 512 and vocab["size"] == 1020


@pytest.fixture()
def tiny_portable(tmp_path):
    initialize_parallel()
    try:
        config = preset("tiny", JointVocab(text_size=58).size)
        save_portable(tmp_path / "tiny_portable", PortableCheckpoint(
            config=config, state=full_state_dict(build_full_model(config)),
            vocab=JointVocab(text_size=58)))
    finally:
        destroy_parallel()
    return tmp_path / "tiny_portable"


def test_refused_checkpoint_exits_1_naming_the_tensor(tiny_portable, tmp_path, capsys):
    state = load_file(str(tiny_portable / WEIGHTS_FILENAME))
    del state["local_decoder.final_norm.weight"]
    save_file(state, str(tiny_portable / WEIGHTS_FILENAME))
    assert main(["portable-to-dist", "--portable", str(tiny_portable),
                 "--save", str(tmp_path / "dist")]) == 1
    assert "no tensor 'local_decoder.final_norm.weight'" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_save_directory_without_checkpoint_exits_1(tmp_path, capsys):
    assert main(["dist-to-portable", "--load", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    assert f"{tmp_path} holds no complete dist checkpoint" in capsys.readouterr().err


def test_verify_of_a_checkpoint_under_another_name_says_the_name_to_give_it(tmp_path, capsys):
    """It said the directory holds no checkpoint (dist-to-portable converts it)."""
    best = tmp_path / "best"
    best.mkdir()
    for name in (".metadata", "metadata.json", "lst_checkpoint.json"):
        (best / name).write_bytes(b"")
    assert main(["verify", "--load", str(best)]) == 1
    assert (f"{best} is one lst-train checkpoint (it holds lst_checkpoint.json) under another "
            f"name than iter_XXXXXXX" in capsys.readouterr().err)


def import_edited_reference(reference_fixtures, tmp_path, edits: dict,
                            patcher_args: dict | None = None) -> int:
    """`lst-convert import-reference` of the fixture with its model args edited (and, given, its
    data's `patcher_args`), into `tmp_path/portable`; its exit status."""
    model_args = json.loads((reference_fixtures / "config_A.json").read_text())["model_args"]
    params = {"model": {**model_args, **edits}}
    if patcher_args is not None:
        params["data"] = {"patcher_args": patcher_args, "seq_len": 4096}
    (tmp_path / "params.json").write_text(json.dumps(params))
    return main(["import-reference",
                 "--reference-ckpt", str(reference_fixtures / "state_dict_A.safetensors"),
                 "--reference-args", str(tmp_path / "params.json"),
                 "--output", str(tmp_path / "portable")])

def test_reference_args_the_reference_cannot_run_exit_1_naming_the_field(reference_fixtures, tmp_path,
                                                                       capsys):
    assert import_edited_reference(reference_fixtures, tmp_path, {"cross_attn_k": None}) == 1
    assert "reference cross_attn_k=None" in capsys.readouterr().err
    assert not (tmp_path / "portable").exists()


@pytest.mark.parametrize(("patching", "saved"), [
    ({"patching_mode": "static", "patch_size": 6.0}, {"patching_mode": "static", "patch_size": 6}),
    ({"patching_mode": "aligned"}, {"patching_mode": "aligned"}),
    ({"patching_mode": "curriculum"}, {"patching_mode": "static", "patch_size": 4}),
])
def test_converted_reference_keeps_its_patching_for_evaluation(reference_fixtures, tmp_path, patching,
                                                               saved):
    """The evaluation tools patch as the dist checkpoint's flags say: a reference model's static
    patch size reaches them (a mode that needs more flags falls back to static patches of 4)."""
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    assert import_edited_reference(reference_fixtures, tmp_path, patching) == 0
    assert main(["portable-to-dist", "--portable", str(tmp_path / "portable"),
                 "--save", str(tmp_path / "dist")]) == 0
    args = read_checkpoint_metadata(find_latest_checkpoint(tmp_path / "dist"))["args"]
    assert {key: args.get(key) for key in saved} == saved


@pytest.mark.parametrize(("patcher_args", "saved"), [
    # the reference's lst.yaml: model args static 6, its data patched by lst_static 4
    ({"patching_mode": "lst_static", "patch_size": 4}, {"patching_mode": "static", "patch_size": 4}),
    ({"patching_mode": "lst_align", "patch_size": 4}, {"patching_mode": "aligned"}),
    # the curriculum ends static, as our evaluation scores a curriculum model
    ({"patching_mode": "lst_curriculum", "patch_size": 3, "patcher_curr_align_steps": 10,
      "patcher_curr_mixed_steps": 20}, {"patching_mode": "static", "patch_size": 3}),
])
def test_converted_reference_is_evaluated_with_its_data_patcher(reference_fixtures, tmp_path,
                                                                 patcher_args, saved):
    """A BLT params.json keeps the data's patcher under data.patcher_args, which is what the
    model was trained on; the model args' patching_mode and patch_size are not (they were
    read alone, and a model trained on lst_static 4 was evaluated with static patches of 6)."""
    from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    edits = {"patching_mode": "static", "patch_size": 6.0}
    assert import_edited_reference(reference_fixtures, tmp_path, edits, patcher_args) == 0
    assert main(["portable-to-dist", "--portable", str(tmp_path / "portable"),
                 "--save", str(tmp_path / "dist")]) == 0
    args = read_checkpoint_metadata(find_latest_checkpoint(tmp_path / "dist"))["args"]
    assert {key: args.get(key) for key in saved} == saved


def test_a_reference_trained_on_entropy_patches_is_refused_and_nothing_written(
        reference_fixtures, tmp_path, capsys):
    """Its data's entropy patcher is no LST one: the import patched by the model args' static
    6 instead, evaluating the model on patches it was not trained on."""
    assert import_edited_reference(reference_fixtures, tmp_path,
                                   {"patching_mode": "static", "patch_size": 6.0},
                                   {"patching_mode": "entropy"}) == 1
    assert ("reference data.patcher_args patching_mode 'entropy' is no LST patcher"
            in capsys.readouterr().err)
    assert not (tmp_path / "portable").exists()


def test_output_holding_a_checkpoint_is_refused_and_kept(tiny_portable, tmp_path, capsys):
    """A conversion into a directory that holds a converted checkpoint would replace it, half
    on a failure: refused before anything is written."""
    dist, portable = tmp_path / "dist", tmp_path / "portable"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 0
    assert main(["dist-to-portable", "--load", str(dist), "--output", str(portable)]) == 0
    before = {path.name: path.stat().st_mtime_ns for path in portable.iterdir()}
    capsys.readouterr()
    assert main(["dist-to-portable", "--load", str(dist), "--output", str(portable)]) == 1
    assert (f"{portable} already holds ['model.safetensors', 'lst_config.json']; refusing to "
            f"overwrite a checkpoint") in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in portable.iterdir()} == before
    assert main(["dist-to-portable", "--load", str(dist),
                 "--output", str(portable / WEIGHTS_FILENAME)]) == 1  # a file, not a directory
    assert (f"{portable / WEIGHTS_FILENAME} is a file, not a directory; give a directory"
            in capsys.readouterr().err)


def test_a_negative_iteration_is_a_usage_error(tiny_portable, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(tmp_path / "d"),
              "--iteration", "-5"])
    assert usage.value.code == 2
    assert "--iteration: an iteration number is 0 or more, got -5" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("patcher_args", [{"patching_mode": ["lst_static"]}, {"patching_mode": {}},
                                          {"patching_mode": "lst_static", "patch_size": True}])
def test_a_data_patcher_of_another_form_falls_back_to_the_model_args(patcher_args):
    """A params.json is a file from others: a patcher mode that is no string was a TypeError
    (unhashable), and a patch size of true no size."""
    from megatron_lst.checkpoint.convert import reference_patching

    assert reference_patching({"patching_mode": "static", "patch_size": 6.0}, patcher_args) == {
        "patching_mode": "static", "patch_size": 6}


def test_the_data_patcher_survives_export_and_reimport(reference_fixtures, tmp_path):
    """reference (model args static 6, data lst_static 4) -> portable -> dist -> portable ->
    reference: the written params.json keeps the data's patcher, so importing it again patches
    as the model was trained (the export wrote the model args alone)."""
    assert import_edited_reference(reference_fixtures, tmp_path,
                                   {"patching_mode": "static", "patch_size": 6.0},
                                   {"patching_mode": "lst_static", "patch_size": 4}) == 0
    portable_again, exported = tmp_path / "portable_again", tmp_path / "exported"
    assert main(["portable-to-dist", "--portable", str(tmp_path / "portable"),
                 "--save", str(tmp_path / "dist")]) == 0
    assert main(["dist-to-portable", "--load", str(tmp_path / "dist"),
                 "--output", str(portable_again)]) == 0
    assert main(["export-reference", "--portable", str(portable_again),
                 "--output", str(exported)]) == 0
    params = json.loads((exported / "params.json").read_text())
    assert params["data"]["patcher_args"] == {"patching_mode": "lst_static", "patch_size": 4}
    assert main(["import-reference", "--reference-ckpt", str(exported / "consolidated.pth"),
                 "--reference-args", str(exported / "params.json"),
                 "--output", str(tmp_path / "reimported")]) == 0
    training_args = json.loads((tmp_path / "reimported" / "lst_config.json").read_text())["training_args"]
    assert training_args == {"patching_mode": "static", "patch_size": 4}


@pytest.mark.parametrize(("flags", "patcher_args"), [
    ({"patching_mode": "static", "patch_size": 3}, {"patching_mode": "lst_static", "patch_size": 3}),
    ({"patching_mode": "aligned", "patch_size": 4}, {"patching_mode": "lst_align"}),
    ({"patching_mode": "curriculum", "patch_size": 4, "curriculum_tau1": 10, "curriculum_tau2": 30},
     {"patching_mode": "lst_curriculum", "patch_size": 4, "patcher_curr_align_steps": 10,
      "patcher_curr_mixed_steps": 30}),
    ({"patching_mode": "mixed", "patch_size": 5}, {"patching_mode": "lst_static", "patch_size": 5}),
    ({"patching_mode": "none", "patch_size": 4}, None),
    (None, None),
])
def test_our_patching_flags_as_the_reference_data_patcher(flags, patcher_args):
    from megatron_lst.checkpoint.convert import reference_patcher_args, reference_patching

    assert reference_patcher_args(flags) == patcher_args
    if patcher_args is not None:  # read back as our evaluation patches
        expected = ({"patching_mode": "aligned"} if flags["patching_mode"] == "aligned" else
                    {"patching_mode": "static", "patch_size": flags["patch_size"]})
        assert reference_patching({}, patcher_args) == expected


def test_a_converted_checkpoint_asks_for_its_tokenizer_by_size(tiny_portable, tmp_path, capsys):
    """A dist checkpoint from portable-to-dist names no tokenizer; lst-eval said it 'was trained
    without --tokenizer-model', which a converted checkpoint never was."""
    from megatron_lst.evaluation.eval_cli import eval_main

    dist, items = tmp_path / "dist", tmp_path / "items.jsonl"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 0
    items.write_text(json.dumps({"id": 0, "context": {"text": "a b"}, "label": 0,
                                 "endings": [{"text": "c"}, {"text": "d"}]}) + "\n")
    capsys.readouterr()
    assert eval_main(["--load", str(dist), "--items", str(items)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "names no tokenizer" in last and "lst-convert" in last
    assert "pass --tokenizer-model with the tokenizer of its vocabulary (58 text pieces)" in last


def test_a_portable_checkpoint_without_vocabulary_is_refused_for_dist(tiny_portable, tmp_path,
                                                                      capsys):
    """Such a dist checkpoint was written, and then refused by dist-to-portable and lst-eval as
    "not written by lst-train or lst-convert"; the layout the error asks for converts."""
    config_path = tiny_portable / "lst_config.json"
    record = json.loads(config_path.read_text())
    record["vocab"] = None
    config_path.write_text(json.dumps(record))
    dist = tmp_path / "dist"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 1
    err = capsys.readouterr().err
    assert f"{config_path} records no vocabulary ('vocab' is null or absent)" in err
    assert "with T + U + 6 = its vocab_size 566" in err
    assert not dist.exists()

    record["vocab"] = {"text_size": 58, "num_units": 502, "pad_id": 0, "bos_id": 1, "eos_id": 2}
    config_path.write_text(json.dumps(record))
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 0
    assert main(["dist-to-portable", "--load", str(dist), "--output", str(tmp_path / "back")]) == 0


@pytest.mark.parametrize("under", ["", "sub"], ids=["file", "under-a-file"])
def test_a_save_that_is_a_file_is_refused_before_converting(tiny_portable, tmp_path, capsys,
                                                            under):
    """It failed after the whole conversion, with the trainer's "resume with --load FILE"."""
    taken = tmp_path / "taken"
    taken.write_text("notes\n")
    save = taken / under if under else taken
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(save)]) == 1
    assert (f"lst-convert portable-to-dist: {save}: {taken} is a file, not a directory; give a "
            f"directory for the converted checkpoint (created if missing)\n"
            == capsys.readouterr().err)
    assert taken.read_text() == "notes\n"


def test_a_save_whose_pointer_is_a_directory_is_refused_before_converting(tiny_portable, tmp_path,
                                                                         capsys):
    """lst-train refuses such a --save up front; portable-to-dist wrote the checkpoint, then
    failed replacing the pointer (exit 1), leaving iter_0000000 behind."""
    save = tmp_path / "save"
    (save / "latest_checkpointed_iteration.txt").mkdir(parents=True)
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(save)]) == 1
    assert capsys.readouterr().err.startswith(
        f"lst-convert portable-to-dist: {save / 'latest_checkpointed_iteration.txt'} is a "
        f"directory: lst-train writes the iteration of the newest checkpoint into a file")
    assert sorted(entry.name for entry in save.iterdir()) == ["latest_checkpointed_iteration.txt"]


def test_an_output_inside_a_dist_checkpoint_is_refused_and_the_checkpoint_still_verifies(
        tiny_portable, tmp_path, capsys):
    """dist-to-portable --output SAVE/iter_0000000 wrote the portable files into the checkpoint,
    whose manifest does not list them: it then failed verification, and nothing loaded it."""
    dist = tmp_path / "dist"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 0
    iteration = dist / "iter_0000000"
    capsys.readouterr()
    assert main(["dist-to-portable", "--load", str(dist), "--output", str(iteration)]) == 1
    assert (f"{iteration} is a checkpoint's own directory (it holds ['.metadata', "
            f"'lst_checkpoint.json', 'lst_manifest.json']); files written into it would make that "
            f"checkpoint fail verification") in capsys.readouterr().err
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(iteration),
                 "--iteration", "5"]) == 1
    assert f"{iteration} is a checkpoint's own directory" in capsys.readouterr().err
    assert main(["verify", "--load", str(dist)]) == 0


def test_an_output_in_the_save_directory_converted_is_refused(tiny_portable, tmp_path, capsys):
    """dist-to-portable --output SAVE (or a folder in it) mixed the portable checkpoint into the
    save directory of the dist one, to be copied, shared and deleted with it."""
    dist = tmp_path / "dist"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(dist)]) == 0
    before = sorted(path.relative_to(dist) for path in dist.rglob("*"))
    for load in (dist, dist / "iter_0000000"):
        for output in (dist, dist / "portable", dist / "iter_0000000" / "portable"):
            capsys.readouterr()
            assert main(["dist-to-portable", "--load", str(load), "--output", str(output)]) == 1
            assert (f"--output {output} is inside the --load checkpoint directory {dist}; the "
                    f"converted checkpoint would be mixed into the one it is converted from. "
                    f"Give --output a directory outside {dist}") in capsys.readouterr().err
    assert sorted(path.relative_to(dist) for path in dist.rglob("*")) == before


def test_a_save_or_export_inside_its_portable_input_is_refused(tiny_portable, capsys):
    """A dist checkpoint (pickles) saved inside a portable one was shared with it as safe."""
    before = sorted(tiny_portable.iterdir())
    inside = tiny_portable / "dist"
    assert main(["portable-to-dist", "--portable", str(tiny_portable), "--save", str(inside)]) == 1
    assert (f"--save {inside} is inside the --portable checkpoint directory "
            f"{tiny_portable.resolve()}") in capsys.readouterr().err
    assert main(["export-reference", "--portable", str(tiny_portable),
                 "--output", str(inside)]) == 1
    assert (f"--output {inside} is inside the --portable checkpoint directory"
            in capsys.readouterr().err)
    assert sorted(tiny_portable.iterdir()) == before


def test_an_export_into_its_portable_input_is_refused(tiny_portable, capsys):
    """The directory then held two checkpoints, which import-reference refused as ambiguous."""
    assert main(["export-reference", "--portable", str(tiny_portable),
                 "--output", str(tiny_portable)]) == 1
    assert (f"{tiny_portable} is a checkpoint's own directory (it holds ['model.safetensors', "
            f"'lst_config.json'])") in capsys.readouterr().err
    assert not (tiny_portable / "consolidated.pth").exists()
