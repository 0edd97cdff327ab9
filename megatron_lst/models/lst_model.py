"""The Latent Speech-Text Transformer on megatron.core, shaped like `GPTModel`.

One batch through the model (B rows, N tokens, P patches, k slots per patch):

    first stage  tokens [B, N] -> TokenEncoder -> token states [B, N, De]
                 -> PatchEncoder (pool + cross-attention) -> patches [B, P, k*De]
                 -> (projection to Dg when k*De != Dg) -> [P, B, Dg]  (sequence-parallel: [P/tp, B, Dg])
    every stage  global TransformerBlock (its share of the layers), causal over patches
    last stage   global out [P, B, Dg] -> LocalDecoder(token states, global out) [B, N, Dd]
                 -> vocab-parallel output head [B, N, V/tp] -> vocab-parallel cross entropy [B, N]

Local modules are plain PyTorch, replicated on every tensor-parallel rank; they see identical
inputs and output gradients on all of them (the embedding all-reduces its output, the output head
all-reduces its input gradient, the sequence-parallel scatter/gather exchange complete tensors),
and their gradients are averaged over the tensor-parallel group to keep the copies bit-equal
(`replicated_parameters`).

How the decoder gets the per-token encoder states under pipeline parallelism (docs/architecture.md#parallelism):
the last stage keeps a replica of the `TokenEncoder` (embedding + encoder self-attention layers,
not the patch cross-attention) and recomputes the token states from the tokens. Chosen over
packing them into the pipeline's p2p tensor because (a) megatron's schedules send one fixed-shape
`[P, B, Dg]` tensor per micro-batch while token counts vary per batch, so packing would need
variable-shape communication, forward and backward, through every intermediate stage; (b) the
replica is small: in the paper's 1B it is the embedding and one 1024-wide layer next to 25 global
layers of 2048, so the recompute adds a few percent to the last stage; (c) it is megatron's
tied-embedding pattern: `replicated_parameters` keeps the two copies in step (same start,
gradients summed over megatron's embedding group, stored once in checkpoints).

Packed documents (`LSTConfig.documents`, see `documents.py`): every attention stops at the
document start of its query (but the cross-attention, or also the global attention, where the
rule turns that off: the reference's GPU path stops its local self-attention at EOS, its global
one with attn_bias_type "block_causal", its cross-attention never; its CPU path and the fixtures
stop nowhere: `documents=None`). Every stage derives the documents from the tokens, so stages between the
first and the last need `tokens` and `patch_lengths` too when attention is reset.
Difference from the reference, deliberate: a vocabulary that must divide by the tensor-parallel
size (megatron's vocab-parallel layers).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from .config import LSTConfig, check_tensor_parallel_vocab
from .documents import RowDocuments, documents_of_stage, global_spec_for_documents
from .global_transformer import GlobalTransformer
from .local_decoder import LocalDecoder
from .local_encoder import PatchEncoder, TokenEncoder
from .replicated_parameters import (
    fix_sharded_state_dict,
    mark_tensor_parallel_copies,
    synchronise_encoder_replica,
)
from .specs import global_block_spec, local_layer_spec

logger = logging.getLogger(__name__)


def check_input_shapes(tokens: torch.Tensor | None, patch_lengths: torch.Tensor | None,
                       labels: torch.Tensor | None, needs_batch: bool) -> None:
    """Raise ValueError unless tokens `[B, N]`, patch_lengths `[B, P]` (P >= 1) and labels
    `[B, N]` (each integer, or None where the stage takes none; `needs_batch`: tokens and
    patch_lengths are required). Reads shapes only: no host sync."""
    if needs_batch and (tokens is None or patch_lengths is None):
        raise ValueError("the first and last pipeline stages need tokens [B, N] and "
                         "patch_lengths [B, P]; got None for "
                         f"{'tokens' if tokens is None else 'patch_lengths'}")
    for name, tensor in (("tokens", tokens), ("patch_lengths", patch_lengths), ("labels", labels)):
        if tensor is not None and (tensor.dim() != 2 or tensor.is_floating_point()):
            raise ValueError(f"{name} must be a 2-D integer tensor, got shape "
                             f"{tuple(tensor.shape)} of {tensor.dtype}")
    if patch_lengths is not None and patch_lengths.shape[1] == 0:
        raise ValueError("patch_lengths has no patches (P = 0); the global transformer needs at "
                         "least one position per row")
    if tokens is None:
        return
    if patch_lengths is not None and patch_lengths.shape[0] != tokens.shape[0]:
        raise ValueError(f"patch_lengths has {patch_lengths.shape[0]} rows but tokens "
                         f"{tuple(tokens.shape)} has {tokens.shape[0]}")
    if labels is not None and labels.shape != tokens.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of tokens "
                         f"{tuple(tokens.shape)}")


class LSTModel(MegatronModule):
    """LST for one pipeline stage.

    Args:
        config: the model (`LSTConfig`).
        megatron_config: `config.transformer_config(...)` with this run's parallel settings.
        pre_process / post_process: whether this is the first / last pipeline stage (with
            virtual pipeline stages: the first chunk of the first rank / the last chunk of the
            last rank).
        vp_stage: the virtual pipeline stage of this model chunk (None: no interleaving).
        transformer_impl: global block spec, "auto" | "local" | "transformer_engine".
        local_attention_backend: local sliding-window attention, "auto" | "flash" | "sdpa".
        kernel_backend: segment pool, patch cross-attention and range attention kernels (the
            local windows', the global packed-document attention's), "auto" | "triton" | "torch".
    """

    def __init__(
        self,
        config: LSTConfig,
        megatron_config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        transformer_impl: str = "auto",
        local_attention_backend: str = "auto",
        kernel_backend: str = "auto",
        vp_stage: int | None = None,
    ):
        super().__init__(config=megatron_config)
        if megatron_config.hidden_size != config.global_model.hidden_size:
            raise ValueError(
                f"megatron_config.hidden_size {megatron_config.hidden_size} != global hidden size "
                f"{config.global_model.hidden_size}; build it with config.transformer_config()"
            )
        check_tensor_parallel_vocab(config, megatron_config)
        self.lst_config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage  # checked by megatron's schedules against the chunk they run
        # Read by megatron's schedules and finalize_model_grads (the replica is reduced apart).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        local_spec = local_layer_spec(local_attention_backend, kernel_backend)
        transformer_impl = global_spec_for_documents(config.documents, transformer_impl)
        logger.info(
            "LSTModel stage (first=%s, last=%s): local attention %s, kernels %s",
            pre_process, post_process, local_attention_backend, kernel_backend,
        )

        if pre_process or post_process:
            self.token_encoder = TokenEncoder(config, local_spec, megatron_config)
        if pre_process:
            self.patch_encoder = PatchEncoder(config, kernel_backend)
            self.global_input_projection = (
                torch.nn.Linear(config.patch_width, config.global_model.hidden_size, bias=False)
                if config.patch_width != config.global_model.hidden_size
                else None
            )
        # Reference rule 7: no final norm on the global output (the decoder normalises its keys).
        self.global_transformer = GlobalTransformer(
            megatron_config, global_block_spec(megatron_config, transformer_impl, kernel_backend),
            config.rope_theta,
            final_norm=False, pre_process=pre_process, post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.local_decoder = LocalDecoder(config, local_spec, kernel_backend)
            # Its input is replicated [B, N, Dd], never sequence-sharded.
            head_config = dataclasses.replace(megatron_config, sequence_parallel=False)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.decoder.hidden_size, config.vocab_size, config=head_config,
                init_method=megatron_config.init_method, bias=False, gather_output=False,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
            )
        self._init_local_weights()
        mark_tensor_parallel_copies(self)
        synchronise_encoder_replica(self)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: the activation received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.global_transformer.set_input_tensor(input_tensor)

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # [B, N] int64, first and last stage
        patch_lengths: torch.Tensor | None = None,  # [B, P] int, first and last stage
        labels: torch.Tensor | None = None,  # [B, N] int64, last stage
    ) -> torch.Tensor:
        """Returns, on the last stage, the per-token cross entropy `[B, N]` (fp32, unreduced) when
        `labels` are given, else the full logits `[B, N, V]` (fp32); on other stages the global
        activation `[P, B, Dg]` (`[P/tp, B, Dg]` with sequence parallelism) for the next stage."""
        check_input_shapes(tokens, patch_lengths, labels, self.pre_process or self.post_process)
        documents = documents_of_stage(tokens, self.lst_config.documents)
        token_states, global_input = None, None
        if self.pre_process:
            token_states, global_input = self.encode(tokens, patch_lengths, documents)
        key_start = positions = None
        if documents is not None:
            key_start = documents.global_key_starts(patch_lengths)  # [B, P] or None
            positions = documents.patch_positions(patch_lengths)  # [B, P] or None
        global_output = self.global_transformer(global_input, key_start, positions)  # [P(/tp), B, Dg]
        if not self.post_process:
            return global_output
        if token_states is None:
            token_states = self.token_encoder(tokens, documents)[-1]  # the last stage's replica
        return self.decode(token_states, global_output, patch_lengths, labels, documents)

    def encode(self, tokens: torch.Tensor, patch_lengths: torch.Tensor,
               documents: RowDocuments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First stage: `(token states [B, N, De], global input [P(/tp), B, Dg])`."""
        layer_states = self.token_encoder(tokens, documents)  # N_enc x [B, N, De]
        patches = self.patch_encoder(layer_states, patch_lengths, documents)  # [B, P, k*De]
        if self.global_input_projection is not None:
            patches = self.global_input_projection(patches)  # [B, P, Dg]
        global_input = patches.transpose(0, 1).contiguous()  # [P, B, Dg]
        if self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if global_input.shape[0] % tp:
                raise ValueError(
                    f"sequence parallelism splits the {global_input.shape[0]} patches of a row over "
                    f"{tp} ranks; make the patch count (--seq-length) a multiple of {tp} or pad "
                    "patch_lengths with zero-length patches"
                )
            global_input = tensor_parallel.scatter_to_sequence_parallel_region(
                global_input, parallel_state.get_tensor_model_parallel_group())
        return layer_states[-1], global_input

    def decode(
        self,
        token_states: torch.Tensor,  # [B, N, De]
        global_output: torch.Tensor,  # [P(/tp), B, Dg]
        patch_lengths: torch.Tensor,  # [B, P]
        labels: torch.Tensor | None = None,  # [B, N]
        documents: RowDocuments | None = None,
    ) -> torch.Tensor:
        """Last stage: local decoder and output head; returns what `forward` returns there."""
        if self.config.sequence_parallel:
            # The decoder runs whole on every rank, so each rank's gradient is already complete:
            # split it on the way back instead of reduce-scattering.
            global_output = tensor_parallel.gather_from_sequence_parallel_region(
                global_output, tensor_parallel_output_grad=False,
                group=parallel_state.get_tensor_model_parallel_group()
            )
        hidden = self.local_decoder(token_states, global_output.transpose(0, 1), patch_lengths,
                                    documents)
        logits, _ = self.output_layer(hidden)  # [B, N, V/tp]
        if labels is None:
            return tensor_parallel.gather_from_tensor_model_parallel_region(
                logits, parallel_state.get_tensor_model_parallel_group()).float()
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)  # [B, N]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Megatron's sharded state dict with the vocab-parallel token embedding sharded and the
        encoder replica stored once (`replicated_parameters.fix_sharded_state_dict`)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return fix_sharded_state_dict(self, state, prefix, sharded_offsets, metadata)

    def _init_local_weights(self) -> None:
        """Normal(0, init_std) for every plain linear of the local modules (megatron's global
        init); norms start at 1. Same torch seed on every tensor-parallel rank -> same weights."""
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=self.lst_config.init_std)
