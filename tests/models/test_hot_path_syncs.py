"""Host reads in one LST training forward and backward do not grow with the batch's contents.

On CUDA every read of a tensor's value by the host (`tests/models/host_syncs.py`) waits for the
GPU. The model's step path (patch ids, key ranges, documents, encoder, global transformer,
decoder, loss) must not read per patch, per token or per document: the reads it makes on CPU
are the same, site by site, for rows of 64 or 256 tokens packing 1, 2 or 8 documents. The CPU
attention kernels (`sliding_window_cpu`, the PyTorch patch attention reference) are left out:
they size their chunks on the host by design and never run on CUDA.
"""

import dataclasses

import pytest
import torch
from host_syncs import record_host_syncs
from model_cases import tiny_config
from patching.patching_cases import VOCAB

from megatron_lst.models.config import DocumentMaskingConfig
from megatron_lst.models.lst_model import LSTModel

EOS = VOCAB.eos_id
CPU_KERNELS = ("megatron_lst/models/sliding_window_cpu.py",
               "kernels/patch_attention_reference.py", "lst_kernels/patch_attention_reference.py")


def packed_rows(num_tokens: int, num_documents: int, patch: int = 4):
    """Two rows of random tokens cut into `num_documents` documents (EOS at each end), patches
    of `patch` tokens after the first one-token patch (the batch contract: rows sum to N + 1)."""
    tokens = torch.randint(VOCAB.size, (2, num_tokens), generator=torch.Generator().manual_seed(0))
    tokens[tokens == EOS] = (EOS + 1) % VOCAB.size
    for d in range(1, num_documents):
        tokens[:, d * num_tokens // num_documents - 1] = EOS
    lengths = [1] + [patch] * (num_tokens // patch) + ([num_tokens % patch] if num_tokens % patch else [])
    return tokens, torch.tensor(lengths)[None].repeat(2, 1)


def hot_path_reads(model, tokens, patch_lengths):
    model(tokens, patch_lengths, tokens).sum().backward()  # first call: one-time choices
    with record_host_syncs() as reads:
        model(tokens, patch_lengths, tokens).sum().backward()
    return {site: n for site, n in reads.items() if site[0] not in CPU_KERNELS}


@pytest.mark.parametrize("documents", [None, DocumentMaskingConfig(eos_id=EOS, reset_position_ids=True)],
                         ids=["one-sequence", "packed"])
def test_reads_do_not_grow_with_tokens_patches_or_documents(single_rank, documents):
    config = dataclasses.replace(tiny_config(token_window=16, patch_window=4), documents=documents)
    torch.manual_seed(0)
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend="sdpa", kernel_backend="torch")
    counts = {(num_tokens, num_documents): hot_path_reads(model, *packed_rows(num_tokens, num_documents))
              for num_tokens in (64, 256) for num_documents in ((1, 2, 8) if documents else (1,))}
    first = next(iter(counts.values()))
    for shape, reads in counts.items():
        assert reads == first, f"{shape}: {reads} != {first}"
