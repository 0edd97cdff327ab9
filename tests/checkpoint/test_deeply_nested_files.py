"""A checkpoint's JSON (or YAML) nested deeper than the parser recurses: a crafted file, refused
naming it like any other unreadable one (it was a RecursionError traceback)."""

import pytest

from megatron_lst.checkpoint.errors import CheckpointIntegrityError
from megatron_lst.checkpoint.integrity import inspect_checkpoint, read_manifest
from megatron_lst.checkpoint.model_state import CheckpointContentError
from megatron_lst.checkpoint.portable import load_portable
from megatron_lst.checkpoint.reference import read_reference_model_args
from megatron_lst.models.reference_config import ReferenceImportError

DEPTH = 100_000
DEEP_JSON = "[" * DEPTH + "]" * DEPTH


def test_a_portable_config_nested_too_deeply_is_refused_naming_it(tmp_path):
    (tmp_path / "lst_config.json").write_text(DEEP_JSON)
    with pytest.raises(CheckpointContentError,
                       match=rf"^cannot read {tmp_path / 'lst_config.json'}: maximum recursion"):
        load_portable(tmp_path)


@pytest.mark.parametrize("name, text", [("params.json", DEEP_JSON), ("run.yaml", "[" * DEPTH)])
def test_reference_args_nested_too_deeply_are_refused_naming_them(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ReferenceImportError,
                       match=rf"^cannot read reference model args {tmp_path / name}: "):
        read_reference_model_args(tmp_path / name)


def test_a_manifest_nested_too_deeply_is_refused_naming_it(tmp_path):
    (tmp_path / "lst_manifest.json").write_text(DEEP_JSON)
    with pytest.raises(CheckpointIntegrityError,
                       match=rf"^cannot read {tmp_path / 'lst_manifest.json'}: maximum recursion"):
        read_manifest(tmp_path)


def test_a_megatron_config_nested_too_deeply_is_reported_naming_it(tmp_path):
    (tmp_path / "metadata.json").write_text(DEEP_JSON)
    problems = inspect_checkpoint(tmp_path).problems
    assert any(problem.startswith(f"{tmp_path / 'metadata.json'} is missing or damaged: maximum "
                                  f"recursion") for problem in problems), problems
