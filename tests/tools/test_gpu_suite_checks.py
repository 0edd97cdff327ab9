"""tools/gpu_suite_checks.py's packed-document check: the rows it builds follow the data's rule
(an EOS ends a patch), and its isolation check passes a model with document masking and fails one
without."""

import dataclasses

import pytest
import torch
from tool_modules import load_tool

from megatron_lst.models import preset
from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.parallel import destroy_parallel, initialize_parallel


@pytest.fixture(scope="module")
def checks():
    bench_model = load_tool("bench_model")  # gpu_suite_checks imports it by name
    initialize_parallel(seed=1234)
    yield load_tool("gpu_suite_checks"), bench_model
    destroy_parallel()


def _batch(bench_model, seed=0):
    batch = bench_model.speech_heavy_batch(3, 120, 4, seed=seed)
    return {k: batch[k] for k in ("tokens", "labels", "patch_lengths")}


def test_packed_rows_end_documents_at_patch_ends(checks):
    tools, bench_model = checks
    batch = _batch(bench_model)
    packed = tools.packed_documents(batch, documents_per_row=4, seed=1)
    eos = tools.PACKED_EOS
    tokens, labels = packed["tokens"], packed["labels"]
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # still one row seen twice
    assert ((tokens == eos).sum(dim=1) == 3).all()  # three ends, no stray EOS of the random ids
    row = torch.cat([tokens, labels[:, -1:]], dim=1)  # [B, N + 1]
    ends = batch["patch_lengths"].cumsum(dim=1) - 1
    for b in range(row.shape[0]):
        eos_positions = set((row[b] == eos).nonzero().flatten().tolist())
        assert eos_positions <= set(ends[b].tolist())  # every EOS ends a patch
    with pytest.raises(ValueError, match="too few"):
        tools.packed_documents(batch, documents_per_row=200, seed=1)


@pytest.mark.parametrize("masked", [True, False])
def test_isolation_check_fails_without_document_masking(checks, masked):
    tools, bench_model = checks
    documents = DocumentMaskingConfig(tools.PACKED_EOS, reset_attention_mask=masked)
    config = dataclasses.replace(preset("tiny", 1020), documents=documents)
    torch.manual_seed(0)
    model = tools._build(config, "cpu", torch.float32, "torch")
    packed = tools.packed_documents(_batch(bench_model), documents_per_row=4, seed=1)
    report = tools.check_document_isolation(model, packed, "torch")
    assert report["ok"] is masked
    assert report["first_document_moved"] > 1e-3
    if not masked:
        assert report["relative_error"] > 1e-2
