"""Reusing a range preparation while the same range tensors come back.

Every layer of a stack attends over the same key ranges: the 25 global layers of the paper's 1B
get one `key_start` tensor per batch, the decoder's cross-attention layers one `(key_start,
key_end)` pair. The Triton wrapper clips them (forward) and finds each key's queries (backward)
before it launches; both depend on the range tensors alone, so `LastCall` keeps the last result
and gives it back to a call with the very same tensor objects, unchanged since (their version
counters), instead of launching a dozen small kernels again in every layer. Anything else
computes afresh, so a reused result is always the one the call would have computed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class LastCall:
    """`compute(start, end, num_keys)` memoised for one argument set: the last one."""

    def __init__(self, compute: Callable[[torch.Tensor, torch.Tensor, int], tuple]):
        self.compute = compute
        self._key: tuple | None = None
        self._result: tuple | None = None

    def __call__(self, start: torch.Tensor, end: torch.Tensor, num_keys: int) -> tuple:
        if start.is_inference() or end.is_inference():  # no version counter to tell a change
            return self.compute(start, end, num_keys)
        # Inference mode too: a result made under it is an inference tensor, which a later
        # training call could not save for its backward.
        versions = (start._version, end._version, num_keys, torch.is_inference_mode_enabled())
        key = self._key
        if key is not None and key[0]() is start and key[1]() is end and key[2] == versions:
            return self._result
        result = self.compute(start, end, num_keys)
        # Weak references: a later batch's tensors never match a dead one's, and the memo keeps
        # only the (small) results alive, not the inputs.
        self._key = (weakref.ref(start), weakref.ref(end), versions)
        self._result = result
        return result
