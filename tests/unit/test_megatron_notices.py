"""megatron.core's notices about its own internals stay out of megatron-lst's output
(`megatron_lst.megatron_notices`, installed on import), and nothing else of the same origin does.

The messages are megatron.core 0.19.2's and torch 2.13's, word for word; each is checked as the
module that emits it emits it.
"""

import logging
import warnings

import pytest

from megatron_lst import megatron_notices

MEGATRON_GUIDE = "/".join(("docs", "user-guide", "hybrid-model-migration.md"))  # megatron's docs
IMPORT_WARNINGS = [
    ("megatron.core.hyper_comm_grid", "absl.logging is not installed. Using "
     "logging.getLogger(__name__) instead. Please install absl.logging with `pip install "
     "absl-py` to use absl.logging."),
    ("megatron.core.models.mimo.config.base_configs", "MimoModelConfig is experimental and still "
     "under active development. The API may change without notice in future releases."),
    ("megatron.core.transformer.transformer_config", "full scope is deprecated. Use empty "
     "cuda_graph_modules to capture the whole layer."),
    # megatron.core 0.19's checkpoint loading, through torch.distributed.checkpoint.load
    ("torch.distributed.checkpoint.logger", "The argument order of load has been changed. "
     "Please check the document to avoid future breakages."),
    ("torch.distributed.checkpoint.utils", "torch.distributed is disabled, unavailable or "
     "uninitialized, assuming the intent is to load in a single process."),
]
# torch 2.13 on the collectives of megatron.core's distributed optimizer and sequence parallelism
COLLECTIVE_DEPRECATIONS = [
    ("torch.distributed.c10d_logger", "`torch.distributed.all_gather_into_tensor` is deprecated. "
     "Please use `torch.distributed.all_gather_single` instead."),
    ("torch.distributed.c10d_logger", "`torch.distributed.reduce_scatter_tensor` is deprecated. "
     "Please use `torch.distributed.reduce_scatter_single` instead."),
]
LOG_RECORDS = [
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated and "
     "will be removed in the future releases. Please, use NVRx async solution by setting "
     "`async_strategy` to `nvrx`."),
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED. GPTModel is only accepting "
     "critical bug fixes, no new features. Please reference the migration guide "
     f"`{MEGATRON_GUIDE}` for details on how to use `HybridModel`"),
]


def _shown(module: str, message: str, category: type[Warning] = UserWarning) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        megatron_notices.silence()  # pytest resets the warning filters of collection time
        warnings.warn_explicit(message, category, "emitter.py", 1, module=module)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(("module", "message"), IMPORT_WARNINGS)
def test_megatron_core_notices_are_not_shown(module, message):
    assert _shown(module, message) == []


@pytest.mark.parametrize(("module", "message"), IMPORT_WARNINGS)
def test_other_warnings_of_the_same_modules_are_shown(module, message):
    assert _shown(module, "something a user should see") == ["something a user should see"]
    # the same words from a module of its own are not megatron.core's notice
    assert _shown("megatron_lst.training.loop", message) == [message]


@pytest.mark.parametrize(("module", "message"), COLLECTIVE_DEPRECATIONS)
def test_torch_deprecations_of_megatron_core_collectives_are_not_shown(module, message):
    assert _shown(module, message, FutureWarning) == []
    assert _shown(module, "something a user should see", FutureWarning) == [
        "something a user should see"]


@pytest.mark.parametrize(("logger", "message"), LOG_RECORDS)
def test_megatron_core_log_notices_are_dropped_and_others_kept(logger, message, caplog):
    megatron_notices.silence()
    megatron_notices.silence()  # idempotent: one filter per logger
    assert len(logging.getLogger(logger).filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger(logger).warning(message)
        logging.getLogger(logger).warning("checkpoint save failed on rank 3")
    assert [r.getMessage() for r in caplog.records] == ["checkpoint save failed on rank 3"]
