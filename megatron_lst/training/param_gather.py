"""When the weights are all-gathered under --overlap-param-gather (see `ParamGatherHooks`)."""

from __future__ import annotations

import argparse
import contextlib

import torch


class ParamGatherHooks:
    """When the weights are all-gathered under --overlap-param-gather (Megatron-LM's `train`).

    megatron's distributed optimizer then updates only this rank's shard of each bucket at
    `optimizer.step()`, and the DDP wrapper's forward pre-hooks all-gather the updated buckets
    during the next forward pass. Whatever reads the weights in between must finish that gather
    first: evaluation and checkpoint saving run inside `synchronised()`, which removes the hooks
    with a forced synchronous gather and puts them back after; `finish()` leaves every rank with
    the trained weights. The hooks are off for the first iteration, whose weights already agree
    on every rank (fresh or loaded; a rank with a bad load does not spread it by a gather), and
    go on after the first update that was not skipped. Without the flag every method is a no-op.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], overlap_param_gather: bool):
        self._chunks = model_chunks
        self._enabled = overlap_param_gather
        self._on = overlap_param_gather  # megatron's DDP installs them at construction

    @classmethod
    def from_args(cls, model_chunks: list[torch.nn.Module],
                  args: argparse.Namespace) -> ParamGatherHooks:
        return cls(model_chunks, args.use_distributed_optimizer
                   and getattr(args, "overlap_param_gather", False))

    def start(self) -> None:
        """Before the first iteration: hooks off, no gather (the weights agree already)."""
        self._turn_off(param_sync=False)

    def after_step(self, skipped: bool) -> None:
        """After an iteration: the hooks go on at the first update."""
        if not skipped:
            self._turn_on()

    @contextlib.contextmanager
    def synchronised(self):
        """Inside the block every rank holds the updated weights whole."""
        was_on = self._on
        self._turn_off(param_sync=True)
        try:
            yield
        finally:
            if was_on:
                self._turn_on()

    def finish(self) -> None:
        """After the last iteration: the weights gathered, the hooks off."""
        self._turn_off(param_sync=True)

    def _turn_on(self) -> None:
        if self._enabled and not self._on:
            for chunk in self._chunks:
                chunk.enable_forward_pre_hook()
            self._on = True

    def _turn_off(self, param_sync: bool) -> None:
        if self._on:
            for chunk in self._chunks:
                chunk.disable_forward_pre_hook(param_sync=param_sync)
            self._on = False
