"""`LastCall`: a range preparation is reused only for the very same, unmodified tensors and
number of keys; anything else is computed afresh."""

import torch
from lst_kernels.last_call import LastCall


class Clip:
    """Clips the ranges to `[0, num_keys]` and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, start, end, num_keys):
        self.calls += 1
        return start.clamp(0, num_keys), end.clamp(0, num_keys)


def test_same_tensors_reuse_the_result():
    clip = Clip()
    memo = LastCall(clip)
    start, end = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 4, 9]])
    first = memo(start, end, 6)
    assert memo(start, end, 6) is first  # every layer of a stack: one preparation
    assert clip.calls == 1
    assert torch.equal(first[1], torch.tensor([[2, 4, 6]]))


def test_anything_else_is_computed_again():
    clip = Clip()
    memo = LastCall(clip)
    start, end = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 4, 9]])
    memo(start, end, 6)
    assert torch.equal(memo(start, end, 3)[1], torch.tensor([[2, 3, 3]]))  # other num_keys
    equal_copy = end.clone()  # equal values, another tensor: not assumed equal
    assert memo(start, equal_copy, 3) is not memo(start, end, 3)
    end[0, 0] = 1  # modified in place: its version counter moved on
    assert torch.equal(memo(start, end, 3)[1], torch.tensor([[1, 3, 3]]))
    assert clip.calls == 5


def test_a_result_made_in_inference_mode_is_not_reused_outside_it():
    """Under `torch.inference_mode` the preparation is an inference tensor, which a training
    call could not save for its backward: made again outside it."""
    clip = Clip()
    memo = LastCall(clip)
    start, end = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 4, 9]])
    with torch.inference_mode():
        inference = memo(start, end, 6)
    training = memo(start, end, 6)
    assert clip.calls == 2 and training is not inference
    assert not training[0].is_inference()


def test_ranges_made_in_inference_mode_are_computed_each_call():
    """Inference tensors keep no version counter, so a change in place could not be told: each
    call computes afresh (reading `_version` of one raised)."""
    clip = Clip()
    memo = LastCall(clip)
    with torch.inference_mode():
        start, end = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 4, 9]])
        memo(start, end, 6)
        end[0, 0] = 1
        assert torch.equal(memo(start, end, 6)[1], torch.tensor([[1, 4, 6]]))
    assert clip.calls == 2


def test_calls_over_other_numbers_of_keys_keep_their_own_result():
    """A decoder layer alternates cross-attention (P*k keys) and self-attention (N keys) over
    other range tensors: each keeps its preparation instead of evicting the other's."""
    clip = Clip()
    memo = LastCall(clip)
    cross = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 4, 9]])
    self_ = torch.tensor([[0, 0, 1]]), torch.tensor([[1, 2, 3]])
    for _ in range(3):  # three layers
        memo(*cross, 6)
        memo(*self_, 3)
    assert clip.calls == 2
