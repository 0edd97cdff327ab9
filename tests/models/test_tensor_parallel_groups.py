"""The models hand megatron.core's tensor-parallel layers and mappings their process group.

megatron.core 0.19 warns "tp_group is None, using default tp group. Passing tp_group will be
mandatory soon" for every layer built, and mapping called, without one. The layers and mappings
megatron-lst builds or calls itself (the encoder's vocab-parallel embedding, the output layer,
the logits gather of the forward and of cached generation, the sequence-parallel scatter and
gather around the global model) pass it; what megatron.core's own modules pass is megatron.core's business.
"""

import dataclasses
import traceback

import numpy as np
import pytest
import torch
from megatron.core import utils as megatron_utils
from megatron.core.tensor_parallel import layers, mappings
from model_cases import PATCH_RULES, ragged_batch, tiny_config

from megatron_lst.models.baseline import TokenBaselineModel
from megatron_lst.models.lst_model import LSTModel


@pytest.fixture
def groupless_calls(monkeypatch):
    """The megatron-lst lines that reach megatron.core's "no group given: use the default"
    resolution, collected while the test runs."""
    calls = []
    resolve = megatron_utils.get_tensor_model_parallel_group_if_none

    def recording(tp_group, *args, **kwargs):
        if tp_group is None:
            # the caller of megatron.core's tensor-parallel code that got here
            caller = next(frame for frame in reversed(traceback.extract_stack()[:-1])
                          if "megatron/core/tensor_parallel" not in frame.filename)
            if "megatron_lst" in caller.filename:
                calls.append(f"{caller.filename}:{caller.lineno}")
        return resolve(tp_group, *args, **kwargs)

    for module in (megatron_utils, layers, mappings):
        if hasattr(module, "get_tensor_model_parallel_group_if_none"):
            monkeypatch.setattr(module, "get_tensor_model_parallel_group_if_none", recording)
    return calls


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_the_model_passes_its_tensor_parallel_group(single_rank, groupless_calls, kind):
    config = tiny_config()
    torch.manual_seed(0)
    if kind == "lst":
        model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                         kernel_backend="torch").eval()
    else:
        model = TokenBaselineModel(config, config.transformer_config(),
                                   transformer_impl="local").eval()
    batch = ragged_batch(sorted(PATCH_RULES)[0] if kind == "lst" else "none", batch_size=2,
                         seed=0)
    with torch.no_grad():
        model(batch["tokens"], batch["patch_lengths"])  # logits gathered: no labels
    assert groupless_calls == []


def test_sequence_parallel_mappings_get_the_tensor_parallel_group(single_rank, groupless_calls):
    """The scatter of the global input and the gather of the global output over the sequence
    (`--sequence-parallel`) are called by megatron-lst too."""
    config = tiny_config()
    torch.manual_seed(0)
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     kernel_backend="torch").eval()
    # megatron.core builds no sequence-parallel model on one rank; the mappings LSTModel calls
    # under it are the identity there, so turning it on after the build runs them as they are
    model.config.sequence_parallel = True
    batch = ragged_batch(sorted(PATCH_RULES)[0], batch_size=2, seed=0)
    with torch.no_grad():
        model(batch["tokens"], batch["patch_lengths"], batch["labels"])
    assert groupless_calls == []


@pytest.mark.parametrize("kind", ["lst", "baseline"])
def test_cached_generation_gathers_the_logits_over_the_tensor_parallel_group(
        single_rank, groupless_calls, kind):
    from megatron_lst.evaluation.generation import SamplingConfig, generate
    from megatron_lst.patching import PatchingConfig
    from megatron_lst.tokenizer.vocab import JointVocab

    vocab = JointVocab(text_size=40, num_units=200)
    config = dataclasses.replace(tiny_config(vocab.size), max_sequence_length=4096)
    torch.manual_seed(0)
    if kind == "lst":
        model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                         local_attention_backend="sdpa", kernel_backend="torch").eval()
    else:
        model = TokenBaselineModel(config, config.transformer_config(),
                                   transformer_impl="local").eval()
    units = vocab.units_to_ids(np.array([3, 3, 7, 1, 0, 9, 9]))
    generate(model, np.array([vocab.bos_id, vocab.speech_marker, *units]), vocab,
             PatchingConfig("static", patch_size=3), SamplingConfig(max_new_tokens=4),
             use_cache=True)
    assert groupless_calls == []
