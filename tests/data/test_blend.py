"""Blending: `--data-path` parsing, Megatron's greedy indices, and training positions."""

import numpy as np
import pytest
import torch
from document_cases import SPACE_ID, aligned_store, text_store

from megatron_lst.data import blend
from megatron_lst.data.blend import (
    BlendedLSTDataset,
    blending_indices,
    build_blended_dataset,
    parse_data_path,
    weights_from_sizes,
)
from megatron_lst.data.dataset import DatasetError, LSTDataset
from megatron_lst.patching.contract import check_batch
from megatron_lst.patching.curriculum import Patcher, PatchingConfig


def test_parse_data_path():
    assert parse_data_path(["data/a"]) == [(1.0, "data/a")]
    assert parse_data_path(["2", "text", "1", "speech"]) == [(2 / 3, "text"), (1 / 3, "speech")]
    assert parse_data_path(["0.67", "t", "0.33", "s"]) == [(0.67, "t"), (0.33, "s")]
    # The sum overflowed to inf and every weight normalised to 0 ("blending weights must be
    # non-negative and not all 0, got [0. 0.]").
    assert parse_data_path(["1e308", "t", "1e308", "s", "0", "u"]) == [
        (0.5, "t"), (0.5, "s"), (0.0, "u")]


def test_prefixes_without_weights_are_left_to_be_weighted_by_size():
    # Megatron-LM's get_blend_from_list: a list with no number in it is prefixes, no weights.
    assert parse_data_path(["a", "b", "c"]) == [(None, "a"), (None, "b"), (None, "c")]
    assert weights_from_sizes(["a", "b", "c"], [300, 100, 0], "train") == [
        (0.75, "a"), (0.25, "b"), (0.0, "c")]
    with pytest.raises(DatasetError, match=r"the valid documents of a, b hold nothing to weigh "
                                           r"them by .*give weights, --data-path W1 P1"):
        weights_from_sizes(["a", "b"], [0, 0], "valid")


@pytest.mark.parametrize("args, message", [
    ([], "--data-path is empty"),
    (["a", "b", "1"], r"expected weight-prefix pairs \(W1 P1 W2 P2 ...\) or prefixes without "
                      "weights, got 3 values, some of them numbers"),
    (["data/a", "b", "./data//a"], r"names './data//a' twice \(also as 'data/a'\): .* give it "
                                   r"once$"),
    (["1", "a", "2"], "expected weight-prefix pairs"),
    (["a", "1", "b", "2"], "'a' \\(before '1'\\) is not a weight"),
    (["-1", "a", "2", "b"], "weight -1 of 'a' must be finite and >= 0"),
    (["0", "a", "0", "b"], "the weights sum to 0"),
    (["nan", "a", "1", "b"], "must be finite"),
    # Both sources drew the same rows in the same order: half the dataset was trained on twice.
    (["0.5", "data/a", "0.2", "b", "0.3", "./data//a"],
     r"names './data//a' twice \(also as 'data/a'\): .* give it once with the summed weight 0.8"),
])
def test_parse_data_path_errors(args, message):
    with pytest.raises(DatasetError, match=message):
        parse_data_path(args)



def test_a_dataset_named_twice_through_a_link_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"")
    (tmp_path / "mirror").symlink_to(tmp_path / "data")  # the same files, another path
    (tmp_path / "b.bin").symlink_to(tmp_path / "data" / "a.bin")
    for other in (tmp_path / "mirror" / "a", tmp_path / "b"):
        with pytest.raises(DatasetError, match=rf"names '{other}' twice \(also as "
                                               rf"'{tmp_path}/data/a'\)"):
            parse_data_path(["0.5", str(tmp_path / "data" / "a"), "0.5", str(other)])


def greedy_loop(weights, size):
    """Megatron's rule written plainly: the source furthest behind its share, lowest on ties."""
    taken = [0] * len(weights)
    out = []
    for i in range(size):
        errors = [w * max(i, 1) - t for w, t in zip(weights, taken, strict=True)]
        d = errors.index(max(errors))
        out.append((d, taken[d]))
        taken[d] += 1
    return out


@pytest.mark.parametrize("weights", [[0.67, 0.33], [1, 1, 1], [0.5, 0.0, 0.25, 0.25], [1.0]])
def test_blending_indices(weights):
    size = 997
    normalised = list(np.array(weights) / np.sum(weights))
    expected = greedy_loop(normalised, size)
    index, sample = blending_indices(weights, size)
    assert index.dtype == np.int16 and sample.dtype == np.int64
    assert list(zip(index.tolist(), sample.tolist(), strict=True)) == expected
    # The numpy fallback gives the same indices as megatron.core's helpers.
    numpy_index, numpy_sample = blend._blending_indices_numpy(np.array(normalised), size)
    np.testing.assert_array_equal(numpy_index, index)
    np.testing.assert_array_equal(numpy_sample, sample)
    # Shares are within one sample of the weights at every prefix.
    counts = np.bincount(index, minlength=len(weights))
    assert np.abs(counts - np.array(normalised) * size).max() <= 1


def make_source(stores, seed=5):
    config = PatchingConfig(mode="curriculum", aligned_until_step=2, static_from_step=8)

    def make(prefix, num_samples, positions):
        return LSTDataset(stores[prefix], num_samples, 16, 48, Patcher(config), seed,
                          global_batch_size=4, space_id=SPACE_ID, sample_positions=positions)
    return make


def test_build_blended_dataset():
    stores = {"text": text_store(0, 8), "speech": aligned_store(1, 6)}
    sources = parse_data_path(["0.67", "text", "0.33", "speech"])
    blended = build_blended_dataset(sources, 60, make_source(stores))
    assert len(blended) == 60
    text, speech = blended.datasets
    assert len(text) + len(speech) == 60 and abs(len(text) - 0.67 * 60) <= 1
    # Each source knows where its rows sit in the training order, for the curriculum step.
    np.testing.assert_array_equal(speech.sample_positions, np.flatnonzero(blended.dataset_index == 1))
    assert speech.step_of_row(len(speech) - 1) == int(speech.sample_positions[-1]) // 4
    batch = torch.utils.data.default_collate([blended[i] for i in range(60)])
    check_batch(batch, stores["text"].vocab)
    for i in (0, 1, 2, 59):
        source = blended.datasets[blended.dataset_index[i]]
        assert torch.equal(blended[i]["tokens"], source[int(blended.dataset_sample_index[i])]["tokens"])


def test_a_source_with_no_share_is_never_built():
    stores = {"text": text_store(0, 4), "speech": aligned_store(1, 3)}
    built = []

    def make(prefix, num_samples, positions):
        built.append(prefix)
        return make_source(stores)(prefix, num_samples, positions)
    blended = build_blended_dataset([(1.0, "text"), (0.0, "speech")], 10, make)
    assert built == ["text"] and len(blended.datasets[1]) == 0


def test_blend_checks_source_sizes():
    stores = {"text": text_store(0, 4)}
    small = make_source(stores)("text", 2, np.arange(2))
    with pytest.raises(DatasetError, match="has 2 samples but the blend takes 3"):
        BlendedLSTDataset([small], np.zeros(3, np.int16), np.arange(3))
