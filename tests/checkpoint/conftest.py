"""megatron.core in-process on one rank (TP=1, PP=1) and the reference fixture's location."""

from pathlib import Path

import pytest

from megatron_lst.parallel import destroy_parallel, initialize_parallel

REFERENCE_FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference_lst"


@pytest.fixture(scope="module")
def single_rank():
    initialize_parallel(seed=1234)
    yield
    destroy_parallel()


@pytest.fixture(scope="session")
def reference_fixtures() -> Path:
    if not REFERENCE_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures absent: {REFERENCE_FIXTURES}")
    return REFERENCE_FIXTURES
