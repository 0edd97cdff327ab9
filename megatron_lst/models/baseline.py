"""The token-level baseline (patching mode `none`): a plain decoder-only transformer.

Every token is its own global position; there are no local modules. It is megatron's `GPTModel`
with the same block spec, width, depth, heads, RMSNorm, SwiGLU and interleaved RoPE as LST's
global transformer, plus the usual final norm and a vocab-parallel head over the joint vocabulary,
so LST and the baseline are compared inside one framework on the same interleaved data.
Packed documents (`LSTConfig.documents`): attention is causal within each document, the first key
of every token going to the core attention in the attention-mask slot (see `global_attention.py`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import LSTConfig, ModelConfigError, check_tensor_parallel_vocab
from .documents import documents_of_stage, global_spec_for_documents
from .specs import global_block_spec


class TokenBaselineModel(GPTModel):
    """`GPTModel` called like `LSTModel`: `forward(tokens, patch_lengths, labels)`."""

    def __init__(
        self,
        config: LSTConfig,
        megatron_config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        transformer_impl: str = "auto",
        kernel_backend: str = "auto",
        vp_stage: int | None = None,
    ):
        """`kernel_backend`: the kernels of the packed-document attention's range attention,
        "auto" | "triton" | "torch" (`lst_kernels.backend`); `vp_stage`: the virtual pipeline
        stage of this model chunk (None: no interleaving)."""
        check_tensor_parallel_vocab(config, megatron_config)
        if config.documents is not None and config.documents.reset_position_ids:
            raise ModelConfigError(
                "the token baseline takes its RoPE positions from megatron's GPTModel (0..N-1 per "
                "row) and cannot restart them per document; drop --reset-position-ids")
        transformer_impl = global_spec_for_documents(config.documents, transformer_impl)
        super().__init__(
            config=megatron_config,
            transformer_layer_spec=global_block_spec(megatron_config, transformer_impl,
                                                     kernel_backend),
            vocab_size=config.vocab_size,
            max_sequence_length=config.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=config.rope_theta,
            vp_stage=vp_stage,
        )
        self.lst_config = config

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # [B, N]
        patch_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # [B, N]
    ) -> torch.Tensor:
        """Same contract as `LSTModel.forward`: per-token cross entropy `[B, N]` with labels, full
        fp32 logits `[B, N, V]` without; the hidden activation on non-last pipeline stages.
        `patch_lengths` is accepted and unused: the baseline's patches are its tokens."""
        del patch_lengths
        documents = documents_of_stage(tokens, self.lst_config.documents)
        key_start = None if documents is None else documents.token_document_starts()  # [B, N]
        output = super().forward(input_ids=tokens, position_ids=None, attention_mask=key_start,
                                 labels=labels)
        if labels is not None or not self.post_process:
            return output
        return tensor_parallel.gather_from_tensor_model_parallel_region(
            output, parallel_state.get_tensor_model_parallel_group()).float()
