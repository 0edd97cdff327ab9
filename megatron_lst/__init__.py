"""Pretraining for the Latent Speech-Text Transformer on megatron.core."""

import warnings

# megatron.core warns at import, in every process, that it falls back to PyTorch without
# Transformer Engine or Apex (five warnings, again in each process a checkpoint save spawns), and
# that its own default CUDA-graph scope is deprecated. The package is imported before megatron.core
# by every entry point and spawned process: the training log says once instead which optional
# packages are missing (`training.train_logging.note_missing_fused_kernels`).
for _message in (r"(Transformer Engine and Apex are|Apex is) not installed",
                 r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning,
                            module=r"megatron\.core")
# Loading a dist checkpoint: megatron.core calls torch.distributed.checkpoint's deprecated
# `load_state_dict` on ShardedTensors, and torch says so three times per load (lst-eval,
# lst-generate, every resume) in a way nobody using megatron-lst can act on.
for _message in (r"`load_state_dict` is deprecated", r"Please use DTensor instead and we are "
                 r"deprecating ShardedTensor"):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning,
                            module=r"(megatron\.core|torch\.distributed\.checkpoint)")
del _message
