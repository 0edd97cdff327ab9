"""Pretraining for the Latent Speech-Text Transformer on megatron.core."""

from megatron_lst import megatron_notices

# Before megatron.core is imported: it warns at import about its own internals.
megatron_notices.silence()
