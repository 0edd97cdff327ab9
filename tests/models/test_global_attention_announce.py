"""The global block's attention says once, at its first forward, which attention runs: causal
SDPA without documents, and with packed documents flash-attn's varlen kernel, the CPU range
attention or `lst_kernels`' range attention on the model's kernel backend. Every layer takes the
same path, so each path is one log line however many layers and steps run it.

The meta device stands in for CUDA (only the device type decides the path; the kernel call is
recorded, not computed), and `fake_flash_attn` for flash-attn (tests/models/fake_flash_attn.py).
"""

import logging

import pytest
import torch
from test_global_document_flash import (
    ROWS,
    core_attention,
    document_key_starts,
    install_fake_flash,
)

from megatron_lst.models import global_attention, local_attention


@pytest.fixture
def announced(caplog):
    """The global attention's log lines of the test (the once-per-process memory emptied)."""
    global_attention.announce_global_attention.cache_clear()
    caplog.set_level(logging.INFO, logger=global_attention.__name__)
    yield lambda: [r.getMessage() for r in caplog.records if r.name == global_attention.__name__]
    global_attention.announce_global_attention.cache_clear()


def run_layers(key_start: torch.Tensor | None, dtype=torch.float32, layers: int = 2) -> None:
    """Two forwards of `layers` layers of 4 query over 2 key/value heads on rows of 32."""
    for attention in [core_attention(4, 2, 16) for _ in range(layers)] * 2:
        q = torch.randn(32, 2, 4, 16, dtype=dtype)  # [S, B, H, d]
        k = torch.randn(32, 2, 2, 16, dtype=dtype)  # [S, B, G, d]
        attention(q, k, k, attention_mask=key_start)


def test_causal_attention_is_announced_once(single_rank, announced):
    run_layers(None)
    assert announced() == ["global attention: causal, PyTorch scaled_dot_product_attention"]


def test_cpu_document_attention_is_announced_once(single_rank, announced):
    run_layers(document_key_starts(ROWS[0]))
    assert announced() == ["global attention: causal within packed documents, range attention "
                           "on CPU (PyTorch, sliding_window_cpu)"]


def test_cpu_document_attention_is_not_also_called_sdpa(single_rank, announced, caplog):
    """The flash-or-not choice of the packed-document path logged "backend: sdpa", which is not
    what runs there; the line above says what does."""
    local_attention._log_choice.cache_clear()
    caplog.set_level(logging.INFO, logger=local_attention.__name__)
    run_layers(document_key_starts(ROWS[0]))
    assert [r.getMessage() for r in caplog.records if r.name == local_attention.__name__] == []
    assert len(announced()) == 1


def test_flash_document_attention_is_announced_once(single_rank, announced, monkeypatch):
    install_fake_flash(monkeypatch)
    run_layers(document_key_starts(ROWS[0]), dtype=torch.float16)
    assert announced() == ["global attention: causal within packed documents, flash-attn varlen"]


@pytest.mark.parametrize("kernel_backend,named", [
    ("auto", "auto (Triton on CUDA where triton imports, else PyTorch"),
    ("torch", "torch"),
])
def test_range_kernel_document_attention_names_its_kernel_backend(single_rank, announced,
                                                                  monkeypatch, kernel_backend,
                                                                  named):
    monkeypatch.setattr(global_attention, "patch_cross_attention",
                        lambda q, *args, **kwargs: torch.zeros_like(q))
    meta = torch.device("meta")  # off CPU
    key_start = torch.zeros(2, 32, dtype=torch.long, device=meta)  # [B, S]
    q = torch.empty(32, 2, 4, 16, device=meta)  # [S, B, H, d]
    for attention in [core_attention(4, 4, 16, kernel_backend) for _ in range(2)] * 2:
        attention._document_attention(q, q, q, key_start, dropout=0.0)
    [line] = announced()
    assert line.startswith("global attention: causal within packed documents, lst_kernels range "
                           f"attention, kernel backend {named}")
