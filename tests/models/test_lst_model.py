"""`LSTModel.forward` refuses inputs of the wrong shape with an error naming them, before any
kernel or the cross entropy fails on them with an index error."""

import pytest
import torch
from model_cases import ragged_batch, tiny_config

from megatron_lst.models.lst_model import LSTModel, check_input_shapes

TOKENS = torch.zeros(3, 7, dtype=torch.int64)
LENGTHS = torch.ones(3, 8, dtype=torch.int32)


@pytest.mark.parametrize(
    ("tokens", "patch_lengths", "labels", "error"),
    [
        (None, LENGTHS, None, r"need tokens \[B, N\] and patch_lengths \[B, P\]; got None for tokens"),
        (TOKENS, None, None, r"got None for patch_lengths"),
        (TOKENS[0], LENGTHS, None, r"tokens must be a 2-D integer tensor, got shape \(7,\)"),
        (TOKENS.float(), LENGTHS, None, r"tokens must be a 2-D integer tensor.*float32"),
        (TOKENS, LENGTHS[0], None, r"patch_lengths must be a 2-D integer tensor"),
        (TOKENS, LENGTHS.float(), None, r"patch_lengths must be a 2-D integer tensor.*float32"),
        (TOKENS, LENGTHS[:2], None, r"patch_lengths has 2 rows but tokens \(3, 7\) has 3"),
        (TOKENS, LENGTHS[:, :0], None, r"patch_lengths has no patches \(P = 0\)"),
        (TOKENS, LENGTHS, TOKENS[:2], r"labels \(2, 7\) must have the shape of tokens \(3, 7\)"),
        (TOKENS, LENGTHS, TOKENS[:, 1:], r"labels \(3, 6\) must have the shape of tokens"),
    ],
)
def test_check_input_shapes_names_the_bad_input(tokens, patch_lengths, labels, error):
    with pytest.raises(ValueError, match=error):
        check_input_shapes(tokens, patch_lengths, labels, needs_batch=True)


def test_check_input_shapes_accepts_the_contract_and_middle_stages():
    check_input_shapes(TOKENS, LENGTHS, TOKENS, needs_batch=True)
    check_input_shapes(TOKENS.int(), LENGTHS.long(), None, needs_batch=True)
    check_input_shapes(None, None, None, needs_batch=False)  # a middle pipeline stage


def test_forward_refuses_labels_of_another_shape(single_rank):
    config = tiny_config()
    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     kernel_backend="torch").eval()
    batch = ragged_batch("static", batch_size=2, seed=0)
    with torch.no_grad(), pytest.raises(ValueError, match=r"labels \(1, \d+\) must have the shape"):
        model(batch["tokens"], batch["patch_lengths"], batch["labels"][:1])
