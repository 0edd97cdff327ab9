"""Core attention of the global block's local (non-Transformer-Engine) spec: causal PyTorch SDPA.

megatron's `DotProductAttention` materialises `[B, H, S, S]` scores, masks and softmaxes them in
separate kernels; on CPU that dominated the global transformer's step at a few thousand
positions. `CausalSDPAttention` fills the same `core_attention` slot with
`scaled_dot_product_attention(is_causal=True)` (PyTorch's flash kernels on CPU and CUDA: no score
matrix kept, masked blocks skipped). Same inputs and outputs as megatron's module; under
megatron's inference KV cache (fewer queries than keys) the causal mask is aligned to the end.

Packed documents: the block passes `attention_mask` = the first key of every query, `[B, S]` int64
(`RowDocuments.global_key_starts`; causal within the query's document), instead of a mask tensor.
Query s then sees keys `[key_start[s], s]`, without any `[S, S]` tensor:
- where flash-attn can run (`resolve_local_attention_backend` under "auto": CUDA fp16/bf16, heads
  of at most 256 channels, Ampere or newer, flash-attn imports): `flash_attn_varlen_func`,
  causal, every document of every row one sequence, the key/value heads as they are (its GQA).
  The documents are read to the host once per batch, not per layer: every layer gets the same
  `key_start` tensor, and `documents_of_key_starts` keeps the last one's (`lst_kernels`'
  `LastCall`; layers under activation recompute, which get detached copies, read them again);
- else range attention: on CPU the chunked two-block flash path of `sliding_window_cpu` (window
  S), elsewhere `lst_kernels.patch_cross_attention` on the model's kernel backend (the Triton
  range kernel on CUDA under "auto").

Each path logs once per process, when it first runs, which attention the global block runs
(`announce_global_attention`): the automatic choice is visible at startup.

`PreRotatedKeySelfAttention` fills the block's `self_attention` slot (both specs): megatron's
`SelfAttention`, whose static inference KV cache (generation) holds keys already rotated, so a
decoding step rotates its new position only instead of the whole cache.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math

import megatron.core
import torch
import torch.nn.functional as F
from lst_kernels import patch_cross_attention
from lst_kernels.last_call import LastCall
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .local_attention import (
    AttentionBackendChoice,
    VarlenSequences,
    causal_key_end,
    flash_document_attention,
)
from .sliding_window_cpu import sliding_window_attention_cpu

logger = logging.getLogger(__name__)

# What "auto" range kernels run (lst_kernels.backend.resolve_backend), for the log line.
_AUTO_KERNELS = "Triton on CUDA where triton imports, else PyTorch; LST_KERNEL_BACKEND overrides"


@functools.cache
def announce_global_attention(path: str) -> None:
    """Log `path`, the attention the global block runs, once per process (every layer and every
    model of the process takes the same paths)."""
    logger.info("global attention: %s", path)


def _sequences_of(key_start: torch.Tensor, _same_key_start: torch.Tensor,
                  _num_keys: int) -> tuple[VarlenSequences]:
    """`LastCall`'s `compute(start, end, num_keys)`: the documents of `key_start`."""
    return (VarlenSequences.of_key_starts(key_start),)


# `LastCall` memoises on a (start, end) pair of range tensors: here both are the key starts.
_last_documents = LastCall(_sequences_of)


def documents_of_key_starts(key_start: torch.Tensor) -> VarlenSequences:
    """The documents of `key_start [B, S]` as flash-attn's varlen sequences (one host sync),
    the last tensor's kept while the same unchanged tensor comes back (the next layer's call)."""
    (sequences,) = _last_documents(key_start, key_start, key_start.shape[1])
    return sequences


class CausalSDPAttention(MegatronModule):
    """query `[Sq, B, Hp, d]`, key/value `[Sk, B, Gp, d]` -> `[Sq, B, Hp*d]` (Hp, Gp: this
    tensor-parallel rank's heads and KV groups; Sq <= Sk, the queries being the last Sq
    positions), causal, scale `1/sqrt(d)` unless given. `kernel_backend` ("auto" | "triton" |
    "torch", `lst_kernels.backend`): the kernels of the packed-document range attention off CPU."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        kernel_backend: str = "auto",
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CausalSDPAttention is causal only, got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1 or config.apply_query_key_layer_scaling:
            raise ValueError(
                "CausalSDPAttention supports neither context parallelism nor query-key layer "
                "scaling; use the Transformer Engine spec for those"
            )
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kernel_backend = kernel_backend
        # flash-attn varlen or not; `announce_global_attention` logs what runs instead
        self._backend_for = AttentionBackendChoice("auto", "global packed-document attention",
                                                   log_choice=False)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "CausalSDPAttention applies the causal mask itself and takes no attention_bias or "
                "packed sequences"
            )
        seq_len, batch = query.shape[:2]
        num_keys = key.shape[0]
        dropout = self.dropout if self.training else 0.0
        # On CPU, rows of one document (every key start 0) take the plain causal kernel below.
        if attention_mask is not None and (query.is_cuda or bool(attention_mask.any())):
            return self._document_attention(query, key, value, attention_mask, dropout)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, d]
        # With a KV cache the queries are the last `seq_len` of `num_keys` positions, so the
        # causal mask is aligned bottom-right; SDPA's `is_causal` aligns it top-left, which is
        # only right when the two lengths agree.
        mask = None
        if seq_len != num_keys and seq_len > 1:
            offset = num_keys - seq_len
            mask = (torch.arange(num_keys, device=q.device)[None, :]
                    <= torch.arange(seq_len, device=q.device)[:, None] + offset)  # [Sq, Sk]

        announce_global_attention("causal, PyTorch scaled_dot_product_attention")

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=seq_len == num_keys, dropout_p=dropout,
                scale=self.scale, enable_gqa=self.groups_per_partition != self.heads_per_partition,
            )

        if dropout > 0:  # megatron's convention: attention dropout on the model-parallel stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)  # [S, B, Hp*d]

    def _document_attention(self, query, key, value, key_start, dropout):
        """Causal attention within documents: query s sees keys `[key_start[b, s], s]`;
        flash-attn's varlen kernel where it can run, else range attention (module docstring)."""
        seq_len, batch = query.shape[:2]
        if key.shape[0] != seq_len or key_start.shape != (batch, seq_len) \
                or key_start.is_floating_point():
            raise ValueError(
                f"CausalSDPAttention takes as attention_mask the first key of every query, "
                f"[B, S] = {(batch, seq_len)} int, over as many keys as queries; got "
                f"{tuple(key_start.shape)} {key_start.dtype} with {key.shape[0]} keys")
        if dropout > 0:
            raise ValueError("attention dropout is not supported with packed-document attention "
                             "(--reset-attention-mask); set --attention-dropout 0")
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, S, heads, d]
        if self._backend_for(q) == "flash":  # k, v keep their Gp heads
            announce_global_attention("causal within packed documents, flash-attn varlen")
            out = flash_document_attention(q, k, v, documents_of_key_starts(key_start),
                                           scale=self.scale)  # [B, S, Hp, d]
            return out.transpose(0, 1).reshape(seq_len, batch, -1)  # [S, B, Hp*d]
        if q.device.type == "cpu":
            announce_global_attention("causal within packed documents, range attention on CPU "
                                      "(PyTorch, sliding_window_cpu)")
            out = sliding_window_attention_cpu(q, k, v, seq_len, key_start, scale=self.scale)
        else:
            kernels = self.kernel_backend + (f" ({_AUTO_KERNELS})" if self.kernel_backend == "auto"
                                             else "")
            announce_global_attention(f"causal within packed documents, lst_kernels range "
                                      f"attention, kernel backend {kernels}")
            key_end = causal_key_end(batch, seq_len, q.device)  # [B, S], shared by all layers
            out = patch_cross_attention(q, k, v, key_start, key_end, scale=self.scale,
                                        backend=self.kernel_backend)
        return out.transpose(0, 1).reshape(seq_len, batch, -1)  # [S, B, Hp*d]


def _megatron_changed(what: str) -> RuntimeError:
    return RuntimeError(
        f"megatron-core {megatron.core.__version__}: {what}. PreRotatedKeySelfAttention "
        "(megatron_lst/models/global_attention.py) was written for megatron-core 0.16 to 0.19, "
        "whose SelfAttention.forward takes `inference_context` and `rotary_pos_emb` and projects "
        "through `get_query_key_value_tensors`; adapt it to this release or install "
        "megatron-core 0.16 to 0.19")


# Where `inference_context` stands among `SelfAttention.forward`'s positional arguments (after
# hidden_states, attention_mask, key_value_states): fewer positional arguments cannot hold it.
_INFERENCE_CONTEXT_POSITION = 3


@functools.cache
def _self_attention_forward_signature() -> inspect.Signature:
    """The signature of megatron's `SelfAttention.forward`, checked for the arguments
    `PreRotatedKeySelfAttention` reads (raises when they are gone)."""
    signature = inspect.signature(SelfAttention.forward)
    missing = {"hidden_states", "inference_context", "rotary_pos_emb"} - set(signature.parameters)
    if missing:
        raise _megatron_changed(f"SelfAttention.forward takes no {sorted(missing)}")
    if list(signature.parameters).index("inference_context") - 1 != _INFERENCE_CONTEXT_POSITION:
        raise _megatron_changed("SelfAttention.forward takes inference_context at another "
                                "position")
    return signature


class PreRotatedKeySelfAttention(SelfAttention):
    """megatron's `SelfAttention`, whose static inference KV cache holds rotated keys.

    Under `StaticInferenceContext` (generation), megatron-core 0.16 to 0.19 store a step's keys
    in the cache unrotated and apply RoPE to the whole cache, positions `[0, t]`, at every step
    (`Attention._adjust_key_value_for_inference` hands `forward` the angles of `[:t + 1]`): one
    rotation and one new cache-sized tensor per layer and step, quadratic in the length. Only
    flash decoding (CUDA) and the dynamic context (flash-attn) rotate keys before caching.

    Here a static-context call runs megatron's forward without `rotary_pos_emb`, and RoPE of the
    new positions (the context's `sequence_len_offset` on) is applied to the query and key as
    they leave the projection (`get_query_key_value_tensors`, the method every megatron
    attention implements): megatron caches the rotated keys and rotates nothing. Same angles,
    same `apply_rotary_pos_emb` (megatron's, with the config's interleaving and fusion), each
    position rotated once. Any other call (training, no context, megatron's dynamic context,
    flash decoding, angles given as a (query, key) pair, `no_rope_freq`, YaRN's scaled RoPE) is
    megatron's forward unchanged.

    Fails loudly, never silently unrotated: at build when `SelfAttention.forward` lacks the
    arguments read here, and at a call whose projection did not pass through
    `get_query_key_value_tensors` or did not give `(query, key, value, ...)` `[S, B, heads, d]`.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _self_attention_forward_signature()
        self._pending_rotation: tuple[torch.Tensor, int] | None = None
        """(angles `[S_max, 1, 1, d]`, first new position) for the next projection."""

    def _pre_rotates(self, context, rotary_pos_emb) -> bool:
        return (context is not None and context.is_static_batching()
                and isinstance(rotary_pos_emb, torch.Tensor) and not self.config.flash_decode
                and not getattr(self.config, "no_rope_freq", None)
                and getattr(self.config, "yarn_rotary_scaling_factor", None) is None)

    def forward(self, *args, **kwargs):
        if (len(args) <= _INFERENCE_CONTEXT_POSITION and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None):
            return super().forward(*args, **kwargs)  # no context (training): nothing to bind
        call = _self_attention_forward_signature().bind(self, *args, **kwargs)
        arguments = call.arguments
        context = arguments.get("inference_context")
        if context is None:  # megatron's deprecated name of the argument
            context = arguments.get("inference_params")
        if not self._pre_rotates(context, arguments.get("rotary_pos_emb")):
            return super().forward(*args, **kwargs)
        self._pending_rotation = (arguments["rotary_pos_emb"], context.sequence_len_offset)
        arguments["rotary_pos_emb"] = None
        try:
            output = super().forward(*call.args[1:], **call.kwargs)
            if self._pending_rotation is not None:
                raise _megatron_changed("SelfAttention.forward no longer projects through "
                                        "get_query_key_value_tensors under a static context")
        finally:
            self._pending_rotation = None
        return output

    def get_query_key_value_tensors(self, *args, **kwargs):
        """megatron's projection; during a static-context call, query and key rotated at the
        positions they hold."""
        projected = super().get_query_key_value_tensors(*args, **kwargs)
        if self._pending_rotation is None:
            return projected
        angles, start = self._pending_rotation  # [S_max, 1, 1, d], first new position
        self._pending_rotation = None
        if not (isinstance(projected, tuple) and len(projected) >= 3
                and projected[0].dim() == projected[1].dim() == 4
                and projected[0].shape[0] == projected[1].shape[0]):
            raise _megatron_changed("get_query_key_value_tensors did not return (query, key, "
                                    "value, ...) of [S, B, heads, d]")
        query, key, *rest = projected  # [S, B, Hp, d], [S, B, Gp, d]
        if start + query.shape[0] > angles.shape[0]:
            raise ValueError(f"positions {start}..{start + query.shape[0] - 1} are past the "
                             f"{angles.shape[0]} RoPE angles given; size the angles (and the "
                             f"inference context) for the whole sequence")
        new_angles = angles[start:start + query.shape[0]]  # [S, 1, 1, d]
        rotate = functools.partial(apply_rotary_pos_emb, freqs=new_angles, config=self.config,
                                   cp_group=self.pg_collection.cp)
        return (rotate(query), rotate(key), *rest)
