"""The reference implementation's checkpoint files as its training writes them, and crafted ones.

Its FSDP training saves each step as a torch.distributed.checkpoint directory (`0000001000/` with
`.metadata`, `__{rank}_0.distcp`, `params.json`, `train_state_*.json`); its `consolidate` command
turns one into `consolidated/consolidated.pth`. `lst-convert import-reference` reads every form
(the optimizer state never unpickled), finds the params.json beside it, and refuses damaged,
crafted or mismatched files naming the file or tensor, writing nothing. Weights are random, in
the reference's names and shapes (`test_reference_configurations`).
"""

import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed.harness import run_distributed
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpoint.reference_oracle import REFERENCE_PATCHER_FIELDS
from checkpoint.test_reference_configurations import random_reference_state, reference_args
from megatron_lst.checkpoint import convert
from megatron_lst.checkpoint.cli import main
from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import (
    WEIGHTS_FILENAME,
    PortableCheckpoint,
    load_portable,
    save_portable,
)
from megatron_lst.checkpoint.reference_files import (
    locate_reference_checkpoint,
    read_reference_state_dict,
    reference_params_beside,
)
from megatron_lst.checkpoint.verify import VerificationError
from megatron_lst.models.config import preset
from megatron_lst.models.reference_config import ReferenceImportError
from megatron_lst.models.reference_fields import REFERENCE_MODEL_FIELDS
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.vocab import JointVocab

MODEL_ARGS = reference_args("base")
NUM_UNITS = "10"  # of the configurations' 40-id vocabulary
WORKER = Path(__file__).resolve().parent / "reference_fsdp_worker.py"
# The whole run config the reference's CheckpointManager writes as params.json (TrainArgs).
PARAMS = {"name": "lst_static", "dump_dir": "/runs/lst", "seed": 777, "steps": 24033,
          "model": MODEL_ARGS,
          "data": {"seq_len": 64, "tokenizer_args": {"name": "lst", "init_kwargs": {}},
                   "patcher_args": {"patching_mode": "lst_static", "patch_size": 4}},
          "distributed": {"fsdp_type": "full_shard", "model_dtype": "bf16"},
          "checkpoint": {"dump": {"every": 500, "keep": 3}}}

UNPICKLED: list[str] = []


def _record_unpickling(what: str) -> str:
    UNPICKLED.append(what)
    return what


class Tripwire:
    """Unpickling it calls `_record_unpickling`: a stand-in for a pickle that runs code."""

    def __reduce__(self):
        return _record_unpickling, ("tripwire",)


@pytest.fixture()
def state() -> dict[str, torch.Tensor]:
    UNPICKLED.clear()
    return random_reference_state(MODEL_ARGS, seed=3)


def save_training_step(dump: Path, state: dict[str, torch.Tensor], step: int = 1000,
                       optim_extra: dict | None = None) -> Path:
    """One step directory as the reference's `CheckpointManager.save` writes it (one rank)."""
    directory = dump / f"{step:010d}"
    directory.mkdir(parents=True)
    optim = {"state": {name: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(t)}
                       for name, t in state.items()},
             "param_groups": [{"lr": 4e-4, "betas": (0.9, 0.95), "params": sorted(state)}],
             **(optim_extra or {})}
    with warnings.catch_warnings():  # "no process group: saving in one process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state, "optim": optim}, checkpoint_id=directory)
    (directory / "params.json").write_text(json.dumps(PARAMS))
    (directory / "train_state_00000.json").write_text(json.dumps({"step": step, "acc_step": 0}))
    return directory


def consolidate(step: Path) -> Path:
    """What the reference's `python -m lst.checkpoint consolidate STEP_DIR` writes."""
    folder = step / "consolidated"
    folder.mkdir()
    dcp_to_torch_save(step, folder / "consolidated.pth")
    shutil.copy(step / "params.json", folder / "params.json")
    return folder


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def test_step_directory_reads_as_its_weights_without_unpickling_the_optimizer(tmp_path, state):
    step = save_training_step(tmp_path, state, optim_extra={"scheduler": Tripwire()})
    for path in (step, step / ".metadata", step / "__0_0.distcp"):
        assert_same_tensors(read_reference_state_dict(path), state)
    assert UNPICKLED == []  # the optimizer's pickled objects were never loaded


def test_consolidated_checkpoint_reads_as_its_step_directory(tmp_path, state):
    folder = consolidate(save_training_step(tmp_path, state))
    for path in (folder, folder / "consolidated.pth"):
        assert_same_tensors(read_reference_state_dict(path), state)


@pytest.mark.distributed
@pytest.mark.slow
def test_rows_sharded_over_ranks_read_as_the_full_tensors(tmp_path, state):
    save_file(state, str(tmp_path / "state.safetensors"))
    step = tmp_path / "0000000500"
    rows = run_distributed(WORKER, 2, ["--state", tmp_path / "state.safetensors", "--save", step])
    first = state[sorted(state)[0]]
    assert rows == [first.shape[0] // 2, first.shape[0] - first.shape[0] // 2]
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in step.iterdir()}
    assert_same_tensors(read_reference_state_dict(step), state)


def test_import_of_a_step_directory_uses_its_params_json_and_exports_back(tmp_path, state, capsys):
    step = save_training_step(tmp_path / "checkpoints", state)
    assert main(["import-reference", "--reference-ckpt", str(step),
                 "--output", str(tmp_path / "portable"), "--num-units", NUM_UNITS]) == 0
    out = capsys.readouterr().out
    assert (f"import-reference: {step} (torch.distributed.checkpoint), model args "
            f"{step / 'params.json'}") in out
    assert "export of the import == original (83 tensors identical)" in out
    imported = load_portable(tmp_path / "portable")
    assert imported.reference_model_args == MODEL_ARGS
    assert imported.training_args == {"patching_mode": "static", "patch_size": 4}
    assert main(["export-reference", "--portable", str(tmp_path / "portable"),
                 "--output", str(tmp_path / "exported")]) == 0
    written = torch.load(tmp_path / "exported" / "consolidated.pth", weights_only=True)
    assert list(written) == ["model"]  # what the reference's loader reads: st_dict["model"]
    assert_same_tensors(written["model"], state)
    # --reference-args may name the directory holding params.json
    consolidated = consolidate(step)
    assert main(["import-reference", "--reference-ckpt", str(consolidated / "consolidated.pth"),
                 "--reference-args", str(step), "--output", str(tmp_path / "again"),
                 "--num-units", NUM_UNITS]) == 0
    assert f"model args {step / 'params.json'}" in capsys.readouterr().out
    assert_same_tensors(load_file(str(tmp_path / "again" / WEIGHTS_FILENAME)),
                        load_file(str(tmp_path / "portable" / WEIGHTS_FILENAME)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_round_trips_in_its_dtype(tmp_path, state, dtype):
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    (tmp_path / "ref").mkdir()
    torch.save({"model": state}, tmp_path / "ref" / "consolidated.pth")
    (tmp_path / "ref" / "params.json").write_text(json.dumps(PARAMS))
    for source, output in (("ref", "portable"), ("exported", "portable_again")):
        if output == "portable_again":
            assert main(["export-reference", "--portable", str(tmp_path / "portable"),
                         "--output", str(tmp_path / "exported")]) == 0
        assert main(["import-reference", "--reference-ckpt", str(tmp_path / source),
                     "--output", str(tmp_path / output), "--num-units", NUM_UNITS]) == 0
    assert_same_tensors(read_reference_state_dict(tmp_path / "exported"), state)
    first = load_file(str(tmp_path / "portable" / WEIGHTS_FILENAME))
    assert {t.dtype for t in first.values()} == {dtype}
    assert_same_tensors(load_file(str(tmp_path / "portable_again" / WEIGHTS_FILENAME)), first)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "model.", "module._orig_mod."])
def test_wrapper_prefixes_are_removed(tmp_path, state, prefix):
    torch.save({prefix + name: tensor for name, tensor in state.items()}, tmp_path / "c.pth")
    assert_same_tensors(read_reference_state_dict(tmp_path / "c.pth"), state)


def test_activation_checkpoint_wrappers_inside_names_are_removed(tmp_path, state):
    wrapped = {name.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): tensor
               for name, tensor in state.items()}
    assert wrapped.keys() != state.keys()
    torch.save({"model": wrapped}, tmp_path / "c.pth")
    assert_same_tensors(read_reference_state_dict(tmp_path / "c.pth"), state)


def test_one_tensor_under_two_wrapper_prefixes_is_refused(tmp_path, state):
    name = sorted(state)[0]
    torch.save({**state, f"_orig_mod.{name}": state[name]}, tmp_path / "c.pth")
    with pytest.raises(ReferenceImportError, match=rf"the same tensor '{name}' under two wrapper"):
        read_reference_state_dict(tmp_path / "c.pth")


def _steps(tmp_path: Path, state) -> Path:
    for step in (1000, 2000):
        save_training_step(tmp_path / "dump", state, step)
    return tmp_path / "dump"


def _two_files(tmp_path: Path, state) -> Path:
    for name in ("consolidated.pth", "other.pth"):
        torch.save({"model": state}, tmp_path / name)
    return tmp_path


def _dcp_and_file(tmp_path: Path, state) -> Path:
    step = save_training_step(tmp_path, state)
    torch.save({"model": state}, step / "consolidated.pth")
    return step


def _unfinished_save(tmp_path: Path, state) -> Path:
    step = save_training_step(tmp_path, state)
    (step / ".metadata").unlink()
    return step


@pytest.mark.parametrize(("make", "message"), [
    (_steps, r"checkpoints of steps \[1000, 2000\]; pass one step's directory, e\.g\. "
             r"--reference-ckpt .*dump/0000002000 \(the latest\)"),
    (_two_files, r"holds 2 checkpoint files \['consolidated\.pth', 'other\.pth'\]; pass the one "
                 r"to import, e\.g\. --reference-ckpt .*consolidated\.pth"),
    (_dcp_and_file, r"holds two checkpoints, a torch\.distributed\.checkpoint .* and "
                    r"\['consolidated\.pth'\]; pass the one to import"),
    (_unfinished_save, r"holds \.distcp files but no \.metadata.*the save did not finish"),
    (lambda tmp_path, state: tmp_path, r"holds no reference checkpoint"),
    (lambda tmp_path, state: tmp_path / "absent", r"reference checkpoint .*absent does not exist"),
])
def test_a_path_holding_no_or_several_checkpoints_is_refused_naming_them(tmp_path, state, make,
                                                                         message):
    with pytest.raises(ReferenceImportError, match=message):
        locate_reference_checkpoint(make(tmp_path, state))


def test_a_checkpoint_without_params_json_asks_for_the_model_args(tmp_path, state, capsys):
    torch.save({"model": state}, tmp_path / "consolidated.pth")
    with pytest.raises(ReferenceImportError, match=r"no params\.json beside .*--reference-args"):
        reference_params_beside(tmp_path / "consolidated.pth")
    assert main(["import-reference", "--reference-ckpt", str(tmp_path / "consolidated.pth"),
                 "--output", str(tmp_path / "out")]) == 1
    assert "pass the run's model args with --reference-args" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _write(content: bytes):
    return lambda path, state: path.write_bytes(content)


def _saved(obj):
    def write(path, state):
        torch.save(obj(state) if callable(obj) else obj, path)
    return write


def _truncated(path: Path, state) -> None:
    torch.save({"model": state}, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _with(change):
    def write(path, state):
        state = dict(state)
        name = sorted(state)[0]
        state[name] = change(state[name])
        torch.save({"model": state}, path)
    return write


def _every(change):
    def write(path, state):
        torch.save({"model": {name: change(tensor) for name, tensor in state.items()}}, path)
    return write


def _nan(tensor):
    tensor = tensor.clone()
    tensor[0, 0] = float("inf")
    tensor[1, 1] = float("nan")
    return tensor


@pytest.mark.parametrize(("write", "message"), [
    (_write(b""), r"the file is empty"),
    (_write(b"not a checkpoint"), r"truncated, damaged or not written by torch\.save"),
    (_write(pickle.dumps({"model": {}})), r"truncated, damaged or not written by torch\.save "
                                          r"\(UnpicklingError: Unsupported operand"),
    (_truncated, r"truncated, damaged or not written by torch\.save \(RuntimeError: "),
    (_saved({"model": {"w": Tripwire()}}), r"holds objects beyond tensors and plain data "
                                           r"\(.*GLOBAL .*_record_unpickling.*could run code"),
    (_saved([1, 2]), r"holds neither a state dict"),
    (_saved({}), r"holds neither a state dict"),
    (_saved({"model": {"w": 1.0}}), r"holds neither a state dict"),
    (_with(lambda t: t.to(torch.int64)), r"tensor 'global_transformer\.layers\.0\.attention\.wk"
                                         r"\.weight' holds torch\.int64, not floating-point"),
    (_with(lambda t: t.to(torch.bfloat16)), r"mixes tensor dtypes: 1 torch\.bfloat16 \(e\.g\. "
                                            r"'global_transformer\.layers\.0\.attention\.wk\.weight'"
                                            r"\), 82 torch\.float32"),
    (_with(_nan), r"tensor 'global_transformer\.layers\.0\.attention\.wk\.weight' holds 2 NaN "
                  r"or inf value\(s\) of 1024.*import an earlier step's checkpoint"),
    # torch has no isfinite for 8-bit floats: the NaN check failed with a traceback
    (_every(lambda t: t.to(torch.float8_e4m3fn)),
     r"tensor 'global_transformer\.layers\.0\.attention\.wk\.weight' holds "
     r"torch\.float8_e4m3fn, which the reference does not run"),
])
def test_crafted_pth_files_are_refused_naming_the_file_and_tensor(tmp_path, state, write, message):
    path = tmp_path / "consolidated.pth"
    write(path, state)
    with pytest.raises(ReferenceImportError, match=message) as refused:
        read_reference_state_dict(path)
    assert str(path) in str(refused.value)
    assert UNPICKLED == []


def test_truncated_distcp_file_is_named(tmp_path, state):
    step = save_training_step(tmp_path, state)
    part = step / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[:1000])
    with pytest.raises(ReferenceImportError, match=rf"{part} is truncated: 1000 bytes"):
        read_reference_state_dict(step)


def test_crafted_dcp_index_is_refused_without_running_it(tmp_path, state):
    step = save_training_step(tmp_path, state)
    (step / ".metadata").write_bytes(pickle.dumps(Tripwire()))
    with pytest.raises(ReferenceImportError, match=r"asks to build .*_record_unpickling"):
        read_reference_state_dict(step)
    assert UNPICKLED == []


@pytest.mark.parametrize("size, chunks_too, what", [
    # 4 TB: a bare "DefaultCPUAllocator: can't allocate memory" traceback
    ((10**6, 10**6), True, r"\(4000000000000 bytes of torch.float32\), but stores \d+ bytes"),
    # the index's one chunk kept: loaded without a word, the rest uninitialised memory
    ((64, 10**5), False, r"\(6400000 elements\), but its stored chunks hold \d+"),
])
def test_a_dcp_index_giving_a_tensor_more_elements_than_stored_is_named(tmp_path, state, size,
                                                                         chunks_too, what):
    """A damaged or crafted .metadata whose shape of a model tensor exceeds what is stored for
    it is refused naming the tensor, before anything of that shape is allocated."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    from megatron_lst.checkpoint.safe_pickle import read_dcp_metadata

    step = save_training_step(tmp_path, state)
    metadata = read_dcp_metadata(step)
    name = sorted(key for key in metadata.state_dict_metadata if key.startswith("model."))[0]
    item = metadata.state_dict_metadata[name]
    item.size = torch.Size(size)
    if chunks_too:
        item.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size(size))]
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ReferenceImportError, match=rf"{step}: its \.metadata gives tensor "
                                                   rf"'{re.escape(name)}' the shape "
                                                   rf"\({size[0]}, {size[1]}\) {what}.*the "
                                                   rf"index is damaged or crafted"):
        read_reference_state_dict(step)


def test_dcp_checkpoint_without_model_tensors_is_named(tmp_path):
    step = tmp_path / "0000000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optim": {"exp_avg": torch.zeros(3)}}, checkpoint_id=step)
    with pytest.raises(ReferenceImportError, match=r"without model tensors \(its state holds "
                                                   r"\['optim'\]\)"):
        read_reference_state_dict(step)


def _import(tmp_path: Path, state: dict, model_args: dict) -> int:
    torch.save({"model": state}, tmp_path / "consolidated.pth")
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "model": model_args}))
    return main(["import-reference", "--reference-ckpt", str(tmp_path / "consolidated.pth"),
                 "--output", str(tmp_path / "out"), "--num-units", NUM_UNITS])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s, a: (s, {**a, "vocab_size": 44}),
     r"reference tensor 'local_encoder\.tok_embeddings\.weight' has shape \(40, 16\), but the "
     r"model args give \(44, 16\)"),
    (lambda s, a: (s, {**a, "n_layers_global": 3}),
     r"reference checkpoint has no tensor 'global_transformer\.layers\.2\.attention\.wk\.weight' "
     r"\(9 the model args describe are missing"),
    (lambda s, a: ({**s, "encoder_hash_tok_embedding.0.weight": torch.zeros(30, 16)}, a),
     r"unmapped \(1 the model args do not describe\): \['encoder_hash_tok_embedding\.0\.weight'\];"
     r" the checkpoint holds modules built by \['encoder_hash_byte_group_size'\]"),
])
def test_model_args_that_disagree_with_the_tensors_exit_1_naming_both(tmp_path, state, capsys,
                                                                      edit, message):
    state, model_args = edit(state, MODEL_ARGS)
    assert _import(tmp_path, state, model_args) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'consolidated.pth'} (model args {tmp_path / 'params.json'})" in error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_import_never_replaces_an_existing_output(tmp_path, state, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / WEIGHTS_FILENAME).write_bytes(b"earlier import")
    assert _import(tmp_path, state, MODEL_ARGS) == 1
    assert "refusing to overwrite a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "out" / WEIGHTS_FILENAME).read_bytes() == b"earlier import"


@pytest.mark.parametrize("output", ["out", "out/portable"])
def test_an_output_that_is_a_file_is_refused_before_converting(tmp_path, state, capsys, output):
    # It failed after the whole conversion and its checks ("verify ...: max |logits| ...")
    # with a bare "[Errno 17] File exists".
    (tmp_path / "out").write_text("a file")
    torch.save({"model": state}, tmp_path / "consolidated.pth")
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    assert main(["import-reference", "--reference-ckpt", str(tmp_path / "consolidated.pth"),
                 "--output", str(tmp_path / output), "--num-units", NUM_UNITS]) == 1
    printed = capsys.readouterr()
    assert f"{tmp_path / 'out'} is a file, not a directory; give a directory" in printed.err
    assert "verify" not in printed.out
    assert (tmp_path / "out").read_text() == "a file"


def test_an_entropy_model_run_is_refused_naming_it(tmp_path, state, capsys):
    torch.save({"model": state}, tmp_path / "consolidated.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {**PARAMS, "train_entropy_model": True, "entropy_model": {"dim": 64, "n_layers": 2}}))
    assert main(["import-reference", "--reference-ckpt", str(tmp_path),
                 "--output", str(tmp_path / "out"), "--num-units", NUM_UNITS]) == 1
    assert "trained its entropy model (train_entropy_model: true)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fixture_saved_as_a_training_step_imports_like_its_state_dict(reference_fixtures, tmp_path):
    """The fixture's weights and args, saved the way the reference's training saves a step, import
    to the same portable checkpoint as the fixture's safetensors does."""
    weights = load_file(str(reference_fixtures / "state_dict_A.safetensors"))
    args = json.loads((reference_fixtures / "config_A.json").read_text())["model_args"]
    step = tmp_path / "checkpoints" / "0000000100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": weights}, checkpoint_id=step)
    (step / "params.json").write_text(json.dumps({**PARAMS, "model": args}))
    assert main(["import-reference", "--reference-ckpt", str(step),
                 "--output", str(tmp_path / "from_step")]) == 0
    assert main(["import-reference",
                 "--reference-ckpt", str(reference_fixtures / "state_dict_A.safetensors"),
                 "--reference-args", str(reference_fixtures / "config_A.json"),
                 "--output", str(tmp_path / "from_file")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "from_step" / WEIGHTS_FILENAME)),
                        load_file(str(tmp_path / "from_file" / WEIGHTS_FILENAME)))
    assert load_portable(tmp_path / "from_step").config == load_portable(tmp_path / "from_file").config


def test_a_conversion_that_fails_its_verification_leaves_nothing_at_output(tmp_path, state,
                                                                          monkeypatch, capsys):
    save_training_step(tmp_path, state)
    step = tmp_path / "0000001000"
    assert main(["import-reference", "--reference-ckpt", str(step), "--output",
                 str(tmp_path / "portable"), "--num-units", NUM_UNITS]) == 0

    def mismatch(before, after, command, stream=None):
        raise VerificationError(f"{command}: max |logits before - after| = 1.0")

    monkeypatch.setattr(convert, "verify_same_function", mismatch)
    for command, source, output in (("import-reference", ["--reference-ckpt", str(step),
                                                          "--num-units", NUM_UNITS], "again"),
                                    ("export-reference", ["--portable", str(tmp_path / "portable")],
                                     "exported")):
        assert main([command, *source, "--output", str(tmp_path / output)]) == 1
        assert f"{command}: max |logits before - after| = 1.0" in capsys.readouterr().err
        assert not (tmp_path / output).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001000", "portable"]  # no scratch


def test_export_of_a_model_trained_here_writes_only_fields_the_reference_loader_accepts(tmp_path):
    """The reference's loader validates params.json with pydantic models that forbid unknown
    fields and reads `torch.load(consolidated.pth, weights_only=True)["model"]`."""
    vocab = JointVocab(text_size=58)
    initialize_parallel()
    try:
        config = preset("tiny", vocab.size)
        state = full_state_dict(build_full_model(config))
        save_portable(tmp_path / "portable", PortableCheckpoint(
            config=config, state=state, vocab=vocab,
            training_args={"patching_mode": "curriculum", "patch_size": 5, "curriculum_tau1": 10,
                           "curriculum_tau2": 20, "max_tokens": 256}))
    finally:
        destroy_parallel()
    assert main(["export-reference", "--portable", str(tmp_path / "portable"),
                 "--output", str(tmp_path / "exported")]) == 0
    params = json.loads((tmp_path / "exported" / "params.json").read_text())
    assert sorted(params) == ["data", "distributed", "model"]
    assert sorted(params["data"]) == ["patcher_args", "tokenizer_args"]
    assert params["data"]["tokenizer_args"] == {"name": "lst",
                                                "init_kwargs": {"speech_vocab_size_unit": 502}}
    assert params["distributed"] == {"model_dtype": "fp32"}
    assert set(params["model"]) <= REFERENCE_MODEL_FIELDS, set(params["model"]) - REFERENCE_MODEL_FIELDS
    # its local models' args (LocalModelArgs) require a string mode and a number: null fails
    assert (params["model"]["patching_mode"], params["model"]["patch_size"]) == ("static", 5.0)
    assert set(params["data"]["patcher_args"]) <= REFERENCE_PATCHER_FIELDS
    weights = torch.load(tmp_path / "exported" / "consolidated.pth", weights_only=True)
    assert list(weights) == ["model"]
    assert {t.dtype for t in weights["model"].values()} == {torch.float32}
