"""Resharding: a checkpoint saved with optimizer state under TP=1/PP=2 continues under TP=2/PP=1
as the run that saved it (fp32, gloo on CPU); loaded without the optimizer state it continues
from the same weights with a fresh optimizer.

The losses agree to fp32 rounding (TOLERANCE), not bit for bit: tensor parallelism adds partial
matrix products of the global block and the vocabulary-parallel head, and one stage instead of
two back-propagates the token encoder's two gradients summed instead of one by one, so sums run
in another order. tests/training/test_distributed_optimizer_resume.py shows the layout changes
that keep every sum in order resuming bit for bit."""

from pathlib import Path

import pytest
import torch
from distributed.harness import run_distributed

from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import PortableCheckpoint, save_portable
from megatron_lst.models.config import preset
from megatron_lst.tokenizer.vocab import JointVocab

WORKER = Path(__file__).resolve().parent / "reshard_worker.py"
VOCAB = JointVocab(text_size=58)
TOLERANCE = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def portable(single_rank, tmp_path_factory):
    torch.manual_seed(11)
    config = preset("tiny", VOCAB.size)
    directory = tmp_path_factory.mktemp("portable")
    save_portable(directory, PortableCheckpoint(
        config=config, state=full_state_dict(build_full_model(config)), vocab=VOCAB))
    return directory


def last_stage(records: list[dict], key: str) -> list[float]:
    values = [r[key] for r in records if r[key] is not None and None not in r[key]]
    assert values and all(v == values[0] for v in values), values
    return values[0]


def test_training_continues_after_resharding_tp1pp2_to_tp2pp1(portable, tmp_path):
    save_dir = tmp_path / "checkpoints"
    saved = run_distributed(WORKER, 2, ["--tp", 1, "--pp", 2, "--portable", portable,
                                        "--save", save_dir], timeout=300)
    continued = last_stage(saved, "steps")  # the run that never stopped: steps 2 and 3
    resumed = run_distributed(WORKER, 2, ["--tp", 2, "--pp", 1, "--portable", portable,
                                          "--load", save_dir], timeout=300)

    with_optimizer = last_stage(resumed, "with_optimizer")
    assert abs(with_optimizer[0] - continued[0]) <= TOLERANCE  # same weights after step 1
    assert abs(with_optimizer[1] - continued[1]) <= TOLERANCE  # same Adam moments in step 2

    weights_only = last_stage(resumed, "weights_only")
    assert abs(weights_only[0] - continued[0]) <= TOLERANCE
    # A fresh Adam takes another step 2, so step 3 starts from other weights.
    assert abs(weights_only[1] - continued[1]) > 100 * TOLERANCE
