"""`initialize_parallel` refuses, before any process group exists, a torchrun launch whose
restarted rounds would read the previous round's process-group addresses (pytorch#135712)."""

import pytest

from megatron_lst.parallel import check_elastic_restarts_can_rendezvous


def test_restarts_with_the_shared_agent_store_are_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_elastic_restarts_can_rendezvous(
            {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})


@pytest.mark.parametrize("environ", [
    {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"},
    {"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"},
    {},  # not launched by torchrun's elastic agent
])
def test_launches_that_can_restart_or_never_do_are_accepted(environ):
    check_elastic_restarts_can_rendezvous(environ)
