"""Checkpoint conversion (docs/architecture.md#checkpoint-formats): the portable form (one safetensors file plus a
config JSON), megatron dist checkpoints under any TP/PP, and the reference implementation's
checkpoints; `lst-convert` (`cli.py`) drives them and verifies every conversion."""
