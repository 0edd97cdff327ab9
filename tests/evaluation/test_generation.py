"""Generation: the KV-cached loop gives exactly the tokens of re-running the whole model each
step (greedy), for LST and the token baseline; patch boundaries; sampling."""

import dataclasses
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_cases import tiny_model

from megatron_lst.data.interleave import InterleavedDocument
from megatron_lst.evaluation.generation import (
    GenerationError,
    GenerationPatching,
    SamplingConfig,
    _sample,
    generate,
    generation_patch_lengths,
    sampling_mask,
)
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.patching import PatchingConfig, static_patch_lengths
from megatron_lst.tokenizer.vocab import JointVocab

STATIC = PatchingConfig("static", patch_size=3)
# Mostly units, so that random models generate speech runs and text between them.
VOCAB = JointVocab(text_size=40, num_units=200)


def vocab() -> JointVocab:
    return VOCAB


@pytest.fixture(scope="module")
def models(single_rank):
    return {kind: tiny_model(kind, VOCAB.size, seed=5) for kind in ("lst", "baseline")}


def prompts():
    v = vocab()
    units = v.units_to_ids(np.array([3, 3, 7, 1, 0, 9, 9]))
    return {
        "speech": np.array([v.bos_id, v.speech_marker, *units]),
        "text to speech": np.array([v.bos_id, v.text_marker, 20, 31, 5, v.speech_marker]),
        "text": np.array([v.bos_id, v.text_marker, 20, 31, 5, 7]),
        "speech to text": np.array([v.bos_id, v.speech_marker, *units[:4], v.text_marker]),
    }


@pytest.mark.parametrize("kind", ["lst", "baseline"])
@pytest.mark.parametrize("prompt", sorted(prompts()))
def test_greedy_cache_gives_the_tokens_of_full_recomputation(models, kind, prompt):
    model, ids = models[kind], prompts()[prompt]
    sampling = SamplingConfig(max_new_tokens=24)
    cached = generate(model, ids, vocab(), STATIC, sampling, use_cache=True, keep_logits=True)
    full = generate(model, ids, vocab(), STATIC, sampling, use_cache=False, keep_logits=True)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    assert len(cached.step_logits) == len(cached.tokens)
    for a, b in zip(cached.step_logits, full.step_logits, strict=True):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)) and (a - b)[finite].abs().max() < 1e-5
    vocab().check_ids(cached.tokens)  # reserved ids are never produced


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_sampled_cache_matches_across_speech_and_text(models, kind):
    """Sampling from the random model mixes units, pieces and markers, so speech patches close
    both at p units and early, before a text token."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=2)
    cached = generate(models[kind], prompts()["speech"], vocab(), STATIC, sampling,
                      keep_logits=True)
    full = generate(models[kind], prompts()["speech"], vocab(), STATIC, sampling, use_cache=False,
                    keep_logits=True)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    for a, b in zip(cached.step_logits, full.step_logits, strict=True):
        finite = torch.isfinite(a)
        assert (a - b)[finite].abs().max() < 1e-5
    units = vocab().is_unit(cached.tokens)
    assert units.any() and (~units).any()
    ends_short = np.flatnonzero(units[:-1] & ~units[1:])  # a speech run ends at these tokens
    assert len(ends_short)


def _never_eos(model):
    """Mask EOS in `model`'s logits (a forward hook; remove it with the returned handle), so a
    sampled generation runs to max_new_tokens instead of a seed-dependent length."""
    def mask(module, inputs, output):  # (logits [.., V], bias)
        return output[0].index_fill(-1, torch.tensor([VOCAB.eos_id]), float("-inf")), output[1]
    return model.output_layer.register_forward_hook(mask)


@pytest.mark.parametrize("kind, patch_size", [("baseline", None), ("lst", 1), ("lst", 2),
                                              ("lst", 3), ("lst", 4), ("lst", 20)])
def test_long_cached_generation_gives_the_full_models_tokens(models, kind, patch_size):
    """200 sampled tokens (past the token window of 16 and the patch window of 4 many times
    over), speech runs ending both at p units and early, for each static p: 1 (a patch per
    unit), 2-4, and 20 (a speech patch longer than the token window). The caches grow in
    place to their full size; the logits stay those of re-running the whole model."""
    model = models[kind]
    patching = PatchingConfig("none") if patch_size is None else PatchingConfig(
        "static", patch_size=patch_size)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=200, seed=3)
    handle = _never_eos(model)
    try:
        cached = generate(model, prompts()["speech"], vocab(), patching, sampling,
                          keep_logits=True)
        full = generate(model, prompts()["speech"], vocab(), patching, sampling,
                        use_cache=False, keep_logits=True)
    finally:
        handle.remove()
    assert len(cached.tokens) == 200
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    for a, b in zip(cached.step_logits, full.step_logits, strict=True):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)) and (a - b)[finite].abs().max() < 1e-5
    units = vocab().is_unit(cached.tokens)
    assert units.sum() > 60 and (~units).sum() > 5


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_cached_steps_rotate_each_global_position_once(models, monkeypatch, kind):
    """The global attention's KV cache holds rotated keys: over a cached generation every
    global position is rotated once as a query and once as a key in each layer, the prompt's in
    the prefill and each later one in its step. megatron's static cache kept keys unrotated and
    rotated the whole cache again at every step (quadratic in the length; 19% of generating 400
    tokens of the medium preset on CPU). The tokens stay the whole model's (tests above)."""
    from megatron.core.models.common.embeddings import rope_utils

    rotated = []  # positions of each rotation megatron's RoPE ran
    rotate = rope_utils._apply_rotary_pos_emb_bshd
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd",
                        lambda t, *args, **kwargs: rotated.append(t.shape[0])
                        or rotate(t, *args, **kwargs))
    model = models[kind]
    handle = _never_eos(model)
    try:
        result = generate(model, prompts()["speech"], vocab(), STATIC,
                          SamplingConfig(temperature=1.0, max_new_tokens=60, seed=2))
    finally:
        handle.remove()
    assert len(result.tokens) == 60
    prompt_positions = (len(prompts()["speech"]) if kind == "baseline"
                        else len(generation_patch_lengths(prompts()["speech"], vocab(), 3)) - 1)
    layers = model.config.num_layers
    assert rotated[:2 * layers] == [prompt_positions] * (2 * layers)
    assert rotated[2 * layers:] == [1] * (2 * layers * result.global_steps)


def test_a_megatron_that_skips_the_rotation_hook_fails_loudly(models, monkeypatch):
    """Were a megatron-core release to stop projecting through `get_query_key_value_tensors`
    under a static context, the cached keys would go unrotated: the step raises, naming the
    release, instead of generating from them."""
    from megatron.core.transformer.attention import SelfAttention

    from megatron_lst.models.global_attention import PreRotatedKeySelfAttention

    monkeypatch.setattr(PreRotatedKeySelfAttention, "get_query_key_value_tensors",
                        SelfAttention.get_query_key_value_tensors)
    with pytest.raises(RuntimeError, match=r"megatron-core \S+: SelfAttention.forward no longer "
                                           r"projects through get_query_key_value_tensors"):
        generate(models["baseline"], prompts()["speech"], vocab(), STATIC,
                 SamplingConfig(max_new_tokens=2))


def test_a_megatron_self_attention_without_the_arguments_read_is_refused_at_build(
        single_rank, monkeypatch):
    """The global block's self-attention reads `inference_context` and `rotary_pos_emb` of
    megatron's `SelfAttention.forward`: a release without them is refused when the model is
    built, naming the release and what is missing."""
    from megatron.core.transformer.attention import SelfAttention

    from megatron_lst.models import global_attention

    def forward(self, hidden_states, attention_mask, inference_context=None):
        raise AssertionError("never called")

    monkeypatch.setattr(SelfAttention, "forward", forward)
    global_attention._self_attention_forward_signature.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"megatron-core \S+: SelfAttention.forward takes "
                                               r"no \['rotary_pos_emb'\]"):
            tiny_model("baseline", VOCAB.size)
    finally:
        global_attention._self_attention_forward_signature.cache_clear()


def test_cached_steps_copy_no_more_when_the_sequence_grows(models, monkeypatch):
    """The caches that grow with the sequence are buffers of their full size written in place:
    the largest tensor generation's own code concatenates (the sliding windows' keys, one
    step's new patches) is as large after 240 tokens as after 60. Growing the caches by
    concatenation copied the whole sequence's states at every step."""
    import sys

    largest = []
    concatenate = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        out = concatenate(tensors, *args, **kwargs)
        if sys._getframe(1).f_globals["__name__"].startswith(("megatron_lst", "lst_kernels")):
            largest[-1] = max(largest[-1], out.numel())
        return out

    monkeypatch.setattr(torch, "cat", recording_cat)
    handle = _never_eos(models["lst"])
    try:
        for length in (60, 240):
            largest.append(0)
            result = generate(models["lst"], prompts()["speech"], vocab(), STATIC,
                              SamplingConfig(temperature=1.0, max_new_tokens=length, seed=1))
            assert len(result.tokens) == length
    finally:
        handle.remove()
    assert largest[0] == largest[1] > 0


class ConcatenatingKVCache:
    """The sliding-window cache as it was: concatenated the new keys and values to the kept
    ones at every step. The reference the in-place `SlidingKVCache` must match bit for bit."""

    def __init__(self, window: int, spare: int = 0):
        self.window, self.spare = window, spare
        self.keys = self.values = None

    def extend(self, k, v):
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
        first_kept = max(k.shape[1] - (self.window - 1 + self.spare), 0)
        self.keys, self.values = k[:, first_kept:], v[:, first_kept:]
        return k, v

    def drop_last(self, count: int) -> None:
        if count and self.keys is not None:
            self.keys, self.values = self.keys[:, :-count], self.values[:, :-count]


@pytest.mark.parametrize("window, spare", [(1, 0), (4, 0), (16, 0), (16, 3), (3, 5)])
def test_sliding_cache_writes_in_place_what_concatenation_gave(window, spare):
    """Calls of 1 to 9 tokens (a prompt, steps, a decoder's rollback and retake): the keys and
    values each call returns are those of the concatenating cache, and no call concatenates:
    the buffer is written in place, its kept tokens moved to its front now and then."""
    from models.host_syncs import count_aten_ops

    from megatron_lst.models.local_layers import SlidingKVCache

    rng = np.random.default_rng(window + spare)
    cache, reference = SlidingKVCache(window, spare), ConcatenatingKVCache(window, spare)
    calls, ops = [9, *rng.integers(1, 3, 120).tolist()], Counter()
    for n in calls:
        k, v = torch.randn(1, n, 2, 4), torch.randn(1, n, 2, 4)  # [1, n, G, d]
        with count_aten_ops() as call_ops:
            cached = cache.extend(k, v)
        ops += call_ops
        for got, expected in zip(cached, reference.extend(k, v), strict=True):
            assert torch.equal(got, expected)
        back = int(rng.integers(0, spare + 1))
        cache.drop_last(back)
        reference.drop_last(back)
        assert torch.equal(cache.keys, reference.keys)
        assert torch.equal(cache.values, reference.values)
    assert ops[torch.ops.aten.cat.default] == 0
    # Two writes a call, and two moves of the kept tokens per `window - 1 + spare` tokens.
    assert ops[torch.ops.aten.copy_.default] <= 2 * len(calls) + 2 * (
        sum(calls) // max(window - 1 + spare, 1) + 1)
    with pytest.raises(ValueError, match=f"the cache keeps {spare} spare"):
        cache.drop_last(spare + 1)


@pytest.mark.parametrize("patch_size", [1, 3, 20])
def test_cached_generation_is_bit_identical_to_concatenating_caches(models, monkeypatch,
                                                                    patch_size):
    """The in-place caches give the very logits (not merely close ones) of the caches that
    concatenated at every step, over 120 sampled tokens whose speech runs end early (the
    decoder takes a token back and again) and at p units."""
    from megatron_lst.models import local_decoder, local_layers

    patching = PatchingConfig("static", patch_size=patch_size)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=120, seed=7)
    handle = _never_eos(models["lst"])
    try:
        in_place = generate(models["lst"], prompts()["speech"], vocab(), patching, sampling,
                            keep_logits=True)
        monkeypatch.setattr(local_layers, "SlidingKVCache", ConcatenatingKVCache)
        monkeypatch.setattr(local_decoder, "SlidingKVCache", ConcatenatingKVCache)
        concatenated = generate(models["lst"], prompts()["speech"], vocab(), patching,
                                sampling, keep_logits=True)
    finally:
        handle.remove()
    np.testing.assert_array_equal(in_place.tokens, concatenated.tokens)
    for a, b in zip(in_place.step_logits, concatenated.step_logits, strict=True):
        assert torch.equal(a, b)
    units = vocab().is_unit(in_place.tokens)
    assert len(in_place.tokens) == 120 and (units[:-1] & ~units[1:]).any()


def test_a_cached_step_waits_for_the_device_only_to_sample(models, monkeypatch):
    """On CUDA each read of a tensor by the host waits for the GPU (tests/models/host_syncs.py),
    and so does a tensor made on the GPU from host values (`torch.tensor(..., device=)`) once
    work is queued. A cached LST step queues the whole model without either; the only reads are
    of each step's logits, to sample from them (`_generate`, `_sample`), where the next step's
    tokens go to the device too. The decoder copied each token's patch ids back to the host,
    and the patch encoder each closed patch's length to the device, waiting mid-step for the
    encoder and the global model. Left out: the CPU kernels and the CPU-only check of patch
    lengths, which never run on CUDA."""
    import inspect
    import sys
    from pathlib import Path

    import lst_kernels.ranges
    from models.host_syncs import project_file, record_host_syncs

    from megatron_lst.evaluation import generation

    def lines(function):
        source, first = inspect.getsourcelines(function)
        return range(first, first + len(source))

    sampling_reads = {("megatron_lst/evaluation/generation.py", line)
                      for function in (generation._generate, generation._sample)
                      for line in lines(function)}
    cpu_only = {(project_file(lst_kernels.ranges.__file__), line)
                for line in lines(lst_kernels.ranges._refuse_negative_lengths)}
    copies = []  # (file, line) of each torch.tensor(..., device=) call of the project's code
    make_tensor = torch.tensor

    def recording_tensor(*args, **kwargs):
        frame = sys._getframe(1)
        if kwargs.get("device") is not None and frame.f_globals["__name__"].startswith(
                ("megatron_lst", "lst_kernels")):
            copies.append((frame.f_code.co_filename, frame.f_lineno))
        return make_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    handle = _never_eos(models["lst"])
    try:
        with record_host_syncs() as reads:
            result = generate(models["lst"], prompts()["speech"], vocab(), STATIC,
                              SamplingConfig(temperature=1.0, max_new_tokens=30, seed=1))
    finally:
        handle.remove()
    assert len(result.tokens) == 30
    step_reads = {site: count for site, count in reads.items()
                  if site[:2] not in sampling_reads | cpu_only
                  and not site[0].endswith("patch_attention_reference.py")}
    assert step_reads == {}
    assert sum(reads[site] for site in reads if site[:2] in sampling_reads) == 3 * 30
    assert {(Path(file).name, line in lines(generation._generate)) for file, line in copies} == {
        ("generation.py", True)}


def test_cached_steps_read_only_the_new_token_and_the_last_patches(models, monkeypatch):
    """A cached step's host work does not grow with the sequence: the cache takes the new token
    only, each token is patched once (no step recomputes the whole sequence's patching or
    decoder patch ids), and the decoder patch ids a step computes are those of the new token
    and the last p decoded ones, after 60 tokens as after 240. Rebuilding the token tensor, the patching and the patch ids
    of the whole sequence every step made generating N tokens O(N^2) on the host."""
    from megatron_lst.evaluation import generation
    from megatron_lst.models.local_decoder import DecoderCache

    def whole_sequence(*args, **kwargs):
        raise AssertionError("the cached loop recomputed the whole sequence's patching")

    for name in ("generation_patch_lengths", "static_patch_lengths"):
        monkeypatch.setattr(generation, name, whole_sequence)
    monkeypatch.setattr("lst_kernels.patch_ids_from_lengths", whole_sequence)
    appended, new_tokens, compared = [], [], []  # per call or step of the current run
    append, step, first_changed = (GenerationPatching.append, generation._CachedLST.step,
                                   DecoderCache.first_changed)
    monkeypatch.setattr(GenerationPatching, "append",
                        lambda self, token: appended.append(token) or append(self, token))
    monkeypatch.setattr(generation._CachedLST, "step", lambda self, tokens, patching: (
        new_tokens.append(tokens.shape[1]) or step(self, tokens, patching)))
    monkeypatch.setattr(DecoderCache, "first_changed", lambda self, patch_ids: (
        compared.append(len(patch_ids)) or first_changed(self, patch_ids)))
    ids = prompts()["speech"]
    handle = _never_eos(models["lst"])
    try:
        for length in (60, 240):
            for log in (appended, new_tokens, compared):
                log.clear()
            result = generate(models["lst"], ids, vocab(), PatchingConfig("static", patch_size=4),
                              SamplingConfig(temperature=1.0, max_new_tokens=length, seed=1))
            assert len(result.tokens) == length
            fed = np.concatenate([ids, result.tokens])[:-1]  # the last token is never fed
            assert appended == fed.tolist()
            assert new_tokens == [len(ids)] + [1] * (length - 1)
            # The decoder patch ids of the new token and of the last p = 4 decoded ones.
            assert compared == [len(ids)] + [1 + 4] * (length - 1)
    finally:
        handle.remove()


@pytest.mark.parametrize("patching", [
    PatchingConfig("mixed", patch_size=3, prob_static=0.0),
    PatchingConfig("curriculum", patch_size=3, aligned_until_step=10, static_from_step=20)])
def test_mixed_and_curriculum_models_generate_with_static_patching(models, patching):
    """As they are patched at inference, even a mixed model that trained aligned throughout."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=30, seed=4)
    mixed = generate(models["lst"], prompts()["speech"], vocab(), patching, sampling,
                     keep_logits=True)
    static = generate(models["lst"], prompts()["speech"], vocab(), STATIC, sampling,
                      keep_logits=True)
    np.testing.assert_array_equal(mixed.tokens, static.tokens)
    for a, b in zip(mixed.step_logits, static.step_logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_long_generation_computes_a_few_rope_tables(single_rank, monkeypatch, use_cache):
    """Each step asks the local models' RoPE for one more position; a table kept per length
    made one per step (229 tables and 5 MB per local model after 229 tokens of this tiny one,
    growing with the square of the length), now a few of doubling lengths."""
    from megatron_lst.models import rope

    calls = []
    original = rope.rotary_angles
    monkeypatch.setattr(rope, "rotary_angles",
                        lambda seq_len, *args: calls.append(seq_len) or original(seq_len, *args))
    model = tiny_model("lst", VOCAB.size, seed=5)
    handle = _never_eos(model)
    try:
        result = generate(model, prompts()["speech"], vocab(), STATIC,
                          SamplingConfig(temperature=1.0, max_new_tokens=150, seed=1),
                          use_cache=use_cache)
    finally:
        handle.remove()
    assert len(result.tokens) == 150
    assert len(calls) <= 3 * 9  # encoder, decoder and global tables of 1, 2, 4 .. 256 positions


def test_local_models_see_each_token_once(models, monkeypatch):
    """The cached loop runs the token encoder on each token once, and the decoder on each token
    once plus the last token of each short speech patch that a text token closes (its decoder
    patch moves to the one that reads the closed patch)."""
    from megatron_lst.models.local_decoder import LocalDecoder
    from megatron_lst.models.local_encoder import TokenEncoder

    counts = {"encoder": 0, "decoder": 0}

    def counting(cls, name, part):
        original = getattr(cls, name)

        def wrapper(self, tokens_or_states, *args, **kwargs):
            counts[part] += tokens_or_states.shape[1]
            return original(self, tokens_or_states, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    counting(TokenEncoder, "forward_step", "encoder")
    counting(LocalDecoder, "forward_step", "decoder")
    ids = prompts()["speech"]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=2)
    result = generate(models["lst"], ids, vocab(), STATIC, sampling)
    sequence = np.concatenate([ids, result.tokens])[:-1]  # the last token is never fed back
    assert counts["encoder"] == len(sequence)
    lengths = static_patch_lengths(InterleavedDocument.from_tokens(sequence, vocab()),
                                   STATIC.patch_size)
    last = np.cumsum(lengths)[:-1] - 1  # the last token of each patch a token follows
    patchable = vocab().is_patchable_static(sequence)
    closed_short = (last + 1 >= len(ids)) & (lengths[:-1] < STATIC.patch_size) & patchable[last]
    assert closed_short.sum() > 0
    assert counts["decoder"] == len(sequence) + closed_short.sum()


@pytest.mark.parametrize("use_cache", [True, False])
def test_global_model_runs_once_per_closed_patch(models, use_cache):
    """Without the cache the count is the same: re-running the whole sequence each step counted
    every position again, the prompt's too (quadratic in the length, not the model's steps)."""
    ids = prompts()["speech"]
    sampling = SamplingConfig(max_new_tokens=20)
    result = generate(models["lst"], ids, vocab(), STATIC, sampling, use_cache=use_cache)
    sequence = np.concatenate([ids, result.tokens])
    closed_before = len(generation_patch_lengths(ids, vocab(), 3)) - 1
    closed_after = len(generation_patch_lengths(sequence[:-1], vocab(), 3)) - 1
    assert result.global_steps == closed_after - closed_before > 0
    baseline = generate(models["baseline"], ids, vocab(), STATIC, sampling, use_cache=use_cache)
    assert baseline.global_steps == len(baseline.tokens) - 1


def test_generation_patches_are_the_static_patches_of_the_result():
    v = vocab()
    rng = np.random.default_rng(0)
    kinds = rng.integers(0, 3, 60)  # 0 text piece, 1 unit, 2 mode marker
    sequence = [v.bos_id, v.speech_marker]
    for kind in kinds:
        if kind == 2:
            sequence.append(v.speech_marker if v.is_unit(sequence[-1]) is False else v.text_marker)
        sequence.append(int(v.unit_offset + rng.integers(v.num_units)) if kind == 1
                        else int(rng.integers(3, v.text_size)))
    sequence = np.array(sequence)
    expected = static_patch_lengths(InterleavedDocument.from_tokens(sequence, v), 3)
    # Predicting the last token: the patches of the prefix plus its slot are the final ones.
    np.testing.assert_array_equal(generation_patch_lengths(sequence[:-1], v, 3), expected)
    assert generation_patch_lengths(sequence[:1], v, None).tolist() == [1, 1]


@pytest.mark.parametrize("patch_size", [1, 2, 3, 4, 5])
def test_generation_patching_a_token_at_a_time_is_generation_patch_lengths(patch_size):
    """After each token: the boundaries are those of `generation_patch_lengths` of the sequence
    so far, and the decoder patch ids those `patch_ids_from_lengths` gives the decoder (speech
    runs of every length, ending in text or in a marker; sequences that start with speech,
    whose first patch is longer than one token, too)."""
    from lst_kernels import patch_ids_from_lengths

    v = vocab()
    rng = np.random.default_rng(patch_size)
    for first in (v.bos_id, v.speech_marker):
        sequence = [first]
        while len(sequence) < 120:
            if rng.random() < 0.5:
                run = v.unit_offset + rng.integers(v.num_units, size=rng.integers(0, 9))
                sequence += [v.speech_marker, *run.tolist()]
            sequence += rng.choice([v.text_marker, 20, 31, 5], size=rng.integers(1, 3)).tolist()
        patching = GenerationPatching(v, patch_size)
        for n, token in enumerate(sequence, start=1):
            patching.append(token)
            lengths = generation_patch_lengths(np.array(sequence[:n]), v, patch_size)
            assert patching.bounds == [0, *np.cumsum(lengths).tolist()]
            assert patching.num_patches == len(lengths) and patching.num_tokens == n
            decoder_ids = patch_ids_from_lengths(torch.from_numpy(lengths)[None, 1:], n)[0]
            assert patching.decoder_patch_ids(0) == decoder_ids.tolist()
            tail = max(n - 2, 0)
            assert patching.decoder_patch_ids(tail) == decoder_ids[tail:].tolist()


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert _sample(logits, SamplingConfig(), generator) == 1
    top2 = {_sample(logits, SamplingConfig(temperature=1.0, top_k=2), generator) for _ in range(50)}
    assert top2 == {1, 2}
    nucleus = {_sample(logits, SamplingConfig(temperature=1.0, top_p=0.3), generator)
               for _ in range(50)}
    assert nucleus == {1}
    with pytest.raises(GenerationError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_a_tiny_temperature_samples_the_largest_logit():
    """logits / temperature overflowed to inf: softmax NaN, torch.multinomial's RuntimeError."""
    logits = torch.tensor([0.5, 3.0, -2.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    sampling = SamplingConfig(temperature=1e-320, top_p=0.5)
    assert {_sample(logits, sampling, generator) for _ in range(10)} == {1}


def test_refusals(models):
    with pytest.raises(GenerationError, match="aligned patching"):
        generate(models["lst"], prompts()["speech"], vocab(), PatchingConfig("aligned"))
    with pytest.raises(GenerationError, match="starts with BOS"):
        generate(models["lst"], prompts()["speech"][1:], vocab(), STATIC)


def test_prompts_and_speech_only_sampling(models):
    from eval_cases import tokenizer
    from eval_cases import vocab as text_vocab

    from megatron_lst.evaluation.generation import build_prompt

    v = VOCAB
    assert build_prompt(v, units=[1, 2], continue_in="text").tolist() == [
        v.bos_id, v.speech_marker, v.unit_offset + 1, v.unit_offset + 2, v.text_marker]
    tv, tok = text_vocab(), tokenizer()
    assert build_prompt(tv, tok, text="the dog", continue_in="speech").tolist() == [
        tv.bos_id, tv.text_marker, *tok.encode("the dog"), tok.space_id, tv.speech_marker]
    # Whitespace around the text encoded to word-boundary pieces: "<t> space", "space, space, <s>"
    for text in ("the dog ", "the dog\n", " the dog"):
        assert tok.encode(text) != tok.encode("the dog")
        for continue_in in ("speech", None):
            assert (build_prompt(tv, tok, text=text, continue_in=continue_in).tolist()
                    == build_prompt(tv, tok, text="the dog", continue_in=continue_in).tolist())
    with pytest.raises(GenerationError, match="exactly one"):
        build_prompt(v)
    # Each was generated from BOS and a marker alone, as if a prompt had been given.
    for text in ("", " \t"):
        with pytest.raises(GenerationError, match=re.escape(f"the text prompt {text!r} is empty")):
            build_prompt(tv, tok, text=text)
    with pytest.raises(GenerationError, match="the tokenizer turns the text prompt 'x' into no"):
        build_prompt(tv, SimpleNamespace(encode=lambda text: []), text="x")
    # A byte that is not UTF-8 on the command line reaches argv as a lone surrogate: SentencePiece
    # raised a RuntimeError naming no input.
    with pytest.raises(GenerationError, match=r"the text prompt holds '\\udcff' at character 4, "
                                              r"a byte that is not UTF-8"):
        build_prompt(tv, tok, text="the \udcff dog")
    with pytest.raises(GenerationError, match="the unit prompt holds no units"):
        build_prompt(v, units=np.zeros(0, np.int64))
    # The vocabulary's own error told the user to pass --num-units, which lst-generate lacks.
    for unit in (-1, v.num_units):
        with pytest.raises(GenerationError, match=re.escape(
                f"the unit prompt holds unit {unit}, outside the model's codebook "
                f"0..{v.num_units - 1}; give units made with the codebook the model was trained "
                f"on ({v.num_units} units)")):
            build_prompt(v, units=[3, unit])
    speech = generate(models["lst"], prompts()["text to speech"], v, STATIC,
                      SamplingConfig(temperature=1.0, max_new_tokens=30, modality="speech"))
    assert (v.is_unit(speech.tokens) | (speech.tokens == v.eos_id)).all()


def test_a_byte_order_mark_before_a_text_prompt_is_not_text():
    """Text read from a file saved with a BOM (`--prompt-text "$(cat prompt.txt)"`) starts with
    U+FEFF, which the tokenizer spelled as byte pieces before the prompt (and a BOM alone was a
    prompt); item files drop it, and so do text prompts."""
    from eval_cases import tokenizer
    from eval_cases import vocab as text_vocab

    from megatron_lst.evaluation.generation import build_prompt, check_text_prompt

    tv, tok = text_vocab(), tokenizer()
    assert tok.encode("\ufeffthe dog") != tok.encode("the dog")
    for continue_in in ("speech", None):
        assert (build_prompt(tv, tok, text="\ufeffthe dog\n", continue_in=continue_in).tolist()
                == build_prompt(tv, tok, text="the dog", continue_in=continue_in).tolist())
    for text in ("\ufeff", "\ufeff \n"):
        for check in (check_text_prompt, lambda text: build_prompt(tv, tok, text=text)):
            with pytest.raises(GenerationError, match="is empty; give the text to continue"):
                check(text)


def test_sampling_mask():
    v = VOCAB
    ids = torch.arange(v.size + 8)  # an output layer padded past the vocabulary
    free, speech, text = (sampling_mask(v, m, len(ids)) for m in (None, "speech", "text"))
    reserved = (ids >= v.text_size) & (ids < v.text_marker)
    # BOS and the pad id were sampled freely: an untrained model's first token was the pad (unk)
    never = reserved | (ids == v.bos_id) | (ids == v.pad_id)
    assert torch.equal(free, (ids < v.size) & ~never)
    assert torch.equal(speech, v.is_unit(ids) | (ids == v.eos_id))
    assert torch.equal(text, (ids < v.text_size) & (ids != v.bos_id) & (ids != v.pad_id))
    with pytest.raises(GenerationError, match="modality"):
        SamplingConfig(modality="units")


def test_sampling_mask_allows_an_eos_that_is_the_pad_id():
    """A tokenizer whose EOS is id 0 (SentencePiece trained with eos_id=0) loads with EOS = pad
    id 0: the EOS was masked as the pad, and generation never stopped at EOS."""
    v = JointVocab(VOCAB.text_size, VOCAB.num_units, pad_id=0, bos_id=1, eos_id=0)
    for modality in (None, "speech", "text"):
        assert sampling_mask(v, modality, v.size)[0]


@pytest.mark.parametrize("modality, prompt", [("speech", "text to speech"),
                                              ("text", "speech to text")])
def test_greedy_generation_keeps_to_the_modality(models, modality, prompt):
    v = vocab()
    result = generate(models["lst"], prompts()[prompt], v, STATIC,
                      SamplingConfig(max_new_tokens=16, modality=modality))
    body = result.tokens[:-1] if result.stopped_at_eos else result.tokens
    assert len(body) >= 1
    if modality == "speech":
        assert v.is_unit(body).all()
    else:
        assert (body < v.text_size).all() and not np.isin(body, [v.bos_id, v.pad_id]).any()


def _positions(kind: str, sequence: np.ndarray) -> int:
    """Global positions a model needs to predict the token after `sequence`."""
    if kind == "baseline":
        return len(sequence)
    return len(generation_patch_lengths(sequence, vocab(), STATIC.patch_size))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_whose_logits_are_nan_is_refused(single_rank, temperature):
    """Greedy decoding took the NaN for the best token (garbage, silently); sampling was a
    torch.multinomial RuntimeError traceback."""
    model = tiny_model("lst", VOCAB.size, seed=5)
    with torch.no_grad():
        model.output_layer.weight[VOCAB.text_marker + 3] = float("nan")
    with pytest.raises(GenerationError, match=r"the model's logits after 9 tokens are not "
                                              r"numbers; its weights hold NaN or inf"):
        generate(model, prompts()["speech"], vocab(), STATIC,
                 SamplingConfig(temperature=temperature, max_new_tokens=4))


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_a_prompt_longer_than_the_context_is_refused(models, kind, monkeypatch):
    model, prompt = models[kind], prompts()["text"]
    context = _positions(kind, prompt) - 1
    monkeypatch.setattr(model, "lst_config",
                        dataclasses.replace(model.lst_config, max_sequence_length=context))
    with pytest.raises(GenerationError, match=rf"the prompt needs {context + 1} global "
                                              rf"positions.* context is {context} .*shorten"):
        generate(model, prompt, vocab(), STATIC, SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_generation_stops_at_the_context_limit(models, kind, use_cache, monkeypatch):
    model, prompt, context = models[kind], prompts()["text"], 12
    monkeypatch.setattr(model, "lst_config",
                        dataclasses.replace(model.lst_config, max_sequence_length=context))
    # The caches were sized by max_new_tokens: a large one failed to allocate them
    result = generate(model, prompt, vocab(), STATIC,
                      SamplingConfig(max_new_tokens=10**12, modality="text"), use_cache=use_cache)
    assert result.stopped_at_context_limit and not result.stopped_at_eos
    sequence = np.concatenate([prompt, result.tokens])
    assert _positions(kind, sequence[:-1]) <= context < _positions(kind, sequence)


def test_greedy_cache_with_grouped_query_heads_and_other_head_sizes(single_rank):
    """Local and global grouped-query attention with heads of another size than hidden / heads,
    and min pooling (the one patch `encode_patch` pools as the whole row's pooling does): the
    caches keep the key/value heads, and the cached loop still gives the tokens (and logits) of
    full recomputation."""
    from eval_cases import tiny_lst_config

    from megatron_lst.models.config import GlobalModelConfig
    from megatron_lst.models.lst_model import LSTModel

    config = tiny_lst_config(VOCAB.size)
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=12)
                        for local in (config.encoder, config.decoder))
    config = dataclasses.replace(config, encoder=encoder, decoder=decoder,
                                 global_model=GlobalModelConfig(64, 2, 4, 256, 2, 10),
                                 cross_attention=dataclasses.replace(config.cross_attention,
                                                                     pooling="min"))
    torch.manual_seed(6)
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend="sdpa", kernel_backend="torch").eval()
    sampling = SamplingConfig(max_new_tokens=30)
    for ids in prompts().values():
        cached = generate(model, ids, vocab(), STATIC, sampling, use_cache=True, keep_logits=True)
        full = generate(model, ids, vocab(), STATIC, sampling, use_cache=False, keep_logits=True)
        np.testing.assert_array_equal(cached.tokens, full.tokens)
        for a, b in zip(cached.step_logits, full.step_logits, strict=True):
            finite = torch.isfinite(a)
            assert torch.equal(finite, torch.isfinite(b)) and (a - b)[finite].abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_models_with_document_rules_generate_one_document(models, kind):
    """A model trained on packed documents (--reset-attention-mask, and --reset-position-ids for
    LST) generates as the rules have it for a prompt of one document: the cached loop gives the
    whole model's tokens and logits. A prompt holding an EOS, whose earlier document the whole
    model hides (and whose positions it restarts) but the cached loop would read, is refused."""
    model = models[kind]
    plain = model.lst_config
    model.lst_config = dataclasses.replace(plain, documents=DocumentMaskingConfig(
        VOCAB.eos_id, reset_position_ids=kind == "lst"))
    try:
        sampling = SamplingConfig(max_new_tokens=16)
        for ids in prompts().values():
            cached = generate(model, ids, vocab(), STATIC, sampling, keep_logits=True)
            full = generate(model, ids, vocab(), STATIC, sampling, use_cache=False,
                            keep_logits=True)
            np.testing.assert_array_equal(cached.tokens, full.tokens)
            for a, b in zip(cached.step_logits, full.step_logits, strict=True):
                finite = torch.isfinite(a)
                torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)
        two_documents = np.concatenate([prompts()["text"], [VOCAB.eos_id], prompts()["speech"]])
        with pytest.raises(GenerationError, match=r"the prompt holds EOS \(2\) at position 6: "
                                                  r"this model masks packed documents"):
            generate(model, two_documents, vocab(), STATIC, sampling)
    finally:
        model.lst_config = plain
    generate(model, two_documents, vocab(), STATIC, SamplingConfig(max_new_tokens=2))


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_generation_runs_in_eval_mode_and_restores_each_modules_mode(models, kind):
    """generate() put the model in eval mode and left it there: a caller in a training loop
    (a sample every N iterations) went on training without dropout, without a word."""
    model = models[kind]
    modules = list(model.modules())
    seen = []  # the top module's mode at each forward step
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        model.train()
        modules[-1].eval()  # a module its owner keeps in eval mode stays so
        before = [module.training for module in modules]
        generate(model, prompts()["text"], vocab(), STATIC,
                 SamplingConfig(max_new_tokens=3), use_cache=False)
        assert seen and not any(seen)
        assert [module.training for module in modules] == before
        assert before[0] and not before[-1]
    finally:
        hook.remove()
        model.eval()
