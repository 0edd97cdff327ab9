"""Warnings and log records of megatron.core (and of torch on its behalf) that tell about its
own internals, not about anything a megatron-lst user chose or can change: `silence()` keeps them
out of every process's output. `megatron_lst/__init__.py` calls it, so it holds in every entry
point and spawned process (the package is imported before megatron.core).

Each filter matches one message from the modules that emit it; other warnings of those modules
are still shown.
"""

from __future__ import annotations

import logging
import warnings

# megatron.core warns at import, in every process, that it falls back to PyTorch without
# Transformer Engine or Apex (five warnings, again in each process a checkpoint save spawns), and
# that its own default CUDA-graph scope is deprecated; from 0.19 also that it logs without
# absl-py (not one of its requirements) and that its MimoModelConfig (imported by its optimizer
# builder, unused here) is experimental. The training log says once instead which optional
# packages are missing (`training.train_logging.note_missing_fused_kernels`).
_IMPORT_NOTICES = (r"(Transformer Engine and Apex are|Apex is) not installed",
                   r"full scope is deprecated", r"absl\.logging is not installed",
                   r"MimoModelConfig is experimental")
# Loading a dist checkpoint: megatron.core 0.16 calls torch.distributed.checkpoint's deprecated
# `load_state_dict` on ShardedTensors, and torch says so three times per load (lst-eval,
# lst-generate, every resume) in a way nobody using megatron-lst can act on.
_LOAD_DEPRECATIONS = (r"`load_state_dict` is deprecated",
                      r"Please use DTensor instead and we are deprecating ShardedTensor")
# megatron.core 0.19 loads with `torch.distributed.checkpoint.load(state, reader, no_dist=True)`
# (each rank reads its own part), and torch warns at every load that the reader is passed by
# position and that no process group is used, both by megatron.core's design.
_LOAD_NOTICES = (r"The argument order of load has been changed",
                 r"torch\.distributed is disabled, unavailable or uninitialized")
# torch 2.13 deprecates the collectives that megatron.core's gradient and parameter buffers (the
# distributed optimizer) and its sequence-parallel mappings call, and says so once in every
# process that reaches them, from torch's collective wrapper; megatron-lst calls neither itself.
_COLLECTIVE_DEPRECATIONS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            r"`torch\.distributed\.reduce_scatter_tensor` is deprecated")
# megatron.core 0.19 logs that its async save is deprecated (its synchronous
# `dist_checkpointing.save` runs through it, in every saving process), and that GPTModel, which
# the token baseline is built on, takes no new features.
_LOG_NOTICES = {
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
}

# (messages, category, emitting modules) of each group of warnings above.
_WARNING_FILTERS = (
    (_IMPORT_NOTICES, UserWarning, r"megatron\.core"),
    (_LOAD_DEPRECATIONS, FutureWarning, r"(megatron\.core|torch\.distributed\.checkpoint)"),
    (_LOAD_NOTICES, UserWarning, r"torch\.distributed\.checkpoint"),
    (_COLLECTIVE_DEPRECATIONS, FutureWarning, r"torch\.distributed\.c10d_logger"),
)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence() -> None:
    """Install the filters (the warning filters again, as the first ones, on each call; the log
    filters once)."""
    for messages, category, module in _WARNING_FILTERS:
        for message in messages:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in _LOG_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
