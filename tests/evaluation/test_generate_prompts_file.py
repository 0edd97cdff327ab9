"""`lst-generate --prompts FILE` and `--num-samples`: every prompt of a JSON Lines file continued
on one loaded model, each continuation the one the single-prompt flags give with its seed; a bad
file refused naming its line before the model loads, a prompt the model refuses before the first
is generated."""

import json
import re

import pytest
from distributed.harness import WORKERS_DIR, run_torchrun
from eval_cases import NUM_UNITS, save_tiny_checkpoint

from megatron_lst.evaluation.generate_cli import generate_main
from megatron_lst.parallel import destroy_parallel, initialize_parallel

SAMPLING = ["--max-new-tokens", "6", "--temperature", "1.0", "--seed", "11"]


@pytest.fixture(scope="module")
def save(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_prompts")
    initialize_parallel(seed=3)
    try:
        save_tiny_checkpoint(root / "save")
    finally:
        destroy_parallel()
    return root / "save"


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_each_prompt_and_sample_is_what_the_single_prompt_flags_give(save, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "girl", "text": "the girl ran"}\n\n{"units": [3, 3, 7, 1, 0]}\n')
    assert generate_main(["--load", str(save), "--prompts", str(prompts), "--num-samples", "2",
                          *SAMPLING]) == 0
    batch = _lines(capsys)
    assert [(line["id"], line["sample"]) for line in batch] == [
        ("girl", 0), ("girl", 1), ("3", 0), ("3", 1)]  # an id defaults to the line number
    assert batch[0]["tokens"] != batch[1]["tokens"]  # other seeds: other samples
    single = []
    for prompt in (["--prompt-text", "the girl ran"], ["--prompt-units", "3 3 7 1 0"]):
        for seed in ("11", "12"):
            flags = [*SAMPLING[:-1], seed]
            assert generate_main(["--load", str(save), *prompt, *flags]) == 0
            single.extend(_lines(capsys))
    for line, one in zip(batch, single, strict=True):
        del line["seconds"], one["seconds"]
        assert {k: v for k, v in line.items() if k not in ("id", "sample")} == one


@pytest.mark.slow
@pytest.mark.distributed
def test_data_parallel_replicas_share_the_prompts_and_print_the_lines_of_one_process(
        save, tmp_path, capsys):
    """Two replicas, five jobs (rounds of two, the last of one): every line once, in file
    order, each the one process's (they were refused: each would have repeated the work)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "text": "the girl ran"}\n{"units": [3, 3, 7, 1, 0]}\n'
                       '{"id": "c", "text": "a boy"}\n{"units": [5, 2]}\n{"text": "the"}\n')
    flags = ["--load", str(save), "--prompts", str(prompts), *SAMPLING]
    assert generate_main(flags) == 0
    alone = _lines(capsys)
    launch = run_torchrun(2, [WORKERS_DIR / "generate_worker.py", *flags])
    assert launch.returncode == 0, launch.output[-3000:]
    replicas = [json.loads(line) for line in launch.output.splitlines() if line.startswith("{")]
    assert [line["id"] for line in replicas] == ["a", "2", "c", "4", "5"]
    for line in (*alone, *replicas):
        del line["seconds"]
    assert replicas == alone


@pytest.mark.parametrize("text, message", [
    ('{"text": "the", "unit": [1]}\n', r"prompts.jsonl:1: unknown key 'unit'"),
    ('{"text": "the"}\n{"text": "a", "units": [1]}\n',
     r"prompts.jsonl:2: give exactly one of \"text\" and \"units\""),
    ('{"id": "x", "text": "the"}\n{"id": "x", "text": "a"}\n',
     r"prompts.jsonl:2: the id 'x' is also the id of line 1"),
    ('{"units": [1, true]}\n', r"prompts.jsonl:1: \"units\" must be a non-empty list of integer"),
    ('{"units": []}\n', r"prompts.jsonl:1: \"units\" must be a non-empty list"),
    ('{"text": 3}\n', r"prompts.jsonl:1: \"text\" must be a string, got int"),
    ('{"text": "the"}\n{"text": " \\t "}\n', r"prompts.jsonl:2: the text prompt .* is empty"),
    ('{"text": "the \\ud800"}\n', r"prompts.jsonl:1: the text prompt holds .*half a surrogate"),
    ('{"id": true, "text": "the"}\n', r"prompts.jsonl:1: \"id\" must be a non-empty string"),
    ('["the"]\n', r"prompts.jsonl:1: a prompt must be a JSON object, got list"),
    ('{"text": "the"\n', r"prompts.jsonl:1: not a JSON object"),
    ("\n \n", r"prompts.jsonl holds no prompts"),
], ids=["misspelt-key", "text-and-units", "repeated-id", "bool-unit", "no-units", "text-type",
        "empty-text", "lone-surrogate", "id-type", "not-object", "not-json", "blank"])
def test_a_bad_prompts_file_is_refused_naming_its_line_before_the_model_loads(
        tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr("megatron_lst.evaluation.loading.load_inference_model",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    (tmp_path / "prompts.jsonl").write_text(text)
    assert generate_main(["--load", str(tmp_path), "--prompts",
                          str(tmp_path / "prompts.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lst-generate: ") and err.count("\n") == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("units, message", [
    ([1, NUM_UNITS], f"prompts.jsonl:2: the unit prompt holds unit {NUM_UNITS}, outside"),
    ([3] * 2000, r"prompts.jsonl:2: the prompt needs \d+ global positions, patches"),
], ids=["codebook", "context"])
def test_a_prompt_the_model_refuses_stops_the_run_before_any_is_generated(save, tmp_path, capsys,
                                                                           units, message):
    """Line 2's prompt would be refused only after line 1's continuations were generated."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f'{{"text": "the girl"}}\n{{"units": {units}}}\n')
    assert generate_main(["--load", str(save), "--prompts", str(prompts), *SAMPLING]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(message, captured.err), captured.err


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
    (["--num-samples", "3"], "--num-samples 3 with --temperature 0 (greedy) would print the "
                             "same continuation 3 times"),
    (["--num-samples", "3", "--temperature", "1", "--seed", "2147483646"],
     "--seed 2147483646 + --num-samples 3 - 1 is past the largest seed"),
], ids=["none", "greedy", "seed-range"])
def test_num_samples_is_refused_where_it_cannot_sample(tmp_path, capsys, flags, message):
    assert generate_main(["--load", str(tmp_path), "--prompt-text", "the", *flags]) == 2
    assert message in capsys.readouterr().err
