"""Fine-tuning refuses task rows too long for --max-tokens / --seq-length once, naming sizes that
hold the rows of every part the run builds: its train and its valid datasets."""

import pytest

from megatron_lst.data.dataset import DatasetError
from megatron_lst.data.indexed import DocumentStore
from megatron_lst.data.task_rows import max_row_shape
from megatron_lst.patching import Patcher, PatchingConfig
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.data_provider import build_datasets
from training.training_cases import tiny_flags, write_store


def _flags(train: str, valid: str, max_tokens: int, seq_length: int) -> list[str]:
    flags = tiny_flags(["1.0", train], patching_mode="static")
    at = flags.index("--data-path")
    flags[at:at + 3] = ["--train-data-path", train, "--valid-data-path", valid]
    at = flags.index("--split")
    del flags[at:at + 2]
    return flags + ["--task", "asr", "--patch-size", "3", "--train-iters", "2",
                    "--max-tokens", str(max_tokens),
                    "--seq-length", str(seq_length),
                    "--max-position-embeddings", str(max(max_tokens, seq_length))]


def test_the_first_refusal_names_sizes_that_hold_the_valid_rows_too(tmp_path):
    """The sizes were those of the train part alone: with longer valid rows the run was refused a
    second time, after the user had given the sizes the first refusal named."""
    train = str(write_store(tmp_path / "train", "aligned", 3, seed=1))
    valid = str(write_store(tmp_path / "valid", "aligned", 40, seed=2))
    patcher = Patcher(PatchingConfig("static", patch_size=3))
    train_shape = max_row_shape(DocumentStore(train), "asr", patcher, None)
    valid_shape = max_row_shape(DocumentStore(valid), "asr", patcher, None)
    assert valid_shape[0] > train_shape[0] and valid_shape[1] > train_shape[1]  # the case
    inputs, patches = valid_shape
    with pytest.raises(DatasetError) as refused:
        build_datasets(validate_args(parse_args(_flags(train, valid, 24, 8)), 1))
    message = str(refused.value)
    assert message.startswith("3 of 3 utterances")
    assert "40 more in the run's other dataset parts" in message
    assert (f"The smallest sizes that hold every row of every part the run builds are "
            f"--max-tokens {inputs} and --seq-length {patches} ") in message
    datasets = build_datasets(validate_args(parse_args(_flags(train, valid, inputs, patches)), 1))
    assert datasets.valid is not None and len(datasets.valid[0]["tokens"]) == inputs



def test_valid_rows_of_a_mixed_model_are_sized_static(tmp_path):
    """Validation rows of a mixed model are patched statically (as at inference), but they were
    sized under aligned patching too: a run whose rows all fit was refused, and the refusal named
    a --seq-length larger than any row needs."""
    train = str(write_store(tmp_path / "train", "aligned", 3, seed=1))
    valid = str(write_store(tmp_path / "valid", "aligned", 40, seed=2))
    patcher = Patcher(PatchingConfig("mixed", patch_size=6))
    train_shape = max_row_shape(DocumentStore(train), "asr", patcher, None)  # either rule
    valid_static = max_row_shape(DocumentStore(valid), "asr", patcher, None, ("static",))
    valid_aligned = max_row_shape(DocumentStore(valid), "asr", patcher, None, ("aligned",))
    assert valid_aligned[1] > valid_static[1] > train_shape[1]  # the case: 93 > 79 > 61
    inputs, patches = max(train_shape[0], valid_static[0]), valid_static[1]

    def flags(max_tokens: int, seq_length: int) -> list[str]:
        given = _flags(train, valid, max_tokens, seq_length)
        at = given.index("--patching-mode")
        given[at + 1] = "mixed"
        at = given.index("--patch-size")
        given[at + 1] = "6"
        return given

    with pytest.raises(DatasetError) as refused:
        build_datasets(validate_args(parse_args(flags(inputs, 60)), 1))
    assert (f"The smallest sizes that hold every row of every part the run builds are "
            f"--max-tokens {inputs} and --seq-length {patches} ") in str(refused.value)
    datasets = build_datasets(validate_args(parse_args(flags(inputs, patches)), 1))
    assert datasets.valid is not None
    assert max(len(datasets.valid[i]["patch_lengths"]) for i in range(4)) == patches
