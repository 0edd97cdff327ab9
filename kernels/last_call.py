"""Reusing a range preparation while the same range tensors come back.

Every layer of a stack attends over the same key ranges: the 25 global layers of the paper's 1B
get one `key_start` tensor per batch, the decoder's cross-attention layers one `(key_start,
key_end)` pair. The Triton wrapper clips them (forward) and finds each key's queries (backward)
before it launches; both depend on the range tensors alone, so `LastCall` keeps the last result
for each number of keys (a decoder layer alternates its cross-attention over P*k keys with its
self-attention over N) and gives it back to a call with the very same tensor objects, unchanged
since (their version counters), instead of launching a dozen small kernels again in every layer.
Anything else computes afresh, so a reused result is the one the call would have computed as
long as the tensors change only through torch operations: a write through `.data`, a NumPy view
or another alias of their memory bumps no version counter and would not be seen (no caller
writes ranges that way; they are made once per batch and only read). Layers under activation
recompute get detached copies of the ranges, so they prepare again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

_MOST_KEY_COUNTS = 4  # past this many numbers of keys the memo starts again (a new shape)


class LastCall:
    """`compute(start, end, num_keys)` memoised for the last argument set of each `num_keys`."""

    def __init__(self, compute: Callable[[torch.Tensor, torch.Tensor, int], tuple]):
        self.compute = compute
        self._last: dict[int, tuple[tuple, tuple]] = {}  # num_keys -> (key, result)

    def __call__(self, start: torch.Tensor, end: torch.Tensor, num_keys: int) -> tuple:
        if start.is_inference() or end.is_inference():  # no version counter to tell a change
            return self.compute(start, end, num_keys)
        # Inference mode too: a result made under it is an inference tensor, which a later
        # training call could not save for its backward.
        versions = (start._version, end._version, torch.is_inference_mode_enabled())
        last = self._last.get(num_keys)
        if last is not None:
            key, result = last
            if key[0]() is start and key[1]() is end and key[2] == versions:
                return result
        result = self.compute(start, end, num_keys)
        if num_keys not in self._last and len(self._last) >= _MOST_KEY_COUNTS:
            self._last.clear()
        # Weak references: a later batch's tensors never match a dead one's, and the memo keeps
        # only the (small) results alive, not the inputs.
        self._last[num_keys] = ((weakref.ref(start), weakref.ref(end), versions), result)
        return result
