"""megatron.core in-process on one rank (TP=1, PP=1) for the evaluation tests."""

import pytest

from megatron_lst.parallel import destroy_parallel, initialize_parallel


@pytest.fixture(scope="module")
def single_rank():
    initialize_parallel(seed=1234)
    yield
    destroy_parallel()
