"""Packed rows (Megatron-LM's --reset-attention-mask): no attention crosses a document end.

The model with document masking agrees with a dense-mask oracle written from the rule
(`packed_document_cases`) to 1e-5 in fp32, forward and backward, on rows packing 2-5 documents of
ragged lengths, for every patching rule, with windows shorter and longer than a document; and
perturbing a document never changes the logits of the documents after it.
"""

import dataclasses

import pytest
import torch
from model_cases import tiny_config
from packed_document_cases import EOS, dense_document_attention, edge_batch, packed_batch
from patching.patching_cases import VOCAB

from megatron_lst.models.baseline import TokenBaselineModel
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.models.lst_model import LSTModel

DOCUMENTS = DocumentMaskingConfig(eos_id=EOS)
WINDOWS = {"short": (4, 2), "long": (256, 64)}  # (token window, patch window)
RULES = ("static", "aligned", "aligned_merged", "mixed", "none")


def build(kind, windows, documents=DOCUMENTS):
    token_window, patch_window = WINDOWS[windows] if isinstance(windows, str) else windows
    config = dataclasses.replace(tiny_config(token_window=token_window, patch_window=patch_window),
                                 documents=documents)
    torch.manual_seed(0)
    if kind == "baseline":
        return TokenBaselineModel(config, config.transformer_config(), transformer_impl="local")
    return LSTModel(config, config.transformer_config(), transformer_impl="local",
                    local_attention_backend="sdpa", kernel_backend="torch")


def loss_and_grads(model, tokens, patch_lengths, weights):
    model.zero_grad()
    logits = model(tokens, patch_lengths)  # [B, N, V]
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _assert_matches_oracle(model, tokens, patch_lengths) -> torch.Tensor:
    """Logits and gradients of a weighted logit sum equal the dense oracle's; returns the logits."""
    weights = torch.randn(*tokens.shape, model.lst_config.vocab_size,
                          generator=torch.Generator().manual_seed(1)) / tokens.numel()
    logits, grads = loss_and_grads(model, tokens, patch_lengths, weights)
    with dense_document_attention(model, tokens, patch_lengths):
        want_logits, want_grads = loss_and_grads(model, tokens, patch_lengths, weights)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    return logits


@pytest.mark.parametrize("windows", WINDOWS)
@pytest.mark.parametrize("rule", RULES)
def test_matches_dense_oracle(single_rank, rule, windows):
    model = build("baseline" if rule == "none" else "lst", windows)
    tokens, _, patch_lengths = packed_batch(rule, [2, 5, 3], seed=len(rule))
    assert ((tokens == EOS).sum(1) >= 1).all()
    logits = _assert_matches_oracle(model, tokens, patch_lengths)
    # The oracle is not vacuous: without document masking the logits differ.
    plain = dataclasses.replace(model.lst_config, documents=None)
    model.lst_config = plain
    try:
        with torch.no_grad():
            crossing = model(tokens, patch_lengths)
    finally:
        model.lst_config = dataclasses.replace(plain, documents=DOCUMENTS)
    assert (crossing - logits).abs().max() > 1e-3


@pytest.mark.parametrize("windows", [(1, 1), (129, 3), (1000, 1000)],
                         ids=["window-1", "several-cpu-chunks", "window-past-the-row"])
@pytest.mark.parametrize("rule", RULES)
def test_edge_rows_match_dense_oracle(single_rank, rule, windows):
    """Rows at the edges of the rule (EOS first, EOS after EOS, only EOS, documents shorter
    than a patch or ending mid-patch, silences at a document's ends, a row without a final EOS,
    a row whose first document began in the previous row, a row whose head is an EOS), with
    windows of one token, of 129 (on rows of about 165 tokens, so that the CPU path's 128-query
    chunks cut documents) and past the row: logits and gradients are the oracle's."""
    if rule == "none" and windows != (1, 1):
        pytest.skip("the baseline has no windows")
    model = build("baseline" if rule == "none" else "lst", windows)
    several_chunks = windows == (129, 3)
    tokens, _, patch_lengths = edge_batch(rule, repeat=4 if several_chunks else 1)
    assert tokens.shape[1] > 128 or not several_chunks
    _assert_matches_oracle(model, tokens, patch_lengths)


def test_perturbing_one_edge_row_document_leaves_every_other_unchanged(single_rank):
    """With attention and positions reset, changing the tokens of one document of an edge row
    (keeping its kinds, so its patches) changes its own logits and no other document's, earlier
    or later; document d of a row is what follows its d-th EOS."""
    model = build("lst", (3, 2), DocumentMaskingConfig(eos_id=EOS, reset_position_ids=True))
    model.eval()
    tokens, _, patch_lengths = edge_batch("mixed")
    real = tokens != 0  # no real token is the pad id
    document = torch.cat([torch.zeros_like(tokens[:, :1]), (tokens == EOS).long().cumsum(1)[:, :-1]], 1)
    generator = torch.Generator().manual_seed(0)
    text = (tokens >= 3) & (tokens < VOCAB.text_size)
    units = (tokens >= VOCAB.unit_offset) & (tokens < VOCAB.size)
    new_text = torch.randint(3, VOCAB.text_size, tokens.shape, generator=generator)
    new_units = torch.randint(VOCAB.unit_offset, VOCAB.size, tokens.shape, generator=generator)
    with torch.no_grad():
        before = model(tokens, patch_lengths)
        for target in range(3):
            chosen = (document == target) & real
            perturbed = torch.where(chosen & text, new_text, torch.where(chosen & units, new_units, tokens))
            after = model(perturbed, patch_lengths)
            change = (after - before).abs().amax(-1)  # [B, N]
            assert change[real & ~chosen].max() < 1e-6, target
            assert change[chosen].max() > 1e-3, target


@pytest.mark.parametrize("rule", RULES)
def test_perturbing_a_document_leaves_later_documents_unchanged(single_rank, rule):
    model = build("baseline" if rule == "none" else "lst", "long").eval()
    tokens, _, patch_lengths = packed_batch(rule, [3, 2], seed=7)
    eos_at = [torch.nonzero(row == EOS).flatten() for row in tokens]
    first_end = torch.stack([positions[0] for positions in eos_at])  # [B] end of document 1
    in_first = torch.arange(tokens.shape[1]) <= first_end[:, None]  # [B, N], its EOS included
    # Perturb document 1 only, keeping its token kinds (and so its patches) and its EOS.
    generator = torch.Generator().manual_seed(3)
    text = (tokens >= 3) & (tokens < VOCAB.text_size)
    replacement = torch.randint(3, VOCAB.text_size, tokens.shape, generator=generator)
    perturbed = torch.where(in_first & text, replacement, tokens)  # the EOS is no text piece
    assert (perturbed != tokens).any()
    with torch.no_grad():
        before, after = model(tokens, patch_lengths), model(perturbed, patch_lengths)
    later = ~in_first
    assert (before[later] - after[later]).abs().max() < 1e-6
    assert (before[in_first] - after[in_first]).abs().max() > 1e-3


def test_reset_position_ids_makes_a_document_independent_of_its_place(single_rank):
    """With attention and positions reset, a document's logits in a packed row equal those of
    the same document alone in a row."""
    model = build("lst", "long", DocumentMaskingConfig(eos_id=EOS, reset_position_ids=True)).eval()
    tokens, _, patch_lengths = packed_batch("static", [3], seed=11)
    eos_at = torch.nonzero(tokens[0] == EOS).flatten()
    start, end = int(eos_at[0]) + 1, int(eos_at[1]) + 1  # document 2: tokens [start, end)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), patch_lengths[0].long().cumsum(0)])
    first, last = int((bounds == start).nonzero()), int((bounds == end).nonzero())
    alone_lengths = torch.cat([patch_lengths[0, first:last], torch.ones(1, dtype=torch.int32)])[None]
    with torch.no_grad():
        packed = model(tokens, patch_lengths)[0, start:end]
        alone = model(tokens[:, start:end], alone_lengths)[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_reset_positions_follow_the_rule_on_edge_rows(rule):
    """RoPE positions with --reset-position-ids, counted by hand: a token's is its distance to
    its document's first token (the one after the last EOS before it, or the row's first); a
    patch's, the number of earlier patches of its document (a patch's document is that of its
    first position, clipped to N for the trailing empty patches)."""
    from megatron_lst.models.documents import RowDocuments

    tokens, _, patch_lengths = edge_batch(rule)
    documents = RowDocuments.of(tokens, DocumentMaskingConfig(EOS, reset_attention_mask=False,
                                                              reset_position_ids=True))
    batch, num_tokens = tokens.shape
    for b in range(batch):
        row = tokens[b].tolist()
        start = 0
        document_of = []  # of positions 0..N
        for i in range(num_tokens + 1):
            if i > 0 and row[i - 1] == EOS:
                start = i
            document_of.append(start)
            if i < num_tokens:
                assert documents.token_positions()[b, i] == i - start, (b, i)
        first, seen = 0, []
        for q, length in enumerate(patch_lengths[b].tolist()):
            patch_document = document_of[min(first, num_tokens)]
            assert documents.patch_positions(patch_lengths)[b, q] == seen.count(patch_document), (b, q)
            seen.append(patch_document)
            first += length


def test_flags_build_the_document_rule():
    """--reset-attention-mask is on by default (and says so in --help), --no-reset-attention-mask
    turns it off, in flags and YAML alike; the model provider turns them into LSTConfig.documents
    with the vocabulary's EOS."""
    from megatron_lst.training.arguments import build_parser, parse_args, validate_args
    from megatron_lst.training.config_files import config_to_argv
    from megatron_lst.training.model_provider import lst_config_from_args

    parser = build_parser()
    assert "On by default, for LST and the baseline" in " ".join(parser.format_help().split())
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "16", "--train-iters", "1", "--lr", "1e-3"]
    on = validate_args(parse_args(base), 1)  # neither flag given: the model flags' None, the rule's default
    assert on.reset_attention_mask is None and on.reset_position_ids is None
    assert lst_config_from_args(on, 128, eos_id=EOS).documents == DocumentMaskingConfig(EOS)
    off = validate_args(parse_args([*base, "--no-reset-attention-mask"]), 1)
    assert off.reset_attention_mask is False
    assert lst_config_from_args(off, 128, eos_id=EOS).documents is None
    assert config_to_argv({"reset_attention_mask": False}, parser) == ["--no-reset-attention-mask"]
    with pytest.raises(ValueError, match="EOS"):
        lst_config_from_args(on, 128)


def test_reference_attn_impl_records_the_rule():
    from megatron_lst.checkpoint.reference import reference_model_args
    from megatron_lst.models.reference_config import lst_config_from_reference

    config = dataclasses.replace(tiny_config(), documents=DOCUMENTS)
    args = reference_model_args(config)
    assert args["attn_impl"] == "xformers" and args["eos_id"] == EOS
    # the reference's cross-attention knows no documents: our default rule exports as the one
    # that differs from it there only
    assert lst_config_from_reference(args).documents == dataclasses.replace(
        DOCUMENTS, reset_cross_attention=False)
    plain = reference_model_args(dataclasses.replace(config, documents=None), base_args=args)
    assert plain["attn_impl"] == "sdpa"
    assert lst_config_from_reference(plain).documents is None
    # Rules the reference has no arguments for are refused with what to do instead.
    from megatron_lst.models.reference_config import ReferenceImportError

    for rule, message in ((DocumentMaskingConfig(eos_id=5), r"EOS id 5; .* fixed EOS id 2"),
                          (DocumentMaskingConfig(EOS, reset_position_ids=True),
                           r"restarts no RoPE positions")):
        with pytest.raises(ReferenceImportError, match=message):
            reference_model_args(dataclasses.replace(config, documents=rule))
