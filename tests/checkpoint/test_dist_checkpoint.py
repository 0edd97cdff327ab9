"""Dist checkpoints under TP/PP <-> the portable form: TP2PP2 -> TP1PP1 -> TP2PP1 reproduces the
logits (fp32, gloo on CPU), and a checkpoint that does not fit the model is refused by name."""

import argparse
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from distributed.harness import run_distributed
from safetensors.torch import load_file

from megatron_lst.checkpoint import safe_pickle
from megatron_lst.checkpoint.convert import dist_to_portable, portable_model, portable_to_dist
from megatron_lst.checkpoint.dist import (
    NON_MODEL_PREFIXES,
    checkpoint_model,
    load_dist_checkpoint,
    resolve_checkpoint,
    save_dist_checkpoint,
    training_args_for,
)
from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.checkpoint.model_state import (
    CheckpointContentError,
    build_full_model,
    full_state_dict,
)
from megatron_lst.checkpoint.portable import PortableCheckpoint, load_portable, save_portable
from megatron_lst.checkpoint.verify import fixed_batch, logits
from megatron_lst.models.config import preset
from megatron_lst.tokenizer.vocab import JointVocab, VocabularyError
from megatron_lst.training.checkpoint_load import load_checkpoint
from megatron_lst.training.checkpointing import METADATA_FILENAME

WORKER = Path(__file__).resolve().parent / "dist_checkpoint_worker.py"
VOCAB = JointVocab(text_size=58)  # 566 ids: splits over TP=2
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def original(single_rank, tmp_path_factory):
    """A tiny model with random weights (norms too), as a portable checkpoint."""
    torch.manual_seed(3)
    config = preset("tiny", VOCAB.size)
    model = build_full_model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "norm_q" in name or "norm_kv" in name:
                param.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("original")
    save_portable(directory, PortableCheckpoint(config=config, state=full_state_dict(model), vocab=VOCAB))
    return directory, logits(model, fixed_batch(config))


def last_stage_logits(records: list[dict]) -> torch.Tensor:
    reported = [torch.tensor(r["logits"]) for r in records if r["logits"] is not None]
    assert reported, "no rank reported logits"
    for other in reported[1:]:  # every tensor-parallel rank of the last stage
        assert torch.equal(other, reported[0])
    return reported[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2pp2_to_tp1pp1_to_tp2pp1_reproduces_logits(original, tmp_path):
    portable, expected = original
    saved_tp2pp2 = tmp_path / "tp2pp2"
    records = run_distributed(WORKER, 4, ["--tp", 2, "--pp", 2, "--portable", portable,
                                          "--save", saved_tp2pp2], timeout=400)
    assert (last_stage_logits(records) - expected).abs().max().item() <= TOLERANCE

    report = io.StringIO()
    converted = tmp_path / "tp1pp1_portable"
    assert dist_to_portable(saved_tp2pp2, converted, stream=report) <= TOLERANCE
    assert "max |logits before - after|" in report.getvalue()
    reloaded = portable_model(load_portable(converted, VOCAB), "converted")
    assert (logits(reloaded, fixed_batch(reloaded.lst_config)) - expected).abs().max().item() <= TOLERANCE
    assert json.loads((resolve_checkpoint(saved_tp2pp2) / METADATA_FILENAME).read_text())[
        "parallel_layout"]["pipeline_model_parallel_size"] == 2

    saved_tp1pp1 = tmp_path / "tp1pp1"
    assert portable_to_dist(converted, saved_tp1pp1, iteration=7, stream=None) <= TOLERANCE
    records = run_distributed(WORKER, 2, ["--tp", 2, "--pp", 1, "--portable", portable,
                                          "--load", saved_tp1pp1], timeout=300)
    assert (last_stage_logits(records) - expected).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def dist_checkpoint(original, tmp_path_factory):
    portable, _ = original
    save_dir = tmp_path_factory.mktemp("dist")
    portable_to_dist(portable, save_dir, stream=None)
    return resolve_checkpoint(save_dir)


def test_dist_checkpoint_of_another_vocabulary_is_refused(original, dist_checkpoint):
    other = JointVocab(text_size=60)
    with pytest.raises(VocabularyError, match="566"):
        load_dist_checkpoint(dist_checkpoint, build_full_model(preset("tiny", other.size)), other)
    # Without a vocabulary to compare with, the embedding's shape names the mismatch.
    with pytest.raises(CheckpointContentError, match=r"token_encoder\.embedding\.weight"):
        load_dist_checkpoint(dist_checkpoint, build_full_model(preset("tiny", other.size)))


def test_dist_checkpoint_of_another_architecture_is_refused_by_tensor(dist_checkpoint):
    config = preset("tiny", VOCAB.size)
    deeper = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, num_layers=3))
    with pytest.raises(CheckpointContentError, match=r"local_decoder\.(cross_attn_)?layers\.2\."):
        load_dist_checkpoint(dist_checkpoint, build_full_model(deeper))
    shallower = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, num_layers=1))
    with pytest.raises(CheckpointContentError, match=r"does not have.*local_decoder\.(cross_attn_)?layers\.1\."):
        load_dist_checkpoint(dist_checkpoint, build_full_model(shallower))
    wider_ffn = dataclasses.replace(config, global_model=dataclasses.replace(
        config.global_model, ffn_hidden_size=512))
    with pytest.raises(CheckpointContentError, match=r"linear_fc1\.weight. has shape \(2, 512, 64\) but the model expects \(2, 1024, 64\)"):
        load_dist_checkpoint(dist_checkpoint, build_full_model(wider_ffn))


def test_training_load_of_a_model_of_fewer_layers_than_the_checkpoint_is_refused_by_tensor(
        dist_checkpoint):
    """lst-train --load (with --no-use-checkpoint-args and the model flags of a smaller model)
    and lst-eval load through training's `load_checkpoint`, which loaded the layers the model has
    and left the checkpoint's others out without a word."""
    config = preset("tiny", VOCAB.size)
    shallower = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, num_layers=1))
    weights_only = argparse.Namespace(finetune=True, no_load_optim=True, no_load_rng=True,
                                      ckpt_step=None)
    with pytest.raises(CheckpointError, match=r"holds model tensor\(s\) this model does not have: "
                                              r"\['local_decoder\.cross_attn_layers\.1\..*more layers"):
        load_checkpoint(dist_checkpoint, [build_full_model(shallower)], None, None, weights_only,
                        VOCAB)
    loaded = load_checkpoint(dist_checkpoint, [build_full_model(config)], None, None,
                             weights_only, VOCAB)
    assert loaded.path == dist_checkpoint


def test_loading_a_dist_checkpoint_unpickles_its_index_once_under_the_restricted_reader(
        dist_checkpoint, monkeypatch):
    """The model record's weight count, the verification and the tensor shapes read one index;
    megatron's own (unrestricted) reads are its loading's alone (one in megatron.core 0.16, two
    in 0.19, which reads its common state from the .distcp files through the index too)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    monkeypatch.setattr(safe_pickle, "_last_index", None)  # nothing read by earlier tests
    restricted, unrestricted, loading = [], [], []
    restricted_load = safe_pickle._DcpMetadataUnpickler.load
    monkeypatch.setattr(safe_pickle._DcpMetadataUnpickler, "load",
                        lambda self: restricted.append(1) or restricted_load(self))
    megatron_read = FileSystemReader.read_metadata
    monkeypatch.setattr(FileSystemReader, "read_metadata", lambda self, *a, **k: (
        unrestricted.append(bool(loading)) or megatron_read(self, *a, **k)))
    megatron_load = dist_checkpointing.load

    def load(*args, **kwargs):
        loading.append(1)
        try:
            return megatron_load(*args, **kwargs)
        finally:
            loading.pop()

    monkeypatch.setattr(dist_checkpointing, "load", load)
    config, vocab, _ = checkpoint_model(dist_checkpoint)
    load_dist_checkpoint(dist_checkpoint, build_full_model(config), vocab)
    assert len(restricted) == 1
    assert unrestricted and all(unrestricted)  # only inside megatron's `load`
    # Other bytes under the same path are unpickled anew.
    index = dist_checkpoint / safe_pickle.DCP_METADATA_FILENAME
    original = index.read_bytes()
    index.write_bytes(original[:-1])
    with pytest.raises(safe_pickle.CheckpointIntegrityError, match="damaged or truncated"):
        safe_pickle.read_dcp_metadata(dist_checkpoint)
    assert len(restricted) == 2
    index.write_bytes(original)  # the bytes unpickled before: their objects again
    assert safe_pickle.read_dcp_metadata(dist_checkpoint).state_dict_metadata
    assert len(restricted) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_portable_round_trip_keeps_the_saved_dtype(single_rank, tmp_path, dtype):
    """A bf16 dist checkpoint (lst-train --bf16 saves the weights so) came back from
    dist -> portable -> dist as fp32 with the same values: twice the size on disk."""
    torch.manual_seed(4)
    config = preset("tiny", VOCAB.size)
    model = build_full_model(config).to(dtype)
    weights = full_state_dict(model)
    save_dist_checkpoint(tmp_path / "trained", model, training_args_for(config), VOCAB)

    def dist_dtypes(save_dir):
        saved = safe_pickle.saved_tensors_metadata(resolve_checkpoint(save_dir))
        return {tensor.dtype for key, tensor in saved.items()
                if not key.startswith(NON_MODEL_PREFIXES) and hasattr(tensor, "dtype")}

    assert dist_dtypes(tmp_path / "trained") == {dtype}
    dist_to_portable(tmp_path / "trained", tmp_path / "portable", stream=None)
    portable = load_file(tmp_path / "portable" / "model.safetensors")
    assert portable.keys() == weights.keys()
    for name, tensor in weights.items():  # bit-identical, in the dtype saved
        assert portable[name].dtype == dtype and torch.equal(portable[name], tensor), name
    portable_to_dist(tmp_path / "portable", tmp_path / "back", stream=None)
    assert dist_dtypes(tmp_path / "back") == {dtype}
    dist_to_portable(tmp_path / "back", tmp_path / "again", stream=None)
    again = load_file(tmp_path / "again" / "model.safetensors")
    for name, tensor in weights.items():
        assert again[name].dtype == dtype and torch.equal(again[name], tensor), name
