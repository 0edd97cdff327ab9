"""Resharding: a checkpoint saved with optimizer state under TP=1/PP=2 continues under TP=2/PP=1
as the run that saved it (fp32, gloo on CPU); loaded without the optimizer state it continues
from the same weights with a fresh optimizer.

The losses agree to fp32 rounding (TOLERANCE), not bit for bit: tensor parallelism adds partial
matrix products of the global block and the vocabulary-parallel head, and one stage instead of
two back-propagates the token encoder's two gradients summed instead of one by one, so sums run
in another order. tests/training/test_distributed_optimizer_resume.py shows the layout changes
that keep every sum in order resuming bit for bit.

A checkpoint of `lst-train` under TP=2 with sequence parallelism x DP=2 and the distributed
optimizer, whose Adam moments are sharded over both the tensor- and the data-parallel ranks,
continues on one process with those moments.

Run for the tiny preset and for it with the newest model features: grouped key/value heads and
head sizes other than hidden / heads in the global and both local models, on rows packing
documents with attention and RoPE positions reset at each."""

import dataclasses
from pathlib import Path

import pytest
import torch
from distributed.harness import TESTS_DIR, run_distributed
from training.test_resume import _command, _losses
from training.training_cases import tiny_flags, write_corpus

from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import PortableCheckpoint, save_portable
from megatron_lst.models.config import DocumentMaskingConfig, preset
from megatron_lst.tokenizer.vocab import JointVocab

WORKER = Path(__file__).resolve().parent / "reshard_worker.py"
TRAIN_WORKER = TESTS_DIR / "training" / "workers" / "train_worker.py"
VOCAB = JointVocab(text_size=58)
TOLERANCE = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def newest_features(config):
    """Global: 2 key/value groups of 4 heads of 24; local: 1 key/value head for 2 of 12."""
    encoder, decoder = (dataclasses.replace(local, num_query_groups=1, kv_channels=12)
                        for local in (config.encoder, config.decoder))
    return dataclasses.replace(
        config, encoder=encoder, decoder=decoder,
        global_model=dataclasses.replace(config.global_model, num_query_groups=2, kv_channels=24),
        documents=DocumentMaskingConfig(eos_id=VOCAB.eos_id, reset_position_ids=True))


@pytest.fixture(scope="module", params=["tiny", "newest-features"])
def portable(single_rank, tmp_path_factory, request):
    torch.manual_seed(11)
    config = preset("tiny", VOCAB.size)
    if request.param == "newest-features":
        config = newest_features(config)
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


def test_distributed_optimizer_state_of_tp2_sp_dp2_continues_on_one_process(tmp_path):
    data_path = write_corpus(tmp_path / "data")
    flags = tiny_flags(data_path) + [
        "--use-distributed-optimizer", "--micro-batch-size", "1", "--lr", "1e-2",
        "--reset-position-ids", "--lr-decay-iters", "3", "--eval-interval", "1000"]
    sharded = flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    save_dir = str(tmp_path / "ckpt")
    # Iteration 1 and a save, then iterations 2-3 resumed under the same layout (the run that
    # never stopped: tests/training/test_resume.py). Iteration 3's loss follows the Adam step of
    # iteration 2, which uses the saved moments.
    [[_, continued], *_] = run_distributed(TRAIN_WORKER, 4, [
        "--training-run", _command(sharded + ["--train-iters", "1", "--save", save_dir]),
        "--training-run", _command(sharded + ["--train-iters", "3", "--load", save_dir])],
        timeout=300)
    [[resumed]] = run_distributed(TRAIN_WORKER, 1, [
        "--training-run", _command(flags + ["--train-iters", "3", "--load", save_dir])],
        timeout=300)
    assert continued["resumed_from"] == resumed["resumed_from"] == 1
    assert list(_losses(resumed)) == [2, 3]
    assert _losses(resumed) == pytest.approx(_losses(continued), rel=TOLERANCE)
