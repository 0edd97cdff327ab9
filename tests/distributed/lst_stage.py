"""This rank's `LSTModel` in the multi-process workers that compare parallel layouts.

Every layout must start from the same model and weights: `cpu_stage` builds this rank's pipeline
stage on the implementations that run on CPU under gloo, `load_shared_weights` gives it the same
unsharded weights in every layout, and `with_head_shapes` / `with_document_resets` turn the tiny
model into the one with the newest features. `mean_loss_forward_step` is megatron's forward step
on a batch dict, reporting the mean token loss. `layout_parser` and `per_sequence_parallel` are
the workers' flags for one layout and their record of each sequence-parallel setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import zlib
from collections.abc import Callable
from functools import partial

import torch

from megatron_lst.checkpoint.full_shapes import full_state_shapes
from megatron_lst.checkpoint.model_state import load_full_state_dict
from megatron_lst.models import LSTModel
from megatron_lst.models.config import DocumentMaskingConfig, LSTConfig
from megatron_lst.models.loss import masked_token_mean


def cpu_stage(config: LSTConfig, megatron_config) -> LSTModel:
    """This rank's pipeline stage of `config`'s model on megatron's local spec, SDPA sliding
    windows and the torch kernels."""
    from megatron.core import parallel_state

    return LSTModel(config, megatron_config,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    transformer_impl="local", local_attention_backend="sdpa",
                    kernel_backend="torch")


def load_shared_weights(model: LSTModel) -> None:
    """Same unsharded weights in every layout: each tensor of the whole model
    (`full_state_shapes`) drawn from a generator seeded by its canonical name, then this rank's
    part loaded (`load_full_state_dict` shards it)."""
    state = {}
    for name, shape in full_state_shapes(model.lst_config).items():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        full = torch.randn(shape, generator=generator)
        state[name] = 1.0 + 0.1 * full if full.dim() == 1 else 0.2 * full / full.shape[-1] ** 0.5
    load_full_state_dict(model, state, "the shared test weights")


def with_head_shapes(config: LSTConfig, global_query_groups: int = 2) -> LSTConfig:
    """The tiny model with grouped key/value heads and head sizes other than hidden / heads: the
    global model `global_query_groups` groups of 4 heads of 24 (4, one per head, lets TP=4 split
    them), both local models 1 group of 2 heads of 12."""
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=12)
                        for local in (config.encoder, config.decoder))
    return dataclasses.replace(
        config, encoder=encoder, decoder=decoder,
        global_model=dataclasses.replace(config.global_model, num_query_groups=global_query_groups,
                                         kv_channels=24))


def with_document_resets(config: LSTConfig, eos_id: int) -> LSTConfig:
    """`config` on rows packing documents ended by `eos_id`, with attention and RoPE positions
    reset at every document start."""
    return dataclasses.replace(config, documents=DocumentMaskingConfig(
        eos_id=eos_id, reset_position_ids=True))


def _mean_loss(loss_mask, per_token_loss):
    loss = masked_token_mean(per_token_loss, loss_mask)
    return loss, {"loss": loss.detach()}


def mean_loss_forward_step(data_iterator, model):
    """megatron's forward step on a batch dict (tokens, patch_lengths, labels, loss_mask): the
    loss is the mean over the masked tokens, reported as "loss"."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
    return output, partial(_mean_loss, batch["loss_mask"])


def layout_parser(description: str) -> argparse.ArgumentParser:
    """A worker's flags for one parallel layout: --tp, --pp, --sequence-parallel off|on|both (the
    settings to run, `per_sequence_parallel`) and the harness's --results."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", choices=("off", "on", "both"), default="off")
    parser.add_argument("--results", required=True)
    return parser


def per_sequence_parallel(choice: str, run: Callable[[bool], dict]) -> dict[str, dict]:
    """`run(sequence_parallel)` for each setting `--sequence-parallel choice` names, recorded
    under "no_sp" and "sp"."""
    settings = {"off": [False], "on": [True], "both": [False, True]}[choice]
    return {("sp" if sp else "no_sp"): run(sp) for sp in settings}
