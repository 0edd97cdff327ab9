"""megatron_lst.parallel in a single process (world size 1, no torchrun)."""

import numpy as np
import pytest
import torch
from megatron.core import parallel_state

from megatron_lst.parallel import (
    ParallelLayoutError,
    destroy_parallel,
    first_stage_layers_for_any_split,
    has_other_ranks,
    initialize_parallel,
    pipeline_stage_layers,
)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    yield
    destroy_parallel()


def test_single_process_round_trip():
    context = initialize_parallel(seed=5)
    assert (context.rank, context.world_size, context.data_parallel_size) == (0, 1, 1)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert context.device.type == expected_device
    assert context.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1

    destroy_parallel()
    assert not parallel_state.model_parallel_is_initialized()
    assert not torch.distributed.is_initialized()


def test_other_ranks_only_in_an_initialized_group_of_several(monkeypatch):
    """No process group, and a group of one, leave the work to this process; a group of two
    has another rank to meet."""
    assert not has_other_ranks()
    initialize_parallel()
    assert not has_other_ranks()
    with monkeypatch.context() as patch:
        patch.setattr(torch.distributed, "get_world_size", lambda *group: 2)
        assert has_other_ranks()


def test_seeds_python_numpy_and_torch():
    initialize_parallel(seed=5)
    assert np.random.rand() == np.random.RandomState(5).rand()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("sizes, message", [
    ({"tensor_model_parallel_size": 2}, r"world size 1 is not divisible by .* = 2"),
    ({"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 3},
     r"tensor \(3\) x pipeline \(2\) parallel = 6"),  # no context parallelism to name
    ({"tensor_model_parallel_size": 2, "context_parallel_size": 2},
     r"tensor \(2\) x pipeline \(1\) x context \(2\) parallel = 4"),
    ({"virtual_pipeline_model_parallel_size": 2}, r"needs pipeline_model_parallel_size >= 2"),
    ({"context_parallel_size": 0}, r"context_parallel_size=0"),
])
def test_impossible_layouts_are_refused_before_anything_starts(sizes, message):
    with pytest.raises(ParallelLayoutError, match=message):
        initialize_parallel(**sizes)
    assert not torch.distributed.is_initialized()


def test_second_initialisation_asks_for_destroy_first():
    initialize_parallel()
    with pytest.raises(RuntimeError, match="destroy_parallel"):
        initialize_parallel()


def test_relayout_keeps_the_process_group():
    initialize_parallel()
    destroy_parallel(keep_process_group=True)
    assert torch.distributed.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    initialize_parallel()
    assert parallel_state.model_parallel_is_initialized()


def test_destroy_without_initialise_is_harmless():
    destroy_parallel()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("num_layers, pp, first, stages", [
    (4, 2, None, [2, 2]), (3, 2, 2, [2, 1]), (25, 4, 7, [7, 6, 6, 6]), (3, 3, None, [1, 1, 1]),
])
def test_any_pipeline_size_up_to_the_layers_gets_a_split(num_layers, pp, first, stages):
    assert first_stage_layers_for_any_split(num_layers, pp) == first
    assert pipeline_stage_layers(num_layers, pp, first) == stages


def test_more_pipeline_stages_than_layers_are_refused_naming_the_most_that_fit():
    with pytest.raises(ParallelLayoutError, match=r"3 global layers cannot fill 4 pipeline "
                                                  r"stages .* --pipeline-model-parallel-size 3"):
        first_stage_layers_for_any_split(3, 4)
