"""megatron.core in-process on one rank (TP=1, PP=1) for the evaluation tests.

Tiny models run on one intra-op thread: on a shared 2-core machine, two threads made a forward
pass of the tiny model 70x slower (0.78 s against 0.012 s) under load.
"""

import pytest
import torch

from megatron_lst.parallel import destroy_parallel, initialize_parallel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_rank():
    initialize_parallel(seed=1234)
    yield
    destroy_parallel()
