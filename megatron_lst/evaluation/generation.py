"""Patch-level autoregressive generation with caches for every part of the model.

One step predicts the token after the sequence so far, `x_0 .. x_t`, with
`patch_lengths = generation_patch_lengths(x, ...)` (`[P]`; the last patch is still open; the
cached loop keeps them up to date a token at a time, `GenerationPatching`):
- the token encoder runs on the new token only, with a sliding-window KV cache per layer;
- the patch encoder runs once for each patch closed since the last step (its slots see only the
  tokens of their last W patches, all encoded already);
- the global model runs on those closed patches with megatron's `StaticInferenceContext`, whose
  attention keeps the keys/values of past positions; the block's self-attention
  (`PreRotatedKeySelfAttention`, models/global_attention.py) rotates each position's query and
  key once, as it is projected, so the cache holds rotated keys (megatron's static path rotated
  the whole key cache again at every step);
- the decoder runs on the new token with a sliding-window KV cache per layer and the cached
  keys/values of the closed patches' slots, and the output head gives the logits.
Only closed patches reach the global model, and each does once: the decoder at token t reads only
global patches that end at or before t (docs/architecture.md#the-batch-contract), i.e. closed ones, so the output of
the open patch is never needed. One exception to "each token once": when a text token ends a
speech run, the run's short last patch closes, and its last token moves to the decoder patch
that reads it; the decoder takes that token again, so the cached loop computes what the full
model computes on the whole sequence (tested to 1e-5 on the logits).

Where patches end at generation time (static patching with p units, the rule inference uses):
- a text token (BOS, `<t>`, a piece, EOS) is a patch of its own and closes at once;
- `<s>` opens a speech patch; the patch closes when it holds p tokens (`<s>` counts, as in the
  static patcher), or when the next token is not a unit (the model has ended the speech run: the
  remainder patch closes before that token is processed).
So the patches of a generated sequence are exactly `static_patch_lengths` of it. What generation
cannot know is whether a short last patch of a run is closed until the next token shows it, so
the token that ends a speech run is predicted from the global state before that short patch;
in training, static patching saw the whole run. Aligned patching needs word boundaries that do
not exist while generating, so it is refused. The token baseline is one patch per token: its
global model (the whole `GPTModel`) runs once per token, with the same cache.

The context is the model's `max_sequence_length` (`--max-position-embeddings`) global positions:
the patches of the sequence with the next token's slot for an LST model (as a training row's
patches cover its inputs and last target), its tokens for the baseline. A prompt longer than that
is refused; generation that reaches it stops there (`stopped_at_context_limit`).

`generate(..., use_cache=False)` instead re-runs the whole model on the sequence each step with
the same patch lengths: the reference implementation's way, and what the cache must reproduce.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.evaluation.items import lone_surrogate
from megatron_lst.patching import PatchingConfig, static_patch_lengths
from megatron_lst.tokenizer.vocab import JointVocab


class GenerationError(ValueError):
    """A prompt or a setting generation cannot run with."""


class PromptTooLongError(GenerationError):
    """A prompt that needs more global positions than the model's context."""


MODALITIES = (None, "speech", "text")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 200
    seed: int = 0
    modality: str | None = None
    """"speech": sample only speech units (and EOS); "text": only text pieces (and EOS); None:
    any token the model prefers. Continues a prompt in one modality whatever the model prefers."""

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise GenerationError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"need a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1, "
                                  f"got {self.temperature}, {self.top_k}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [n] int64 the generated ids (after the prompt), EOS included if reached
    global_steps: int
    """Global positions the generated tokens added (prompt prefill excluded): the patches they
    closed, one per token for the baseline; what the cached loop runs the global model on, and
    the same count with `use_cache=False`."""
    seconds: float
    stopped_at_eos: bool
    stopped_at_context_limit: bool = False
    """The next token would have needed more global positions than the model's context."""
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)
    """[V] fp32 logits of each generated token, with `generate(..., keep_logits=True)`."""


def generation_patch_lengths(tokens: np.ndarray, vocab: JointVocab, patch_size: int | None
                             ) -> np.ndarray:
    """`[P]` patch lengths for predicting the token after `tokens` (sum = len(tokens) + 1).

    `patch_size` None: the token baseline (every token a patch). Else static patching of
    `tokens`, then the next token's slot joins the last patch if it is an open speech patch
    (patchable and shorter than `patch_size`), or opens a patch of its own.
    """
    if patch_size is None:
        return np.ones(len(tokens) + 1, dtype=np.int32)
    lengths = static_patch_lengths(InterleavedDocument.from_tokens(tokens, vocab), patch_size)
    if vocab.is_patchable_static(int(tokens[-1])) and lengths[-1] < patch_size:
        lengths[-1] += 1
        return lengths
    return np.append(lengths, 1).astype(np.int32)


class GenerationPatching:
    """`generation_patch_lengths` of a sequence that grows a token at a time, as the boundaries
    of its patches, updated in O(1) per token (recomputing the whole sequence's patching every
    step made generating N tokens O(N^2) on the host).

    `bounds` (`[P + 1]` ints): 0, then the end of each patch; the last patch holds the next
    token's slot, so `bounds[-1]` is the number of tokens plus 1. Entries are appended and only
    the last one ever moves, so the bounds of a closed patch never change.
    """

    def __init__(self, vocab: JointVocab, patch_size: int):
        self.vocab = vocab
        self.patch_size = patch_size
        self.bounds = [0, 1]  # no token yet: the next token's slot is patch 0
        self.run_offset: int | None = None
        """Offset of the last token in its patchable run (`<s>` is 0), None after a text token."""

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1] - 1

    @property
    def num_patches(self) -> int:
        """P, the next token's slot's patch included."""
        return len(self.bounds) - 1

    def append(self, token: int) -> None:
        """Add `token` in the slot (position N), then a slot for the next token: the static
        rule, one token at a time."""
        position, bounds = self.num_tokens, self.bounds
        if self.vocab.is_patchable_static(token):
            self.run_offset = 0 if self.run_offset is None else self.run_offset + 1
            starts_patch = self.run_offset % self.patch_size == 0
        else:
            self.run_offset = None
            starts_patch = True
        if starts_patch and bounds[-2] != position:
            # The slot had joined an open speech patch, which `token` (text) closes short.
            bounds[-1] = position
            bounds.append(position + 1)
        # The next slot joins `token`'s patch if that is an open speech patch.
        if self.run_offset is not None and self.run_offset % self.patch_size < self.patch_size - 1:
            bounds[-1] = position + 2
        else:
            bounds.append(position + 2)

    def decoder_patch_ids(self, start: int) -> list[int]:
        """The decoder patch ids of tokens `start .. N-1`, as `patch_ids_from_lengths(lengths
        [:, 1:], N)` gives them: token i is in decoder patch j when `bounds[j + 1] <= i +
        bounds[1] < bounds[j + 2]`."""
        first_length = self.bounds[1]
        return [bisect.bisect_right(self.bounds, token + first_length) - 2
                for token in range(start, self.num_tokens)]


def build_prompt(vocab: JointVocab, tokenizer=None, text: str | None = None,
                 units: np.ndarray | None = None, continue_in: str | None = None) -> np.ndarray:
    """`[n]` joint ids of a prompt in training's layout: `BOS, <t>, pieces` for `text` or
    `BOS, <s>, units` for `units` (exactly one of them, not empty). `continue_in` "speech" or "text" switches
    modality after the prompt as the interleaver does (`space, <s>` after text, `<t>` after
    speech), so the model answers in the other modality; None continues the prompt's run."""
    if (text is None) == (units is None):
        raise GenerationError("give a text prompt or a unit prompt (exactly one)")
    if continue_in not in (None, "speech", "text"):
        raise GenerationError(f"continue_in must be 'speech', 'text' or None, got {continue_in!r}")
    if text is not None:
        if tokenizer is None:
            raise GenerationError("a text prompt needs the tokenizer")
        check_text_prompt(text)
        # Whitespace around the text is ignored, as evaluation items ignore it: it encodes to
        # word-boundary pieces of their own, "<t> space the" after BOS or "space, space, <s>"
        # before speech (the interleaver ends a text run with one), layouts training never shows.
        pieces = tokenizer.encode(_prompt_text(text))
        if not pieces:
            raise GenerationError(f"the tokenizer turns the text prompt {text!r} into no pieces; "
                                  f"give text in words it knows")
        ids = [vocab.bos_id, vocab.text_marker, *pieces]
        if continue_in == "speech":
            ids += [tokenizer.space_id, vocab.speech_marker]
    else:
        if not len(units):
            raise GenerationError("the unit prompt holds no units; give the units to continue")
        check_unit_prompt(np.asarray(units), vocab.num_units)
        ids = [vocab.bos_id, vocab.speech_marker, *vocab.units_to_ids(np.asarray(units)).tolist()]
        if continue_in == "text":
            ids.append(vocab.text_marker)
    return np.asarray(ids, dtype=np.int64)


def check_unit_prompt(units: np.ndarray, num_units: int) -> None:
    """Raise when a unit of `units` ([n] unit values) is outside the model's codebook: the
    model's codebook is fixed, so the prompt's units must be made with the same one."""
    outside = units[(units < 0) | (units >= num_units)]
    if outside.size:
        raise GenerationError(
            f"the unit prompt holds unit {int(outside[0])}, outside the model's codebook "
            f"0..{num_units - 1}; give units made with the codebook the model was trained on "
            f"({num_units} units)")


def _prompt_text(text: str) -> str:
    """`text` without a leading byte-order mark (text read from a file saved with one; item
    files drop it too) and without whitespace around it."""
    return text.removeprefix("\ufeff").strip()


def check_text_prompt(text: str) -> None:
    """Raise when `text` cannot be a prompt whatever the tokenizer: empty (the model would run
    on from BOS and a marker alone; a byte-order mark is not text) or holding a lone surrogate
    (no tokenizer encodes it)."""
    if not _prompt_text(text):
        raise GenerationError(f"the text prompt {text!r} is empty; give the text to continue")
    bad = lone_surrogate(text)
    if bad is not None:  # the tokenizer raised a RuntimeError naming no input
        raise GenerationError(f"the text prompt holds {text[bad]!r} at character {bad}, a "
                              f"byte that is not UTF-8 (or half a surrogate pair), which no "
                              f"tokenizer encodes; give UTF-8 text")


def generation_patch_size(config: PatchingConfig) -> int | None:
    """The static p a model generates with (None for the token baseline): static, mixed and
    curriculum models all generate with static patching, as they are patched at inference
    (`Patcher.patch_lengths` with step None)."""
    if config.mode == "none":
        return None
    if config.mode == "aligned":
        raise GenerationError("aligned patching needs word boundaries that do not exist while "
                              "generating; generate with a static, mixed or curriculum model")
    return config.patch_size


def sampling_mask(vocab: JointVocab, modality: str | None, size: int) -> torch.Tensor:
    """[size] bool: the ids generation may produce out of `size` logits. Never the reserved ids,
    ids past the vocabulary (padding of the output layer), BOS (it opens a document, and only
    follows an EOS, where generation stops) or the pad id (a masked label, never a target, unless
    it is the EOS too: a tokenizer whose EOS is id 0); with `modality` "speech" only units and
    EOS, with "text" only text pieces and EOS."""
    ids = torch.arange(size)
    allowed = ((ids < vocab.size) & ~((ids >= vocab.text_size) & (ids < vocab.text_marker))
               & (ids != vocab.bos_id) & ((ids != vocab.pad_id) | (ids == vocab.eos_id)))
    if modality == "speech":
        allowed &= vocab.is_unit(ids) | (ids == vocab.eos_id)
    elif modality == "text":
        allowed &= ids < vocab.text_size
    return allowed


def _sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """One token id from `logits [V]`."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    # Shifted to a largest logit of 0 first: a tiny temperature then sends the others to -inf
    # instead of overflowing the largest to inf (softmax NaN).
    logits = logits.double()
    logits = (logits - logits.max()) / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= sampling.top_p  # keep the first
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


class _CachedGlobal:
    """The global model of an LSTModel over closed patches, with megatron's static KV cache."""

    def __init__(self, model, max_patches: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_patches)
        transformer = model.global_transformer
        device = next(model.parameters()).device
        self.rotary = transformer.rope.angles(max_patches, device)  # [S_max, 1, 1, d]
        self.num_patches = 0  # patches run so far

    def extend(self, new: torch.Tensor) -> torch.Tensor:
        """Run the next patches `new [n, 1, Dg]` -> their outputs `[n, 1, Dg]`.

        The prompt's patches go in one causal call. Later patches go one per call: megatron's
        static cache drops the causal mask once its offset is past 0, which is exact for one new
        position only (a text token can close two patches in one step: the short speech patch
        before it and its own).
        """
        chunks = [new] if self.num_patches == 0 else new.split(1)
        outputs = []
        for chunk in chunks:
            outputs.append(self.model.global_transformer.block(
                chunk, attention_mask=None, rotary_pos_emb=self.rotary,
                inference_context=self.context))
            self.context.sequence_len_offset += len(chunk)
        self.num_patches += len(new)
        return torch.cat(outputs)


class _CachedLST:
    """An LSTModel run one step at a time. The token encoder and the decoder keep sliding-window
    caches (`SlidingKVCache`, `DecoderCache`), the patch encoder and the global model
    (`_CachedGlobal`) run once per closed patch, and `step` returns what the full model returns
    for the last token. Each token goes through the encoder once and through the decoder once,
    except the last token of a short speech patch that closes when a text token ends the run:
    its decoder patch changes (see `DecoderCache`), so the decoder takes it again.

    Whatever grows with the sequence (the encoder's states of every token, the decoder's slots
    and patch ids, the global KV cache) lives in a buffer of its maximum size, `max_tokens`
    tokens or `max_patches` patches, written in place: no step copies what earlier steps
    wrote."""

    def __init__(self, model, max_patches: int, max_tokens: int, patch_size: int):
        from megatron_lst.models.local_decoder import DecoderCache
        from megatron_lst.models.local_layers import SlidingKVCache

        self.model = model
        self.max_tokens = max_tokens
        self.global_model = _CachedGlobal(model, max_patches)
        self.encoder_caches = [SlidingKVCache(layer.self_attention.core_attention.window)
                               for layer in model.token_encoder.layers]
        self.decoder_cache = DecoderCache(model.local_decoder, patch_size, max_patches,
                                          max_tokens)
        self.state_buffers: list[torch.Tensor] = []  # per encoder layer, [1, T_max, De]
        self.num_tokens = 0  # tokens encoded so far, T

    def _encode(self, new_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Run the token encoder on the next tokens `new_tokens [1, n]` -> each layer's states
        of the whole sequence, `[1, N, De]` views of the buffers."""
        seen = self.num_tokens
        total = seen + new_tokens.shape[1]
        new_states = self.model.token_encoder.forward_step(new_tokens, seen,
                                                           self.encoder_caches)  # [1, n, De] each
        if not self.state_buffers:  # the encoder's dtype and width are known now
            self.state_buffers = [states.new_empty(1, self.max_tokens, states.shape[-1])
                                  for states in new_states]
        for buffer, states in zip(self.state_buffers, new_states, strict=True):
            buffer[:, seen:total] = states
        self.num_tokens = total
        return [buffer[:, :total] for buffer in self.state_buffers]

    def step(self, new_tokens: torch.Tensor, patching: GenerationPatching) -> torch.Tensor:
        """new_tokens `[1, n]`: the tokens after those of the last call; `patching`: the
        generation patching of the whole sequence, these tokens included -> logits `[V]` of
        the next token. Nothing here reads the whole sequence: the new tokens, the patches they
        closed and the decoder patch ids of the last few tokens."""
        from megatron.core import parallel_state, tensor_parallel

        model = self.model
        # Decoder patch ids of the cached tokens a new token can move (the last p at most, see
        # `DecoderCache.changeable_from`) and of the new tokens, on the host; those the decoder
        # takes go to the device before this step queues any work: a host-to-device copy waits
        # for the work queued before it.
        start = self.decoder_cache.changeable_from
        patch_ids = np.asarray(patching.decoder_patch_ids(start), dtype=np.int64)  # [N - start]
        keep = self.decoder_cache.first_changed(patch_ids)
        self.decoder_cache.rollback(keep)
        self.decoder_cache.add_patch_ids(patch_ids[keep - start:])
        decoder_patch_ids = torch.from_numpy(patch_ids[None, keep - start:]).to(
            new_tokens.device)  # [1, N - keep]
        layer_states = self._encode(new_tokens)  # per encoder layer, [1, N, De]
        bounds = patching.bounds  # [P + 1], read at the new closed patches only
        closed = range(self.global_model.num_patches, patching.num_patches - 1)  # last is open
        new_global = layer_states[-1].new_zeros(1, 0, model.config.hidden_size)  # [1, m, Dg]
        if closed:
            vectors = torch.cat([model.patch_encoder.encode_patch(layer_states, bounds, patch)
                                 for patch in closed], dim=1)  # [1, m, k*De]
            if model.global_input_projection is not None:
                vectors = model.global_input_projection(vectors)
            new_global = self.global_model.extend(vectors.transpose(0, 1)).transpose(0, 1)
        hidden = model.local_decoder.forward_step(
            layer_states[-1][:, keep:], new_global, decoder_patch_ids, patching.num_patches,
            keep, self.decoder_cache)  # [1, N - keep, Dd]
        logits, _ = model.output_layer(hidden[:, -1:])  # [1, 1, V/tp]
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            logits, parallel_state.get_tensor_model_parallel_group())
        return logits[0, -1].float()


class _CachedBaseline:
    """The token baseline (GPTModel) with megatron's static KV cache: one position per token."""

    def __init__(self, model, max_tokens: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_tokens)

    def step(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens `[1, n]`: the tokens after those of the last call -> logits `[V]` of the
        next token."""
        from megatron.core.models.gpt import GPTModel

        logits = GPTModel.forward(self.model, input_ids=new_tokens, position_ids=None,
                                  attention_mask=None, inference_context=self.context,
                                  runtime_gather_output=True)
        self.context.sequence_len_offset += new_tokens.shape[1]
        return logits[0, -1].float()


@torch.no_grad()
def generate(model, prompt: np.ndarray, vocab: JointVocab, patching: PatchingConfig,
             sampling: SamplingConfig = SamplingConfig(), use_cache: bool = True,
             keep_logits: bool = False) -> GenerationResult:
    """Continue `prompt` (joint ids, starting with BOS) on one model chunk (an `LSTModel` or
    `TokenBaselineModel`, megatron wrappers allowed; TP=1 or more, PP=1).

    `patching`: the model's patching config (its static p is used; see the module docstring).
    Stops at EOS, after `sampling.max_new_tokens` tokens, or at the model's context (see the
    module docstring). Only the tokens `sampling_mask` allows are sampled. A model with packed-
    document rules (`LSTConfig.documents`) takes a prompt of one document: no EOS in it. The
    model runs in eval mode; the training mode of each of its modules is restored on return.
    """
    model, prompt, patches = _checked(model, prompt, vocab, patching)
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return _generate(model, prompt, vocab, patches, sampling, use_cache, keep_logits)
    finally:  # a caller in a training loop keeps its dropout
        for module, training in was_training:
            module.training = training


def check_prompt(model, prompt: np.ndarray, vocab: JointVocab, patching: PatchingConfig) -> None:
    """Raise the GenerationError `generate` would raise on `prompt` before running the model (a
    prompt past the model's context is a PromptTooLongError): a batch of prompts is checked
    whole before the first is generated."""
    _checked(model, prompt, vocab, patching)


def _checked(model, prompt: np.ndarray, vocab: JointVocab,
             patching: PatchingConfig) -> tuple[Any, np.ndarray, GenerationPatching | None]:
    """`(unwrapped model, prompt as int64, the prompt's patches: None for the baseline)` once
    `prompt` passed `check_prompt`'s checks."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_lst.models.lst_model import LSTModel

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise GenerationError("generation runs with pipeline parallel size 1; load the "
                              "checkpoint with --pipeline-model-parallel-size 1")
    prompt = np.asarray(prompt, dtype=np.int64)
    vocab.check_ids(prompt, where="prompt")
    if not len(prompt) or prompt[0] != vocab.bos_id:
        raise GenerationError(f"a prompt starts with BOS ({vocab.bos_id}); got {prompt[:1]}")
    model = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
    _check_one_document(prompt, vocab, model.lst_config.documents)
    patches = None
    if isinstance(model, LSTModel):
        patches = GenerationPatching(vocab, generation_patch_size(patching))
        for token in prompt.tolist():
            patches.append(token)
    positions = len(prompt) if patches is None else patches.num_patches
    if positions > model.lst_config.max_sequence_length:
        raise PromptTooLongError(_prompt_too_long(positions, model.lst_config, patches is not None))
    return model, prompt, patches


def _generate(model, prompt: np.ndarray, vocab: JointVocab, patching: GenerationPatching | None,
              sampling: SamplingConfig, use_cache: bool, keep_logits: bool) -> GenerationResult:
    """`generate`'s loop on the unwrapped `model`, in eval mode; `patching` holds the prompt's
    patches (None: the token baseline) and grows with the sequence."""
    is_lst = patching is not None
    patch_size = patching.patch_size if is_lst else None
    device = next(model.parameters()).device
    # Global positions the caches hold: generation stops at the model's context, so a large
    # max_new_tokens must not size them (it allocated caches, and RoPE angles, of its length).
    context = model.lst_config.max_sequence_length
    max_length = min(len(prompt) + sampling.max_new_tokens + 1, context)
    cache = None
    if use_cache and is_lst:
        # Tokens fed to the model: all but the last generated one. Within the context they are
        # fewer than its positions times p, the most tokens a patch holds.
        max_tokens = min(len(prompt) + sampling.max_new_tokens, context * patch_size)
        cache = _CachedLST(model, max_length, max_tokens, patch_size)
    elif use_cache:
        cache = _CachedBaseline(model, max_length)
    generator = torch.Generator().manual_seed(sampling.seed)

    allowed = None  # [V] bool, once the logits' size is known
    sequence = prompt.tolist()
    result = GenerationResult(np.zeros(0, np.int64), 0, 0.0, False)
    closed = None  # global positions of the sequence so far: closed patches, or tokens
    fed = 0  # tokens of `sequence` the cache has seen
    start = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        if is_lst:
            for token in sequence[patching.num_tokens:]:
                patching.append(token)
        positions = patching.num_patches if is_lst else len(sequence)
        if positions > model.lst_config.max_sequence_length:  # not the prompt: `_checked`
            result.stopped_at_context_limit = True
            break
        if cache is not None:
            new_tokens = torch.tensor([sequence[fed:]], dtype=torch.int64, device=device)  # [1, n]
            fed = len(sequence)
            logits = cache.step(new_tokens, patching) if is_lst else cache.step(new_tokens)
        else:  # the whole model on the whole sequence, the reference implementation's way
            tokens = torch.tensor([sequence], dtype=torch.int64, device=device)  # [1, N]
            lengths = None
            if is_lst:
                lengths = torch.from_numpy(generation_patch_lengths(
                    np.asarray(sequence), vocab, patch_size))[None].to(device)  # [1, P]
            logits = model(tokens, lengths)[0, -1]
        # What the cached loop runs the global model on, counted the same with or without it
        # (re-running the whole sequence counted every position again, the prompt's included).
        now_closed = positions - 1 if is_lst else positions
        if closed is not None:  # the prompt's own positions are not counted
            result.global_steps += now_closed - closed
        closed = now_closed
        logits = logits.float().cpu()
        if allowed is None:
            allowed = sampling_mask(vocab, sampling.modality, logits.numel())
        logits = logits.masked_fill(~allowed, float("-inf"))
        if logits.isnan().any():  # argmax took a NaN for the best token, sampling failed
            raise GenerationError(
                f"the model's logits after {len(sequence)} tokens are not numbers; its weights "
                f"hold NaN or inf (a diverged run?): generate with another checkpoint")
        if keep_logits:
            result.step_logits.append(logits)
        token = _sample(logits, sampling, generator)
        sequence.append(token)
        if token == vocab.eos_id:
            result.stopped_at_eos = True
            break
    result.seconds = time.perf_counter() - start
    result.tokens = np.asarray(sequence[len(prompt):], dtype=np.int64)
    return result


def _check_one_document(prompt: np.ndarray, vocab: JointVocab, documents) -> None:
    """A model trained on packed documents (`LSTConfig.documents`) reads nothing before an EOS
    and may restart its positions there, which the cached loop does not do: refuse a prompt of
    several documents for such a model rather than let the two loops disagree."""
    if documents is None:
        return
    eos_at = np.flatnonzero(prompt == vocab.eos_id)
    if len(eos_at):
        raise GenerationError(
            f"the prompt holds EOS ({vocab.eos_id}) at position {int(eos_at[0])}: this model "
            "masks packed documents (--reset-attention-mask / --reset-position-ids), so what "
            "comes before an EOS is another document, which the continuation cannot see; give "
            "one document as the prompt (what follows its last EOS, starting with BOS)")


def _prompt_too_long(positions: int, config, is_lst: bool) -> str:
    what = "patches (with the next token's)" if is_lst else "tokens"
    return (f"the prompt needs {positions} global positions, {what}, but the model's context is "
            f"{config.max_sequence_length} (--max-position-embeddings); shorten the prompt")
