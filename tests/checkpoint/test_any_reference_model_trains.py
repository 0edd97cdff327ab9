"""Every model `lst-convert import-reference` can produce trains, evaluates and generates:
import -> portable-to-dist -> lst-eval / lst-generate on the converted checkpoint -> a few
training steps resumed from it with no model flags -> lst-eval / lst-generate on the result.

Cases: the reference fixture's config A (skipped without the fixtures) and a generated reference
configuration that differs from every preset in each model field the flags cover (local FFN
widths from another `multiple_of`, cross-attention only at the first encoder and decoder layer,
mean pooling, other windows, slots, heads, grouped-query global and local attention, heads of
another size than hidden / heads, norm epsilon and RoPE base), its weights random and written in
the reference's own layout.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from data.document_cases import random_aligned_document
from evaluation.eval_cases import random_records, tokenizer
from safetensors.torch import save_file

from megatron_lst.checkpoint.cli import main as convert_main
from megatron_lst.checkpoint.model_config import read_model_config
from megatron_lst.checkpoint.model_state import build_full_model, full_state_dict
from megatron_lst.checkpoint.portable import load_portable
from megatron_lst.checkpoint.reference import FIXED_REFERENCE_ARGS, export_reference
from megatron_lst.data.indexed import DocumentWriter
from megatron_lst.data.manifest import Counts, Manifest, TokenizerInfo
from megatron_lst.evaluation.eval_cli import eval_main
from megatron_lst.evaluation.generate_cli import generate_main
from megatron_lst.models.config import PRESETS, preset
from megatron_lst.models.reference_config import lst_config_from_reference
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint
from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata
from megatron_lst.training.loop import pretrain
from megatron_lst.training.model_flags import DOCUMENT_FLAGS, MODEL_FLAGS, flag_values

GENERATED_NUM_UNITS = 20


def generated_reference_args(vocab_size: int) -> dict:
    """Reference model arguments unlike any preset in every field the flags cover."""
    return {
        **FIXED_REFERENCE_ARGS, "vocab_size": vocab_size,
        "dim_global": 48, "n_layers_global": 3, "n_heads_global": 6, "n_kv_heads_global": 3,
        "dim_token": 24, "dim_local_encoder": 24, "n_layers_local_encoder": 2,
        "n_heads_local_encoder": 3, "dim_local_decoder": 24, "n_layers_local_decoder": 3,
        "n_heads_local_decoder": 6, "multiple_of": 16,
        # heads of another size than dim / heads everywhere, local grouped-query attention
        "head_dim": 12, "n_kv_heads": 3,
        # a sliding window over rows of up to 512 tokens, no document masking
        "attn_impl": "xformers", "attn_bias_type": "causal", "local_attention_window_len": 20,
        "max_encoder_seq_length": 512,
        "cross_attn_k": 3, "cross_attn_nheads": 3, "cross_attn_window_encoder": 3,
        "cross_attn_window_decoder": 5, "cross_attn_all_layers_encoder": False,
        "cross_attn_all_layers_decoder": False, "downsampling_by_pooling": "avg",
        "norm_eps": 1e-6, "rope_theta": 5000.0,
        # the reference builds no model without both (its local models' args require them)
        "patching_mode": "static", "patch_size": 4.0,
    }


def write_generated_reference(directory: Path, vocab_size: int) -> tuple[Path, Path]:
    """A reference checkpoint (its state dict layout and model args) of random weights."""
    model_args = generated_reference_args(vocab_size)
    config = lst_config_from_reference(model_args)
    initialize_parallel(seed=5)
    try:
        state = export_reference(full_state_dict(build_full_model(config)), config)
    finally:
        destroy_parallel()
    directory.mkdir(parents=True)
    save_file(state, str(directory / "state_dict.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_args": model_args}))
    return directory / "state_dict.safetensors", directory / "config.json"


def write_corpus(directory: Path, text_tokenizer, num_units: int) -> list[str]:
    """A speech and a text dataset of random documents in `text_tokenizer`'s joint vocabulary."""
    vocab = JointVocab(text_size=text_tokenizer.vocab_size, num_units=num_units)
    info = TokenizerInfo(str(text_tokenizer.path), text_tokenizer.sha256,
                         text_tokenizer.vocab_size, text_tokenizer.space_id)
    rng = np.random.default_rng(0)
    prefixes = []
    for kind in ("aligned", "text"):
        writer, counts = DocumentWriter(directory / kind, kind), Counts()
        for _ in range(40):
            if kind == "aligned":
                doc = random_aligned_document(rng, int(rng.integers(8, 30)), vocab=vocab)
                writer.add_aligned(doc)
                counts.add(Counts(documents=1, segments=doc.num_segments,
                                  text_pieces=len(doc.text_ids), units=len(doc.unit_ids)))
            else:
                ids = rng.integers(4, vocab.text_size, int(rng.integers(10, 50))).astype(np.int32)
                writer.add_text(ids)
                counts.add(Counts(documents=1, text_pieces=len(ids)))
        writer.finalize(Manifest(kind, vocab.to_dict(), info, num_units,
                                 25.0 if kind == "aligned" else None, counts, ["random"]))
        prefixes += ["0.5", str(directory / kind)]
    return prefixes


def training_flags(data_path: list[str], load: Path, save: Path, tokenizer_path: str) -> list[str]:
    """Two fine-tuning steps from `load`: data, schedule and layout only, no model flag."""
    return [
        "--patching-mode", "static", "--patch-size", "4", "--seq-length", "8",
        "--max-tokens", "24", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "0", "--split", "90,10,0",
        "--eval-iters", "1", "--eval-interval", "1000", "--num-workers", "0",
        "--index-workers", "0", "--log-interval", "1", "--no-progress-bar",
        "--kernel-backend", "torch", "--tokenizer-model", tokenizer_path,
        "--data-path", *data_path, "--load", str(load), "--finetune", "--save", str(save),
    ]


def saved_model_config(save_dir: Path):
    """The model record of the newest checkpoint in `save_dir`, checked against its index."""
    checkpoint = find_latest_checkpoint(save_dir)
    return read_model_config(read_checkpoint_metadata(checkpoint), checkpoint)


def _evaluate_and_generate(load: Path, items: Path, tokenizer_path: str, num_units: int,
                           capsys) -> dict:
    results = load.parent / f"{load.name}_results.json"
    assert eval_main(["--load", str(load), "--items", str(items), "--tokenizer-model",
                      tokenizer_path, "--batch-size", "2", "--output", str(results)]) == 0
    assert generate_main(["--load", str(load), "--prompt-units", "3 3 7 1 0",
                          "--max-new-tokens", "6", "--speech-only", "--temperature", "1.0",
                          "--tokenizer-model", tokenizer_path]) == 0
    output = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(output["tokens"]) == 6 or output["stopped_at_eos"]
    assert all(0 <= u < num_units for u in output["units"])
    return json.loads(results.read_text())["results"][str(items)]


@pytest.fixture(params=["fixture_A", "generated"])
def reference_case(request, tmp_path):
    """(reference weights, reference args, tokenizer, speech-unit count) of one case."""
    if request.param == "fixture_A":
        fixtures = request.getfixturevalue("reference_fixtures")
        return (fixtures / "state_dict_A.safetensors", fixtures / "config_A.json",
                load_text_tokenizer(fixtures / "spm.model"), 502)
    text = tokenizer()
    vocab = JointVocab(text_size=text.vocab_size, num_units=GENERATED_NUM_UNITS)
    weights, args = write_generated_reference(tmp_path / "reference", vocab.size)
    return weights, args, text, GENERATED_NUM_UNITS


@pytest.mark.slow
def test_imported_reference_model_converts_evaluates_generates_and_trains(
        reference_case, tmp_path, capsys):
    weights, model_args, text, num_units = reference_case
    portable, converted, trained = tmp_path / "portable", tmp_path / "dist", tmp_path / "trained"
    assert convert_main(["import-reference", "--reference-ckpt", str(weights), "--reference-args",
                         str(model_args), "--output", str(portable),
                         "--num-units", str(num_units)]) == 0
    assert convert_main(["portable-to-dist", "--portable", str(portable), "--save",
                         str(converted)]) == 0
    config = saved_model_config(converted).config
    imported = lst_config_from_reference(json.loads(model_args.read_text())["model_args"])
    assert config == imported
    # The converted checkpoint loads in every tool: lst-convert itself ...
    assert convert_main(["dist-to-portable", "--load", str(converted), "--output",
                         str(tmp_path / "portable_again")]) == 0
    assert load_portable(tmp_path / "portable_again").config == imported

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in random_records(3, 4)))
    tokenizer_path = str(text.path)
    # ... lst-eval and lst-generate ...
    before = _evaluate_and_generate(converted, items, tokenizer_path, num_units, capsys)

    # ... and lst-train, which fine-tunes it with no model flag.
    data_path = write_corpus(tmp_path / "data", text, num_units)
    flags = training_flags(data_path, converted, trained, tokenizer_path)
    result = pretrain(validate_args(parse_args(flags), 1), index_cache_dir=tmp_path / "rows")
    assert sorted(result.losses) == [1, 2]
    assert all(np.isfinite(loss) for loss in result.losses.values())
    saved = saved_model_config(trained)
    assert saved.config == imported and not saved.baseline

    assert read_checkpoint_metadata(find_latest_checkpoint(trained))["iteration"] == 2
    after = _evaluate_and_generate(trained, items, tokenizer_path, num_units, capsys)
    assert set(after) == set(before) and all(r["num_items"] == 4 for r in after.values())

    # A model flag that contradicts the checkpoint is refused, both values named.
    with pytest.raises(ArgumentError, match=rf"--local-encoder-window 4096 \(checkpoint: "
                                            rf"{config.encoder.window}\)"):
        validate_args(parse_args([*flags, "--local-encoder-window", "4096"]), 1)


def test_the_generated_reference_differs_from_every_preset_in_every_model_field():
    config = lst_config_from_reference(generated_reference_args(1000))
    values = flag_values(config)
    for name in PRESETS:
        preset_values = flag_values(preset(name, 1000))
        same = [f.flag for f in MODEL_FLAGS if f not in DOCUMENT_FLAGS  # not set by a preset
                and values[f.dest] == preset_values[f.dest] and f.flag not in _SHARED_BY_DESIGN]
        assert not same, (name, same)


# Fields the reference's arguments cannot vary (import always gives these) or that no reference
# option sets: the double residual is the reference's quirk; the position budget and init std
# have no reference field; both local windows are its one `local_attention_window_len`, which
# differs from the presets' anyway.
_SHARED_BY_DESIGN = ("--cross-attn-double-residual", "--max-position-embeddings",
                     "--init-method-std")
