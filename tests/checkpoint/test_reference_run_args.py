"""The exported `params.json` holds what the reference's loader reads beyond the model args:
its tokenizer (`data.tokenizer_args`: "lst" with the SentencePiece model and the speech units)
and the weights' dtype (`distributed.model_dtype`, which it casts every weight to; unset it would
build the byte tokenizer and cast to bf16). The import reads the tokenizer back, so both survive
reference -> portable -> dist -> portable -> reference.

The reference validates params.json as its `TrainArgs`, which refuses unknown keys: the keys
written must be among its fields (`REFERENCE_RUN_FIELDS`, from `lst/args.py`,
`lst/distributed.py`, `lst/tokenizers/build_tokenizer.py` and `lst_tokenizer.py`).
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from checkpoint.test_reference_configurations import BASE_ARGS, random_reference_state
from megatron_lst.checkpoint.cli import main
from megatron_lst.checkpoint.convert import reference_patching
from megatron_lst.checkpoint.portable import load_portable
from megatron_lst.checkpoint.reference import import_reference, read_reference_model_args
from megatron_lst.checkpoint.reference_files import read_reference_state_dict
from megatron_lst.checkpoint.reference_run import reference_model_dtype
from megatron_lst.models.reference_config import ReferenceImportError, lst_config_from_reference
from megatron_lst.models.reference_fields import fields_not_carried_over
from megatron_lst.tokenizer.vocab import JointVocab

UNITS = 20
VOCAB = JointVocab(text_size=BASE_ARGS["vocab_size"] - 6 - UNITS, num_units=UNITS)
SPM = "/data/lst/spm.model"
RUN_TOKENIZER = {"name": "lst", "init_kwargs": {"bpe_tokenizer_path": SPM,
                                                "speech_vocab_size_unit": UNITS}}

REFERENCE_RUN_FIELDS = {
    "data": {"tokenizer_args", "patcher_args"},
    "distributed": {"model_dtype"},
}
TOKENIZER_FIELDS = {"name", "init_kwargs"}
LST_TOKENIZER_KWARGS = {"bpe_tokenizer_path", "tokenization_mode", "add_bos", "add_eos",
                        "speech_mode", "hubert_bpe_model_path", "add_mode_token",
                        "speech_vocab_size_unit"}


def write_reference(tmp_path, dtype=torch.float32, tokenizer_args=None):
    """A reference checkpoint of `BASE_ARGS` in `dtype` and its params.json (with the run's
    tokenizer args, when given) under `tmp_path/run`."""
    run = tmp_path / "run"
    run.mkdir()
    state = {name: t.to(dtype) for name, t in random_reference_state(BASE_ARGS, seed=3).items()}
    save_file(state, str(run / "consolidated.safetensors"))
    params = {"model": BASE_ARGS}
    if tokenizer_args is not None:
        params["data"] = {"tokenizer_args": tokenizer_args}
    (run / "params.json").write_text(json.dumps(params))
    return state


def convert(*argv) -> int:
    return main([str(a) for a in argv])


def assert_loadable_by_the_reference(params: dict) -> None:
    assert set(params) <= {"model", *REFERENCE_RUN_FIELDS}
    for section, fields in REFERENCE_RUN_FIELDS.items():
        assert set(params[section]) <= fields, section
    tokenizer = params["data"]["tokenizer_args"]
    assert set(tokenizer) <= TOKENIZER_FIELDS
    assert set(tokenizer["init_kwargs"]) <= LST_TOKENIZER_KWARGS


def test_tokenizer_and_dtype_survive_reference_portable_dist_portable_reference(tmp_path, capsys):
    state = write_reference(tmp_path, tokenizer_args=RUN_TOKENIZER)
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable") == 0
    portable = load_portable(tmp_path / "portable")
    assert portable.vocab == VOCAB  # the units of the run's tokenizer, without --num-units
    assert portable.training_args["tokenizer_model"] == SPM
    assert convert("portable-to-dist", "--portable", tmp_path / "portable",
                   "--save", tmp_path / "dist") == 0
    assert convert("dist-to-portable", "--load", tmp_path / "dist",
                   "--output", tmp_path / "portable_again") == 0
    assert convert("export-reference", "--portable", tmp_path / "portable_again",
                   "--output", tmp_path / "exported") == 0
    assert "no SentencePiece model" not in capsys.readouterr().out

    params = json.loads((tmp_path / "exported/params.json").read_text())
    assert_loadable_by_the_reference(params)
    assert params["data"]["tokenizer_args"] == RUN_TOKENIZER
    assert params["distributed"] == {"model_dtype": "fp32"}
    exported = read_reference_state_dict(tmp_path / "exported/consolidated.pth")
    assert sorted(exported) == sorted(state)
    assert all(torch.equal(exported[name], tensor) for name, tensor in state.items())
    config, _ = import_reference(state, BASE_ARGS)
    assert import_reference(exported, read_reference_model_args(
        tmp_path / "exported/params.json"))[0] == config

    # and the exported folder imports again as it was imported the first time
    assert convert("import-reference", "--reference-ckpt", tmp_path / "exported",
                   "--output", tmp_path / "reimported") == 0
    reimported = load_portable(tmp_path / "reimported")
    assert reimported.vocab == VOCAB and reimported.config == config
    assert reimported.training_args["tokenizer_model"] == SPM


def test_the_import_names_the_training_and_init_fields_it_does_not_carry_over(tmp_path,
                                                                            capsys):
    """docs/architecture.md says the reference's dropout and init fields are not carried over;
    the import said nothing of a run that set them. It prints one notice a field, on stderr."""
    write_reference(tmp_path)
    params = tmp_path / "run/params.json"
    args = {**BASE_ARGS, "dropout": 0.1, "init_base_std": 0.5, "init_std_factor": "current_depth"}
    params.write_text(json.dumps({"model": args}))
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 0
    notices = [line for line in capsys.readouterr().err.splitlines()
               if "is not carried over" in line]
    assert notices == [
        "lst-convert import-reference: reference dropout=0.1 is not carried over: no lst-train "
        "flag drops what the reference dropped (the inputs of its local encoder, global model and "
        "local decoder, and the decoder's last hidden states); the nearest is lst-train "
        "--hidden-dropout, after the global model's attention and MLP blocks",
        "lst-convert import-reference: reference init_base_std=0.5 is not carried over: imported "
        "weights are not initialised; lst-train --init-method-std sets the std of the normal "
        "initialisation of new weights",
        "lst-convert import-reference: reference init_std_factor='current_depth' is not carried "
        "over: imported weights are not initialised, and no lst-train flag scales an "
        "initialisation by depth"]
    # the reference's defaults, spelt out: nothing to say
    params.write_text(json.dumps({"model": {**BASE_ARGS, "dropout": 0.0, "init_base_std": None,
                                            "init_std_factor": "disabled"}}))
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable2", "--num-units", UNITS) == 0
    assert "is not carried over" not in capsys.readouterr().err


def test_the_init_fields_the_reference_never_reads_are_named_and_change_nothing():
    """The reference's args declare init_use_gaussian, init_use_depth and alpha_depth, which its
    model never reads: the import accepted them silently. They build the same model and are named
    in a notice each, like the init fields the reference does read."""
    fields = {"init_use_gaussian": False, "init_use_depth": "global", "alpha_depth": "global"}
    args = {**BASE_ARGS, **fields}
    assert lst_config_from_reference(args) == lst_config_from_reference(BASE_ARGS)
    assert [notice.split(" is not carried over: ")[0] for notice in
            fields_not_carried_over(args)] == [
        "reference init_use_gaussian=False", "reference init_use_depth='global'",
        "reference alpha_depth='global'"]
    assert all("the reference's model never reads it" in notice
               for notice in fields_not_carried_over(args))
    # the reference's defaults, spelt out: nothing to say
    assert fields_not_carried_over({**BASE_ARGS, "init_use_gaussian": True,
                                    "init_use_depth": "current", "alpha_depth": "disabled"}) == []


@pytest.mark.parametrize("factor", ["depth", None, 1.0])
def test_an_init_std_factor_the_reference_refuses_is_refused_by_name(factor):
    with pytest.raises(ReferenceImportError, match=rf"reference init_std_factor {factor!r} is "
                                                   r"not one of the reference's 'disabled', "
                                                   r"'global_depth'"):
        lst_config_from_reference({**BASE_ARGS, "init_std_factor": factor})


def test_an_import_whose_data_patcher_cuts_long_patches_is_refused_and_writes_nothing(
        tmp_path, capsys):
    write_reference(tmp_path)
    params = tmp_path / "run/params.json"
    params.write_text(json.dumps({"model": BASE_ARGS, "data": {"patcher_args": {
        "patching_mode": "lst_align", "max_patch_length": 6}}}))
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 1
    assert (f"{params}: data.patcher_args max_patch_length=6 with patching_mode 'lst_align': "
            "the reference's patcher cuts every longer patch") in capsys.readouterr().err
    assert not (tmp_path / "portable").exists()


@pytest.mark.parametrize("model_args, patching", [
    ({"patching_mode": "lst_static", "patch_size": 6.0}, {"patching_mode": "static", "patch_size": 6}),
    ({"patching_mode": "lst_curriculum", "patch_size": 3}, {"patching_mode": "static", "patch_size": 3}),
    ({"patching_mode": "lst_align", "patch_size": 4}, {"patching_mode": "aligned"}),
])
def test_model_args_naming_an_lst_patcher_give_its_patching(model_args, patching):
    """Without data.patcher_args the import patches by the model args' mode, which may name one
    of the reference's LST patchers: those were taken for no mode (static patches of 4)."""
    assert reference_patching(model_args) == patching


@pytest.mark.parametrize("mode", ["space", "entropy", "byte", "bpe", "statc", ["static"]])
def test_model_args_naming_a_patching_no_patcher_here_gives_are_refused_by_name(mode):
    """Without data.patcher_args the import patches by the model args' mode; one naming the
    reference's entropy, BPE, space or byte patching (its debug.yaml: "space"), or a misspelt
    one (its patcher refuses that), was taken for static patches of 4 units, so the model was
    evaluated on other patches than its data's, with no word."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference model args patching_mode {mode!r} (with no LST patcher in "
            "data.patcher_args) is no patching lst-eval can give: accepted are 'static', "
            "'lst_static', 'lst_curriculum', 'lst_align', 'aligned', 'curriculum' or null")):
        reference_patching({"patching_mode": mode, "patch_size": 6.0})


@pytest.mark.parametrize(("patcher_args", "named"), [
    ({"patching_mode": "entropy", "patch_size": 4}, "'entropy'"),
    ({"patch_size": 4}, "'entropy' (the reference default, left out)"),
    ({"patching_mode": "static", "patch_size": 4}, "'static'"),  # every token, text too
    ({"patching_mode": "space"}, "'space'"),
])
def test_a_data_patcher_that_is_no_lst_one_is_refused_by_name(patcher_args, named):
    """The data's patcher made the patches the model was trained on; one of the reference's
    other patchers (entropy, its default) fell back to the model args' mode, so the model was
    evaluated on static patches it never saw, with no word."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference data.patcher_args patching_mode {named} is no LST patcher: the model was "
            "trained on its patches, which no --patching-mode here gives")):
        reference_patching({"patching_mode": "static", "patch_size": 6.0}, patcher_args)


@pytest.mark.parametrize("size", [None, 4.5, True])
def test_static_model_args_without_a_whole_patch_size_are_refused_by_name(size):
    """Static patching of the model args with no whole patch size was static patching of 4."""
    with pytest.raises(ReferenceImportError, match=re.escape(
            f"reference model args patching_mode 'static' with patch_size {size!r}: static "
            "patches need a whole number of units")):
        reference_patching({"patching_mode": "static", "patch_size": size})


def test_an_lst_data_patcher_imports_whatever_patching_the_model_args_name(tmp_path):
    """The data's LST patcher decides the patching; the model args' mode (the reference's model
    reads it only to test for "") is not read then, by the import nor by portable-to-dist."""
    write_reference(tmp_path)
    (tmp_path / "run/params.json").write_text(json.dumps({
        "model": {**BASE_ARGS, "patching_mode": "space", "patch_size": 6.0},
        "data": {"patcher_args": {"patching_mode": "lst_static", "patch_size": 3}}}))
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 0
    assert convert("portable-to-dist", "--portable", tmp_path / "portable",
                   "--save", tmp_path / "dist") == 0
    assert convert("dist-to-portable", "--load", tmp_path / "dist",
                   "--output", tmp_path / "portable_again") == 0
    assert load_portable(tmp_path / "portable_again").training_args["patching_mode"] == "static"
    assert load_portable(tmp_path / "portable_again").training_args["patch_size"] == 3


@pytest.mark.parametrize("impl, beyond", [
    ("xformers", "RoPE positions past its table)"),
    ("sdpa", "RoPE positions past its table, and local attention over the last 64 tokens, "
             "not the whole row)")])
def test_the_import_names_the_longest_row_the_reference_ran(tmp_path, capsys, impl, beyond):
    """The reference's local RoPE table holds max_encoder_seq_length positions and a longer row
    fails there; the imported model runs longer rows all the same (no flag carries the limit),
    computing what the reference cannot: the import names the limit, once."""
    write_reference(tmp_path)
    (tmp_path / "run/params.json").write_text(json.dumps({"model": {
        **BASE_ARGS, "attn_impl": impl, "attn_bias_type": "block_causal",
        "local_attention_window_len": 5}}))
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "max_encoder_seq" in line]
    assert notices == [
        "lst-convert import-reference: reference max_encoder_seq_length=64: the reference runs "
        "rows of at most 64 tokens (its local RoPE table), and the imported model computes its "
        "function on those; keep --max-tokens at or below 64: on longer rows it computes what "
        f"the reference cannot ({beyond}"]


def test_a_bf16_checkpoint_exports_as_bf16_with_the_tokenizer_given(tmp_path, capsys):
    write_reference(tmp_path, dtype=torch.bfloat16)
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 0
    assert "tokenizer_model" not in load_portable(tmp_path / "portable").training_args
    assert convert("export-reference", "--portable", tmp_path / "portable",
                   "--output", tmp_path / "exported", "--tokenizer-model", "other/spm.model") == 0
    params = json.loads((tmp_path / "exported/params.json").read_text())
    assert_loadable_by_the_reference(params)
    assert params["distributed"] == {"model_dtype": "bf16"}
    assert params["data"]["tokenizer_args"] == {
        "name": "lst", "init_kwargs": {"bpe_tokenizer_path": "other/spm.model",
                                       "speech_vocab_size_unit": UNITS}}
    assert "no SentencePiece model" not in capsys.readouterr().out


def test_an_export_without_a_known_tokenizer_says_so(tmp_path, capsys):
    write_reference(tmp_path)
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 0
    assert convert("export-reference", "--portable", tmp_path / "portable",
                   "--output", tmp_path / "exported") == 0
    assert "no SentencePiece model is known" in capsys.readouterr().out
    params = json.loads((tmp_path / "exported/params.json").read_text())
    # still the LST tokenizer and its units: the reference refuses to build it, naming the
    # path, rather than reading the ids as bytes
    assert params["data"]["tokenizer_args"] == {"name": "lst",
                                                "init_kwargs": {"speech_vocab_size_unit": UNITS}}


@pytest.mark.parametrize("path", ["???", "", None])
def test_a_placeholder_tokenizer_path_is_not_recorded(tmp_path, path):
    """The reference's template configs spell the path to be given as OmegaConf's '???'."""
    write_reference(tmp_path, tokenizer_args={"name": "lst", "init_kwargs": {
        "bpe_tokenizer_path": path, "speech_vocab_size_unit": UNITS}})
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable") == 0
    portable = load_portable(tmp_path / "portable")
    assert portable.vocab == VOCAB and "tokenizer_model" not in portable.training_args


def test_num_units_other_than_the_run_tokenizers_is_refused(tmp_path, capsys):
    write_reference(tmp_path, tokenizer_args=RUN_TOKENIZER)
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS + 2) == 1
    err = capsys.readouterr().err
    assert f"--num-units {UNITS + 2} differs from the {UNITS} speech units" in err
    assert "speech_vocab_size_unit" in err
    assert not (tmp_path / "portable").exists()


@pytest.mark.parametrize("tokenizer_args, named", [
    ({"name": "blt", "init_kwargs": {}}, "'blt'"),
    ({"name": "sp", "init_kwargs": {"tokenizer_path": SPM}}, "'sp'"),
    ({"init_kwargs": {}}, "'bytes' (the reference default, left out)"),
])
def test_a_run_of_another_tokenizer_than_lst_is_refused_by_name(tmp_path, capsys, tokenizer_args,
                                                                named):
    """Its ids (bytes, SentencePiece pieces) were imported as the joint vocabulary's text pieces
    and speech units, without a word."""
    write_reference(tmp_path, tokenizer_args=tokenizer_args)
    assert convert("import-reference", "--reference-ckpt", tmp_path / "run/consolidated.safetensors",
                   "--output", tmp_path / "portable", "--num-units", UNITS) == 1
    assert (f"{tmp_path / 'run/params.json'}: data.tokenizer_args name {named} is not the "
            f"reference's LST tokenizer 'lst'" in capsys.readouterr().err)
    assert not (tmp_path / "portable").exists()


@pytest.mark.parametrize("dtypes", [(torch.float64,), (torch.float32, torch.bfloat16)])
def test_a_dtype_the_reference_cannot_run_is_named(dtypes):
    state = {f"w{i}": torch.zeros(2, dtype=dtype) for i, dtype in enumerate(dtypes)}
    with pytest.raises(ReferenceImportError, match="distributed.model_dtype") as error:
        reference_model_dtype(state)
    assert all(str(dtype) in str(error.value) for dtype in dtypes)
