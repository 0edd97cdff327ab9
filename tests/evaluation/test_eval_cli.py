"""`lst-eval` on a saved checkpoint: the same accuracies as scoring the model in memory."""

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_cases import (
    NUM_UNITS,
    WORDS,
    random_records,
    save_tiny_checkpoint,
    tokenizer,
    utterances,
    vocab,
    write_utterances,
)

from megatron_lst.evaluation.eval_cli import _write_results, eval_main
from megatron_lst.evaluation.generate_cli import generate_main
from megatron_lst.evaluation.items import load_items
from megatron_lst.evaluation.loading import load_inference_model
from megatron_lst.evaluation.scoring import evaluate_items
from megatron_lst.parallel import ParallelLayoutError, destroy_parallel, initialize_parallel
from megatron_lst.patching import Patcher, PatchingConfig
from megatron_lst.tokenizer.text_tokenizer import load_text_tokenizer, train_sentencepiece
from megatron_lst.training.checkpointing import METADATA_FILENAME


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A curriculum tiny-cpu model saved as iteration 3; also its in-memory results."""
    root = tmp_path_factory.mktemp("eval_cli")
    items_path = root / "items.jsonl"
    items_path.write_text("\n".join(json.dumps(r) for r in random_records(5, 6)) + "\n")
    initialize_parallel(seed=3)
    try:
        _, chunks, args = save_tiny_checkpoint(root / "save")
        for chunk in chunks:
            chunk.eval()
        patcher = Patcher(PatchingConfig("static", patch_size=args.patch_size))
        expected = evaluate_items(chunks, load_items(items_path, tokenizer(), vocab()), vocab(),
                                  patcher, ["S->S", "T->T"], batch_size=4)
    finally:
        destroy_parallel()
    return root, items_path, expected


def test_lst_eval_matches_in_memory_scoring(checkpoint, capsys):
    root, items_path, expected = checkpoint
    output = root / "results.json"
    status = eval_main(["--load", str(root / "save"), "--items", str(items_path),
                        "--modes", "s2s,T->T", "--batch-size", "2", "--output", str(output)])
    assert status == 0
    written = json.loads(output.read_text())
    assert written["iteration"] == 3
    assert written["results"][str(items_path)] == expected
    assert "items.jsonl T->T: accuracy" in capsys.readouterr().out


def test_lst_eval_prints_each_item_file_by_the_path_given(checkpoint, tmp_path, capsys):
    """Two files of the same name in different folders are told apart (the lines named the
    file only: two "items.jsonl T->T" lines)."""
    root, items_path, _ = checkpoint
    paths = []
    for folder in ("dev", "test"):
        (tmp_path / folder).mkdir()
        paths.append(shutil.copy(items_path, tmp_path / folder / "items.jsonl"))
    assert eval_main(["--load", str(root / "save"), "--items", *map(str, paths),
                      "--modes", "tt"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split(" T->T:")[0] for line in lines] == [str(path) for path in paths]


def test_default_modes_of_a_file_mixing_text_only_and_spoken_items(checkpoint, capsys):
    """The first item alone chose them: a text-only first item had the file scored T->T only,
    silently, where a spoken first item had the text-only one refused."""
    root, _, _ = checkpoint
    text_only = {"id": "t", "context": {"text": "the dog"},
                 "endings": [{"text": "sat"}, {"text": "ran"}], "label": 0}
    mixed = root / "mixed.jsonl"
    mixed.write_text(json.dumps(text_only) + "\n" + json.dumps(random_records(9, 1)[0]) + "\n")
    assert eval_main(["--load", str(root / "save"), "--items", str(mixed)]) == 2
    assert "item 't' " in (err := capsys.readouterr().err) and "cannot be scored S->S" in err
    assert eval_main(["--load", str(root / "save"), "--items", str(mixed), "--modes", "tt",
                      "--bootstrap-resamples", "10"]) == 0


def _long_item(root: Path) -> Path:
    """An items file of one item longer than the checkpoint's context of 32 as text only."""
    record = random_records(8, 1)[0]
    record["context"] = {"text": " ".join(WORDS), "units": [3, 1]}
    items = root / "long.jsonl"
    items.write_text(json.dumps(record) + "\n")
    return items


def test_lst_eval_counts_items_beyond_the_context(checkpoint, capsys, caplog):
    """An item longer than the model's context was scored, and reported, as any other."""
    root, _, _ = checkpoint
    items = _long_item(root)
    output = root / "long.json"
    assert eval_main(["--load", str(root / "save"), "--items", str(items), "--modes", "ss,tt",
                      "--bootstrap-resamples", "10", "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"][str(items)]
    assert results["S->S"]["num_items_beyond_context"] == 0
    assert results["T->T"]["num_items_beyond_context"] == 1
    # counts are written as counts: `"num_items": 1`, not `1.0`
    for key in ("num_items", "num_items_truncated", "num_items_beyond_context"):
        assert type(results["T->T"][key]) is int, (key, results["T->T"][key])
    out = capsys.readouterr().out
    assert "long.jsonl S->S: accuracy" in out and "(1 items)\n" in out
    assert "(1 items, 1 beyond the model's context)" in out
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("T->T: 1 of 1 items need more global positions than the model's "
                              "context of 32 (--max-position-embeddings), the first, item")


def test_lst_eval_truncate_context_cuts_the_context_to_fit(checkpoint, capsys):
    root, _, _ = checkpoint
    items = _long_item(root)
    output = root / "cut.json"
    assert eval_main(["--load", str(root / "save"), "--items", str(items), "--modes", "tt",
                      "--truncate-context", "--bootstrap-resamples", "10",
                      "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"][str(items)]["T->T"]
    assert (results["num_items_truncated"], results["num_items_beyond_context"]) == (1, 0)
    assert "(1 items, 1 context cut to fit)" in capsys.readouterr().out


def test_lst_eval_names_a_bad_item(checkpoint, capsys):
    root, _, _ = checkpoint
    record = random_records(6, 1)[0]
    record["label"] = 5
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    assert eval_main(["--load", str(root / "save"), "--items", str(bad)]) == 2
    assert f"item 'item-6-0' ({bad}:1): label 5" in capsys.readouterr().err
    assert eval_main(["--load", str(root / "save"), "--items", str(bad), "--modes", "x"]) == 2


@pytest.mark.parametrize("second, modes, message", [
    ({"label": 5}, "ss,tt", "label 5"),
    ({"context": {"text": "the dog"}, "endings": [{"text": "sat"}, {"text": "ran"}]}, "tt,st",
     "cannot be scored S->T"),
    # The default modes of the second file (all four: it has spoken items) were checked only
    # when it was scored.
    ({"context": {"text": "the dog"}, "endings": [{"text": "sat"}, {"text": "ran"}]}, None,
     "cannot be scored S->S"),
])
def test_every_item_file_is_checked_before_any_is_scored(checkpoint, capsys, monkeypatch,
                                                         second, modes, message):
    """A bad second file was found only after the first was evaluated, its results lost."""
    root, items_path, _ = checkpoint
    scored = []
    monkeypatch.setattr("megatron_lst.evaluation.eval_cli.evaluate_items",
                        lambda *args, **kwargs: scored.append(args))
    bad = root / "second.jsonl"
    bad.write_text(json.dumps({**random_records(7, 1)[0], **second}) + "\n"
                   + json.dumps(random_records(8, 1)[0]) + "\n")
    assert eval_main(["--load", str(root / "save"), "--items", str(items_path), str(bad),
                      *(["--modes", modes] if modes else [])]) == 2
    assert message in capsys.readouterr().err and scored == []


def test_lst_generate_reads_a_unit_prompt_from_the_npy_extract_units_writes(checkpoint, tmp_path,
                                                                            capsys):
    """@FILE was read as text: the .npy of tools/extract_units.py was a UnicodeDecodeError."""
    root, _, _ = checkpoint
    units = np.array([3, 1, 4, 1, 5], dtype=np.int16)
    np.save(tmp_path / "prompt.npy", units)
    (tmp_path / "prompt.units").write_text("3 1 4 1 5\n")
    outputs = []
    for name in ("prompt.npy", "prompt.units"):
        assert generate_main(["--load", str(root / "save"), "--prompt-units",
                              f"@{tmp_path / name}", "--max-new-tokens", "4", "--seed", "7"]) == 0
        result = json.loads(capsys.readouterr().out)
        del result["seconds"]
        outputs.append(result)
    assert outputs[0] == outputs[1]
    assert outputs[0]["prompt"][-5:] == [vocab().unit_offset + u for u in (3, 1, 4, 1, 5)]


def test_lst_generate_continues_a_unit_prompt_as_speech(checkpoint, capsys):
    root, _, _ = checkpoint
    status = generate_main(["--load", str(root / "save"), "--prompt-units", "3 3 7 1 0",
                            "--max-new-tokens", "12", "--speech-only", "--temperature", "1.0"])
    assert status == 0
    output = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert output["prompt"][:2] == [vocab().bos_id, vocab().speech_marker]
    assert len(output["tokens"]) == 12 or output["stopped_at_eos"]
    assert len(output["units"]) == len(output["tokens"]) - output["stopped_at_eos"]
    assert all(0 <= u < NUM_UNITS for u in output["units"])
    assert output["global_steps"] >= 1


@pytest.mark.parametrize("prompt, continue_in", [(["--prompt-text", "the girl ran"], "speech"),
                                                 (["--prompt-units", "3 3 7 1 0"], "text"),
                                                 (["--prompt-text", "the girl ran"], None)])
def test_lst_generate_continues_in_the_named_modality_by_default(checkpoint, capsys, prompt,
                                                                 continue_in):
    """None: --speech-only, which generated units right after the text pieces, without the
    "space, <s>" that opens every speech run in training."""
    root, _, _ = checkpoint
    flags = ["--continue-in", continue_in] if continue_in else ["--speech-only"]
    status = generate_main(["--load", str(root / "save"), *prompt, *flags,
                            "--max-new-tokens", "10"])  # greedy, the default
    continue_in = continue_in or "speech"
    assert status == 0
    output = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    v = vocab()
    marker = v.speech_marker if continue_in == "speech" else v.text_marker
    assert output["prompt"][-1] == marker
    body = output["tokens"][:len(output["tokens"]) - output["stopped_at_eos"]]
    assert body
    if continue_in == "speech":
        assert len(output["units"]) == len(body)
    else:
        assert not output["units"] and all(t < v.text_size for t in body) and output["text"]


def test_a_different_tokenizer_of_the_same_size_is_refused(checkpoint, tmp_path, capsys):
    root, items_path, _ = checkpoint
    sentences = [" ".join(reversed(WORDS[i:] + WORDS[:i])) for i in range(len(WORDS))] * 8
    other = load_text_tokenizer(train_sentencepiece(sentences, tmp_path / "other.model", 320))
    assert other.vocab_size == tokenizer().vocab_size and other.sha256 != tokenizer().sha256
    for main, flags in ((eval_main, ["--items", str(items_path)]),
                        (generate_main, ["--prompt-text", "the girl"])):
        assert main(["--load", str(root / "save"), *flags,
                     "--tokenizer-model", str(other.path)]) == 2
        error = capsys.readouterr().err
        assert f"(sha256 {other.sha256[:12]}...) is not the one checkpoint" in error
        assert f"made with (sha256 {tokenizer().sha256[:12]}...)" in error


def copy_with_edited_record(save: Path, copy: Path, edit: Callable[[dict], None]) -> Path:
    """`copy`: a copy of the checkpoints in `save` whose lst_checkpoint.json `edit` changed."""
    shutil.copytree(save, copy)
    [metadata_path] = copy.glob(f"iter_*/{METADATA_FILENAME}")
    metadata = json.loads(metadata_path.read_text())
    edit(metadata)
    metadata_path.write_text(json.dumps(metadata))
    return copy


def test_a_checkpoint_of_an_uneven_pipeline_split_scores_on_one_process(checkpoint, tmp_path):
    """The training run's --decoder-first-pipeline-num-layers reached the one-stage model
    ("Mismatch: 1 middle layers remaining but 0 middle PP stages available")."""
    root, items_path, expected = checkpoint
    save = copy_with_edited_record(
        root / "save", tmp_path / "save",
        lambda m: m["args"].update(pipeline_model_parallel_size=3,
                                   decoder_first_pipeline_num_layers=1,
                                   decoder_last_pipeline_num_layers=1))
    output = tmp_path / "results.json"
    assert eval_main(["--load", str(save), "--items", str(items_path), "--modes", "ss,tt",
                      "--batch-size", "2", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["results"][str(items_path)] == expected


def _trained_with_transformer_engine(metadata):
    # Transformer Engine runs without packed-document attention (lst-train refuses both)
    metadata["args"].update(transformer_impl="transformer_engine", reset_attention_mask=False,
                            reset_position_ids=False)
    metadata["model"]["config"]["documents"] = None


@pytest.mark.skipif(torch.cuda.is_available(), reason="both backends run on CUDA machines")
@pytest.mark.parametrize("edit", [_trained_with_transformer_engine,
                                  lambda m: m["args"].update(kernel_backend="triton")],
                         ids=["transformer-engine", "triton"])
def test_a_checkpoint_trained_with_gpu_backends_loads_on_a_cpu(checkpoint, tmp_path, capsys,
                                                               edit):
    """A run trained with --transformer-impl transformer_engine and --kernel-backend triton on
    GPUs: lst-eval and lst-generate failed on a machine without CUDA (RuntimeError tracebacks
    while building or running the model); they run with the backends this machine has, and the
    results are the saved model's (one document each: the same without document masking)."""
    root, items_path, expected = checkpoint
    save = copy_with_edited_record(root / "save", tmp_path / "save", edit)
    output = tmp_path / "results.json"
    assert eval_main(["--load", str(save), "--items", str(items_path), "--modes", "ss,tt",
                      "--output", str(output)]) == 0, capsys.readouterr().err
    assert json.loads(output.read_text())["results"][str(items_path)] == expected
    generated = []
    for load in (root / "save", save):
        capsys.readouterr()
        assert generate_main(["--load", str(load), "--prompt-units", "3 1 4", "--max-new-tokens",
                              "6"]) == 0, capsys.readouterr().err
        generated.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"])
    assert generated[0] == generated[1] and len(generated[0]) == 6


def _edit_size(metadata):
    metadata["model"]["config"]["vocab_size"] += 1


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["vocab"].pop("num_units"),
     r"field\(s\) 'vocab' \(vocabulary field\(s\) 'num_units' \(missing\) are not integers\)"),
    (lambda m: m["vocab"].update(size=m["vocab"]["size"] + 1),
     r"'vocab' \(vocabulary field 'size' is \d+ but text_size \d+ and num_units \d+ make it"),
    (lambda m: m.update(args=[]), r"field\(s\) 'args' \(list\) are not what a save writes"),
    (lambda m: m.update(model="lst"), r"field\(s\) 'model' \(str\) are not what a save writes"),
    (lambda m: m["model"]["config"]["global_model"].update(hidden_size="64"),
     r"iter_0000003: the model record does not describe a model \(global_model: "),
    (_edit_size, r"iter_0000003: the model record's vocab_size \d+ differs from the \d+ ids of "
                 r"the recorded vocabulary; the checkpoint is corrupt"),
    # A TypeError in the patcher; 2.5 and true were taken as patch sizes; RuntimeError, building
    (lambda m: m["args"].update(patch_size="4"),
     r"iter_0000003/lst_checkpoint.json: the saved flag patch_size is '4', which --patch-size "
     r"never gives \(an integer\); the file is damaged or was edited: restore it"),
    (lambda m: m["args"].update(patch_size=None), r"patch_size is None, .*\(an integer\)"),
    (lambda m: m["args"].update(patch_size=2.5), r"patch_size is 2.5, .*\(an integer\)"),
    (lambda m: m["args"].update(patch_size=True), r"patch_size is True, .*\(an integer\)"),
    (lambda m: m["args"].update(bf16="yes"), r"bf16 is 'yes', which --bf16 never gives \(true or "
                                             r"false\)"),
    (lambda m: m["args"].update(reset_attention_mask="yes"),
     r"reset_attention_mask is 'yes', which --reset-attention-mask never gives"),
    (lambda m: m["args"].update(silence_patching="none"),
     r"silence_patching is 'none', .*\(one of \['separate', 'merged'\]\)"),
    (lambda m: m["args"].update(params_dtype_name="int8"),
     r"the saved params_dtype_name is 'int8', not one of \['float32', 'bfloat16', 'float16'\]"),
], ids=["vocab-field-missing", "vocab-size", "args-list", "model-string", "config-type",
        "config-vocab-size", "flag-string", "flag-null", "flag-fraction", "flag-bool",
        "switch-string", "negatable-switch-string", "flag-choice", "params-dtype"])
def test_a_hand_edited_checkpoint_record_is_one_line_naming_the_file(checkpoint, tmp_path, capsys,
                                                                     edit, message):
    """lst_checkpoint.json is written after the file digests: lst-eval read its vocabulary,
    flags and model record unchecked (KeyError, AttributeError, TypeError tracebacks), and named
    no file for a model record that does not describe a model."""
    root, items_path, _ = checkpoint
    save = copy_with_edited_record(root / "save", tmp_path / "save", edit)
    assert eval_main(["--load", str(save), "--items", str(items_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(save) in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("tp, message", [
    (3, r"--tensor-model-parallel-size 3 does not divide the attention heads \(4\), query groups "
        r"\(4\), FFN width \(176\) of the model of .*iter_0000003; use one of \[1, 2\]"),
    (4, r"--tensor-model-parallel-size 4 does not divide the vocabulary size \(VOCAB\) of .*; "
        r"use one of \[1, 2\]"),
])
def test_a_tensor_parallel_size_the_model_does_not_split_into_is_refused_before_building(
        checkpoint, tp, message):
    """megatron.core failed while building the model, naming its config fields
    ("num_attention_heads (4) must be a multiple of tensor_model_parallel_size (3)"), or the
    vocabulary check advised padding the vocabulary of a trained model."""
    root, _, _ = checkpoint
    assert vocab().size % 4 == 2  # divides by 2, not by 4
    with pytest.raises(ParallelLayoutError, match=message.replace("VOCAB", str(vocab().size))):
        load_inference_model(root / "save", tensor_model_parallel_size=tp)


@pytest.mark.parametrize("main, flags, message", [
    (eval_main, ["--items", "ITEMS", "--tokenizer-model", "MISSING"], "tokenizer not found"),
    (generate_main, ["--prompt-text", "the", "--tokenizer-model", "MISSING"], "tokenizer not found"),
    (generate_main, ["--prompt-units", "@MISSING"], "--prompt-units @"),
    (generate_main, ["--prompt-units", "3 x"], "--prompt-units: speech unit 'x' is not an "
                                                "integer; give whitespace-separated integer"),
    # int() read "2_0" as unit 20
    (generate_main, ["--prompt-units", "3 2_0"], "--prompt-units: speech units are not "
                                                 "whitespace-separated integers"),
    # "'utf-8' codec can't decode byte 0x93", naming no file
    (generate_main, ["--prompt-units", "@BINARY"], "--prompt-units @BINARY: BINARY: not a text "
                                                   "file of units"),
    (generate_main, ["--prompt-text", "the", "--temperature", "nan"],
     "--temperature nan must be a finite number >= 0"),
    (generate_main, ["--prompt-units", " ".join(["3"] * 200)],
     "context is 32 (--max-position-embeddings); shorten the prompt"),
    # Generated from BOS and a marker alone, as if prompted
    (generate_main, ["--prompt-units", "@EMPTY"], "--prompt-units '@EMPTY' holds no units"),
    (generate_main, ["--prompt-text", " "], "the text prompt ' ' is empty"),
], ids=["eval-tokenizer", "generate-tokenizer", "units-file", "units-value",
        "units-underscore", "units-binary",
        "temperature", "prompt-too-long", "units-empty", "text-empty"])
def test_bad_inputs_found_after_loading_are_one_line(checkpoint, tmp_path, capsys, main, flags,
                                                     message):
    """Each of these was a traceback (FileNotFoundError, torch.multinomial's RuntimeError) or
    a message that named no flag."""
    root, items_path, _ = checkpoint
    binary = tmp_path / "units.bin"
    binary.write_bytes(b"\x93NUMPY but not one")
    (tmp_path / "empty.units").write_text("\n")
    values = {"ITEMS": str(items_path), "MISSING": str(tmp_path / "missing"),
              "@EMPTY": f"@{tmp_path / 'empty.units'}",
              "@MISSING": f"@{tmp_path / 'missing'}", "@BINARY": f"@{binary}"}
    assert main(["--load", str(root / "save"), *(values.get(f, f) for f in flags)]) == 2
    err = capsys.readouterr().err
    message = message.replace("BINARY", str(binary)).replace("@EMPTY", values["@EMPTY"])
    assert message in err and "Traceback" not in err


def test_lst_eval_output_never_overwrites_the_tokenizer_or_the_checkpoint(checkpoint, tmp_path,
                                                                         capsys):
    """--output was written over whatever it named once the scoring was done: the model's
    tokenizer, the checkpoint tracker or a checkpoint's file were lost."""
    root, items_path, _ = checkpoint
    tokenizer_copy = tmp_path / "spm.model"
    shutil.copy(tokenizer().path, tokenizer_copy)
    before = Path(tokenizer().path).read_bytes()
    save = root / "save"
    snapshot = save / "memory_snapshot.pickle"
    snapshot.write_bytes(b"the allocator's snapshot")
    for output, extra, message in [
        (tokenizer().path, [], "is the model's tokenizer, which the results would overwrite"),
        (tokenizer_copy, ["--tokenizer-model", str(tokenizer_copy)], "is the --tokenizer-model file"),
        (save / "latest_checkpointed_iteration.txt", [], "is a file of the training run in the "
                                                         f"--load directory {save}"),
        (save / "iter_0000003" / METADATA_FILENAME, [], "is a file of the training run"),
        (snapshot, [], "is a file of the training run"),  # --record-memory-history's
    ]:
        kept = Path(output).read_bytes()
        assert eval_main(["--load", str(save), "--items", str(items_path), "--modes", "tt",
                          "--output", str(output), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--output {output} {message}" in err and err.count("\n") == 1, err
        assert Path(output).read_bytes() == kept
    snapshot.unlink()
    assert Path(tokenizer().path).read_bytes() == before


def test_lst_eval_output_never_overwrites_the_run_of_one_loaded_checkpoint(checkpoint, capsys):
    """With `--load DIR/iter_0000003` the guard looked only inside that checkpoint's folder, and
    only below it: the run's tracker beside it and the checkpoint's own record were overwritten
    by the results."""
    root, items_path, _ = checkpoint
    one_checkpoint = root / "save" / "iter_0000003"
    for output in (root / "save" / "latest_checkpointed_iteration.txt",
                   one_checkpoint / METADATA_FILENAME):
        kept = output.read_bytes()
        assert eval_main(["--load", str(one_checkpoint), "--items", str(items_path), "--modes",
                          "tt", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert (f"--output {output} is a file of the training run in the --load directory "
                f"{one_checkpoint}") in err and err.count("\n") == 1, err
        assert output.read_bytes() == kept


def test_lst_eval_output_that_cannot_be_written_is_one_line(checkpoint, tmp_path, capsys):
    """A FileNotFoundError traceback after all the scoring (here: a link to a missing folder)."""
    root, items_path, _ = checkpoint
    output = tmp_path / "results.json"
    output.symlink_to(tmp_path / "gone" / "results.json")
    assert eval_main(["--load", str(root / "save"), "--items", str(items_path), "--modes", "tt",
                      "--bootstrap-resamples", "10", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert "items.jsonl T->T: accuracy" in captured.out
    assert captured.err == (f"lst-eval: cannot write the results to --output {output} (No such "
                            f"file or directory); they are printed above\n")


def test_lst_eval_output_that_fills_the_disk_keeps_the_earlier_results(tmp_path, capsys,
                                                                       disk_full_at):
    """The results file was opened for writing (emptied) first: a disk that filled part way left
    half a JSON in place of the earlier run's results."""
    output = tmp_path / "results.json"
    output.write_text('{"earlier": 1}')
    with disk_full_at(100):
        status = _write_results(str(output), {"items.jsonl": {"scores": list(range(200))}})
    assert status == 2
    assert output.read_text() == '{"earlier": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert capsys.readouterr().err.startswith(f"lst-eval: cannot write the results to --output "
                                              f"{output} (File too large)")


def test_lst_eval_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert eval_main(["--load", str(tmp_path), "--items", str(tmp_path / "x.jsonl")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_lst_eval_refuses_missing_items_before_loading_the_model(checkpoint, capsys, monkeypatch):
    """A mistyped --items was found once the checkpoint was loaded, minutes later for a large
    model."""
    root, items_path, _ = checkpoint
    monkeypatch.setattr("megatron_lst.evaluation.loading.load_inference_model",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    missing = root / "typo.jsonl"
    assert eval_main(["--load", str(root / "save"), "--items", str(items_path),
                      str(missing)]) == 2
    assert capsys.readouterr().err == (f"lst-eval: --items {missing} does not exist; give "
                                       f"story-completion items as JSONL "
                                       f"(docs/evaluation.md#the-item-format)\n")


@pytest.mark.parametrize("second, message", [
    (lambda items: items, "--items {second} is given twice"),
    (lambda items: f"{items.parent}/./{items.name}",  # pathlib would drop the "."
     "--items {second} is the file {first}, given before it"),
    (lambda items: _linked(items, "link.jsonl", Path.symlink_to),
     "--items {second} is the file {first}, given before it"),
    (lambda items: _linked(items, "hard.jsonl", Path.hardlink_to),
     "--items {second} is the file {first}, given before it"),
    (lambda items: items.parent, "--items {second} is a directory; give the story-completion "
                                 "JSONL files in it"),
], ids=["same-path", "other-path", "symlink", "hard-link", "directory"])
def test_lst_eval_refuses_an_items_file_given_twice_before_loading_the_model(
        tmp_path, capsys, monkeypatch, second, message):
    """The results are keyed by the path given: the same path twice was scored once, silently,
    and another path to the same file (a link, ./a.jsonl) scored it twice under two names. A
    directory was read only once the model was loaded ("Is a directory")."""
    monkeypatch.setattr("megatron_lst.evaluation.loading.load_inference_model",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    first = tmp_path / "items" / "a.jsonl"
    first.parent.mkdir()
    first.write_text("\n".join(json.dumps(r) for r in random_records(5, 2)) + "\n")
    again = str(second(first))
    assert eval_main(["--load", str(tmp_path), "--items", str(first), again]) == 2
    assert capsys.readouterr().err == "lst-eval: " + message.format(
        first=first, second=again) + ("\n" if Path(again).is_dir() else
                                      "; give each items file once\n")


def _linked(target: Path, name: str, link) -> Path:
    """A link `name` beside `target` made by `link(path, target)`: `Path.symlink_to` or
    `Path.hardlink_to`."""
    path = target.parent / name
    link(path, target)
    return path


@pytest.mark.parametrize("flags, message", [
    # Each named the sampling setting's field (top_k), not the flag, with all three values.
    (["--prompt-text", "the", "--top-k", "-1"], "--top-k -1 must be >= 0 (0: every token)\n"),
    (["--prompt-text", "the", "--top-p", "0"], "--top-p 0.0 must be in (0, 1] (1.0: every token)"),
    (["--prompt-text", "the", "--temperature", "inf"],
     "--temperature inf must be a finite number >= 0 (0: greedy)"),
    (["--prompt-text", "the", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--prompt-text", "the", "--speech-only", "--continue-in", "text"],
     "--speech-only contradicts --continue-in text"),
    (["--prompt-text", " "], "the text prompt ' ' is empty"),
    (["--prompt-text", "the \udcff"], "a byte that is not UTF-8"),
    (["--prompt-units", "3 x"], "--prompt-units: speech unit 'x' is not an integer"),
    (["--prompt-units", "@MISSING"], "missing: no such unit file"),
], ids=["top-k", "top-p", "temperature", "max-new-tokens", "contradiction", "text-empty",
        "text-surrogate", "units-value", "units-file"])
def test_lst_generate_refuses_bad_flags_before_loading_the_model(tmp_path, capsys, monkeypatch,
                                                                 flags, message):
    """Each was refused only once the checkpoint was loaded, minutes later for a large model (and
    the tensor-parallel processes started), as lst-eval refuses its flags before."""
    monkeypatch.setattr("megatron_lst.evaluation.loading.load_inference_model",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    monkeypatch.setattr("megatron_lst.parallel.initialize_parallel",
                        lambda *args, **kwargs: pytest.fail("the processes were set up"))
    flags = [f.replace("MISSING", str(tmp_path / "missing")) for f in flags]
    assert generate_main(["--load", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lst-generate: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("main, flags", [
    (eval_main, ["--items", "items.jsonl"]),
    (generate_main, ["--prompt-text", "once"]),
], ids=["lst-eval", "lst-generate"])
def test_an_impossible_layout_is_one_line_not_a_traceback(main, flags, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text("{}\n")
    assert main(["--load", str(tmp_path), *flags, "--tensor-model-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "world size 1 is not divisible by tensor (2)" in err


def test_lst_eval_task_decodes_held_out_utterances(checkpoint, capsys):
    root, _, _ = checkpoint
    prefix = write_utterances(root / "utterances", utterances(seed=4, count=3))
    output = root / "asr.json"
    status = eval_main(["--load", str(root / "save"), "--task", "asr", "--utterances",
                        str(prefix), "--num-utterances", "2", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    results = json.loads(output.read_text())["results"]
    assert results["num_utterances"] == 2 and type(results["num_utterances"]) is int
    assert {"wer", "wer_ci_low", "cer", "hallucination_rate"} <= set(results)
    out = capsys.readouterr().out
    assert "wer: " in out and "\nnum_utterances: 2\n" in out  # a count, not "2.0000"
    output = root / "tts.json"
    status = eval_main(["--load", str(root / "save"), "--task", "tts", "--utterances",
                        str(prefix), "--asr-load", str(root / "save"), "--num-utterances", "1",
                        "--output", str(output), "--no-cache"])
    assert status == 0, capsys.readouterr().err
    results = json.loads(output.read_text())["results"]
    assert {"unit_edit_rate", "asr_cer", "global_steps_per_second"} <= set(results)


def test_more_utterances_than_the_store_holds_are_warned_of(checkpoint, capsys, caplog):
    """--num-utterances beyond the store used to be cut to the store's size without a word, so a
    result over fewer utterances than asked for passed for the one asked for."""
    root, _, _ = checkpoint
    prefix = write_utterances(root / "three_utterances", utterances(seed=4, count=3))
    output = root / "asr_of_five.json"
    status = eval_main(["--load", str(root / "save"), "--task", "asr", "--utterances",
                        str(prefix), "--num-utterances", "5", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    assert json.loads(output.read_text())["results"]["num_utterances"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"--num-utterances 5 is more than the 3 utterances of {prefix}: decoding all 3" in (
        warnings)


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_lst_eval_task_names_a_broken_utterance_before_decoding(checkpoint, capsys, monkeypatch,
                                                                task):
    root, _, _ = checkpoint
    docs = utterances(seed=4, count=3)
    docs[1].unit_ids[0] = NUM_UNITS + 3
    prefix = write_utterances(root / f"broken_{task}", docs)
    import megatron_lst.evaluation.downstream as downstream

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the utterances were checked")

    monkeypatch.setattr(downstream, "_decode", no_decoding)
    assert eval_main(["--load", str(root / "save"), "--task", task, "--utterances",
                      str(prefix)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lst-eval: {prefix}.bin, document 1: speech unit {NUM_UNITS + 3} is "
                          f"outside the codebook 0..{NUM_UNITS - 1}"), err


def test_a_model_fine_tuned_on_the_other_task_is_warned_of(checkpoint, tmp_path, capsys, caplog):
    """The ASR and TTS save directories are easily swapped: a TTS-tuned model decoded as ASR used
    to be scored without a word (its run records --task tts)."""
    root, _, _ = checkpoint
    tts_model = copy_with_edited_record(root / "save", tmp_path / "tts_model",
                                        lambda m: m["args"].update(task="tts"))
    prefix = write_utterances(tmp_path / "utterances", utterances(seed=4, count=1))
    for load, task, warned in ((tts_model, "asr", True), (tts_model, "tts", False),
                               (root / "save", "asr", False)):
        caplog.clear()
        assert eval_main(["--load", str(load), "--task", task, "--utterances", str(prefix)]) == 0
        assert (f"--load {load}/iter_0000003 was fine-tuned with --task tts, and is evaluated on "
                f"{task}: check that it is the {task.upper()} model" in caplog.text) == warned, (
            load, task)
    caplog.clear()
    assert eval_main(["--load", str(root / "save"), "--task", "tts", "--utterances", str(prefix),
                      "--asr-load", str(tts_model)]) == 0
    assert f"--asr-load {tts_model}/iter_0000003 was fine-tuned with --task tts" in caplog.text
    capsys.readouterr()


@pytest.mark.parametrize("task, aligned_flag", [("asr", "--load"), ("tts", "--load"),
                                                ("tts", "--asr-load")])
def test_lst_eval_task_refuses_an_aligned_model_naming_it_before_decoding(
        checkpoint, tmp_path, capsys, monkeypatch, task, aligned_flag):
    """The error came from the first decoding and named "utterance 0", as if the utterance were
    at fault (for --asr-load, after the first utterance's speech was generated)."""
    root, _, _ = checkpoint
    aligned = copy_with_edited_record(root / "save", tmp_path / "aligned",
                                      lambda m: m["args"].update(patching_mode="aligned"))
    prefix = write_utterances(tmp_path / "utterances", utterances(seed=4, count=2))
    monkeypatch.setattr("megatron_lst.evaluation.downstream.generate",
                        lambda *args, **kwargs: pytest.fail("decoding started"))
    loads = {"--load": root / "save", "--asr-load": root / "save", aligned_flag: aligned}
    flags = ["--load", str(loads["--load"])] + (
        ["--asr-load", str(loads["--asr-load"])] if task == "tts" else [])
    assert eval_main([*flags, "--task", task, "--utterances", str(prefix)]) == 2
    [checkpoint_dir] = aligned.glob("iter_*")
    assert capsys.readouterr().err == (
        f"lst-eval: checkpoint {checkpoint_dir}: aligned patching needs word boundaries that do "
        f"not exist while generating; generate with a static, mixed or curriculum model\n")


def test_results_that_are_not_a_number_are_written_as_null(tmp_path):
    """json.dumps wrote NaN (the steps per second of a TTS model that generated no units), which
    is no JSON: strict readers (jq, JavaScript) refused the file."""
    from megatron_lst.evaluation.eval_cli import _write_results

    output = tmp_path / "tts.json"
    assert _write_results(str(output), {"task": "tts", "results": {
        "unit_edit_rate": 1.0, "global_steps_per_second": float("nan")}}) == 0

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    written = json.loads(output.read_text(), parse_constant=refuse)
    assert written["results"] == {"unit_edit_rate": 1.0, "global_steps_per_second": None}


def test_an_asr_model_of_another_codebook_is_refused_before_decoding(checkpoint, monkeypatch,
                                                                     capsys):
    """Its ASR-CER read the TTS units as other units (a larger codebook), or stopped midway
    (a unit past a smaller one)."""
    import dataclasses

    import megatron_lst.evaluation.loading as loading
    from megatron_lst.tokenizer.text_tokenizer import joint_vocab

    root, _, _ = checkpoint
    prefix = write_utterances(root / "utterances", utterances(seed=4, count=2))
    load = loading.load_inference_model

    def asr_of_32_units(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        if Path(path).name == "asr":
            return dataclasses.replace(loaded, vocab=joint_vocab(tokenizer(), 2 * NUM_UNITS))
        return loaded

    monkeypatch.setattr(loading, "load_inference_model", asr_of_32_units)
    decoded = []
    monkeypatch.setattr("megatron_lst.evaluation.downstream.run_tts",
                        lambda *args, **kwargs: decoded.append(args))
    asr = root / "asr"
    if not asr.exists():
        asr.symlink_to(root / "save")
    assert eval_main(["--load", str(root / "save"), "--task", "tts", "--utterances", str(prefix),
                      "--asr-load", str(asr)]) == 2
    assert capsys.readouterr().err == (
        f"lst-eval: --asr-load {asr} reads {2 * NUM_UNITS} speech units but the TTS model of "
        f"--load {root / 'save'} writes {NUM_UNITS}; give an ASR model trained on the TTS "
        f"model's codebook\n")
    assert decoded == []


@pytest.mark.parametrize("flags, message", [
    (["--items", "x.jsonl", "--task", "asr"], "exactly one"),
    (["--task", "asr"], "give --utterances"),
    (["--items", "x.jsonl", "--utterances", "p"], "--utterances applies only to --task asr|tts"),
    (["--task", "asr", "--utterances", "p", "--asr-load", "d"], "applies to --task tts"),
    # Ignored: the utterances were decoded, the story-completion (or decoding) flag unused.
    (["--items", "x.jsonl", "--no-cache"], "lst-eval: --no-cache applies only to --task asr|tts"),
    (["--task", "asr", "--utterances", "p", "--modes", "ss"],
     "lst-eval: --modes applies only to story-completion --items; drop it with --task asr"),
    (["--task", "tts", "--utterances", "p", "--modes", "tt", "--truncate-context"],
     "lst-eval: --modes and --truncate-context apply only to story-completion --items; drop them "
     "with --task tts"),
    # Decoding runs one utterance at a time: --batch-size was ignored.
    (["--task", "asr", "--utterances", "p", "--batch-size", "16"],
     "lst-eval: --batch-size applies only to story-completion --items; drop it with --task asr"),
    # Checked before the work: a missing directory was a traceback after the evaluation.
    (["--items", "x.jsonl", "--output", "/nonexistent_dir/r.json"],
     "--output /nonexistent_dir/r.json: directory /nonexistent_dir does not exist"),
    (["--items", "x.jsonl", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--items", "a.jsonl", "x.jsonl", "--output", "./x.jsonl"],
     "--output ./x.jsonl is one of the --items files"),
    (["--task", "asr", "--utterances", "p", "--bootstrap-resamples", "0"],
     "--bootstrap-resamples must be >= 1, got 0"),
    # An IsADirectoryError traceback after the evaluation; the dataset's manifest overwritten.
    (["--items", "x.jsonl", "--output", "/tmp"], "--output /tmp is a directory; name the results "
                                                 "file, e.g. /tmp/results.json"),
    (["--task", "asr", "--utterances", "./utts", "--output", "utts.json"],
     "--output utts.json is a file of the --utterances dataset"),
    # An empty list (an unset shell variable) scored the default modes
    (["--items", "x.jsonl", "--modes", ""], "unknown evaluation mode ''"),
])
def test_lst_eval_task_flags_are_checked(flags, message, capsys):
    assert eval_main(["--load", "unused", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, warning", [
    (["--top-k", "5", "--top-p", "0.9"], "--temperature 0 decodes greedily (the most likely token "
     "each step): --top-k 5 and --top-p 0.9 have no effect; give a --temperature above 0 to "
     "sample with them"),
    (["--top-p", "0.5"], "--top-p 0.5 has no effect"),
    (["--top-k", "5", "--temperature", "0.7"], None),
    ([], None),
], ids=["both", "top-p", "sampled", "greedy"])
def test_sampling_flags_greedy_decoding_ignores_are_warned_of(monkeypatch, caplog, flags,
                                                               warning):
    """--top-k / --top-p with --temperature 0 (the default) were ignored without a word."""
    import megatron_lst.parallel as parallel

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(parallel, "initialize_parallel", stop)
    with pytest.raises(Stop):
        generate_main(["--load", "unused", "--prompt-text", "the", *flags])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0], warnings


def test_a_task_on_more_than_one_process_is_refused(monkeypatch, capsys):
    """Every process decoded all the utterances, printed the results and wrote --output."""
    import dataclasses

    import megatron_lst.parallel as parallel

    def two_processes(*args, **kwargs):
        return dataclasses.replace(initialize_parallel(*args, **kwargs), world_size=2)

    monkeypatch.setattr(parallel, "initialize_parallel", two_processes)
    assert eval_main(["--load", "unused", "--task", "asr", "--utterances", "unused"]) == 2
    assert ("--task decodes on one process; it was started on 2, which would all decode the same "
            "utterances") in capsys.readouterr().err


def test_loading_a_checkpoint_prints_no_torch_deprecation_warnings(checkpoint):
    """Every lst-eval, lst-generate and resume printed six lines of torch's FutureWarnings about
    the ShardedTensor checkpoint loading megatron.core does, which no user can act on."""
    import subprocess
    import sys

    root, items_path, _ = checkpoint
    run = subprocess.run([sys.executable, "-m", "megatron_lst.evaluation.eval_cli", "--load",
                          str(root / "save"), "--items", str(items_path), "--modes", "tt"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "T->T: accuracy" in run.stdout
    assert "Warning" not in run.stderr, run.stderr


def test_lst_eval_and_generate_load_one_checkpoint_directory(checkpoint, capsys):
    """docs/evaluation.md: --load takes a save directory or one checkpoint directory in it."""
    root, items_path, _ = checkpoint
    one = root / "save" / "iter_0000003"
    assert eval_main(["--load", str(one), "--items", str(items_path), "--modes", "tt"]) == 0
    assert f"checkpoint {one} (iteration 3)" in capsys.readouterr().out
    assert generate_main(["--load", str(one), "--prompt-text", WORDS[0],
                          "--max-new-tokens", "2"]) == 0


def test_ckpt_step_loads_the_checkpoint_the_damaged_save_directory_advice_names(checkpoint,
                                                                                tmp_path, capsys):
    """A save directory whose pointer names a missing checkpoint is refused with the advice to
    "pick one with --ckpt-step N", a flag lst-eval and lst-generate did not have."""
    root, items_path, _ = checkpoint
    save = tmp_path / "save"
    shutil.copytree(root / "save", save)
    (save / "latest_checkpointed_iteration.txt").write_text("7")
    prompt = ["--prompt-text", WORDS[0], "--max-new-tokens", "2"]
    assert generate_main(["--load", str(save), *prompt]) == 2
    assert "pick one with --ckpt-step N" in capsys.readouterr().err
    assert generate_main(["--load", str(save), "--ckpt-step", "3", *prompt]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
    assert eval_main(["--load", str(save), "--ckpt-step", "3", "--items", str(items_path),
                      "--modes", "tt"]) == 0
    assert f"checkpoint {save / 'iter_0000003'} (iteration 3)" in capsys.readouterr().out
    assert generate_main(["--load", str(save), "--ckpt-step", "5", *prompt]) == 2
    err = capsys.readouterr().err
    assert err == (f"lst-generate: --ckpt-step 5: {save} holds no complete checkpoint of "
                   f"iteration 5; complete ones: [3]\n")
