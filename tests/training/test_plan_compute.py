"""The compute planner (`plan`) and its command line, tools/plan_compute.py."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

from megatron_lst.models.config import preset
from megatron_lst.training.compute_plan import Budget, ControlMode, StepShape, plan
from megatron_lst.training.flops import ModelShape, StackShape, estimate_flops

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plan_compute.py"

LST = ModelShape(
    vocab_size=1020,
    global_stack=StackShape(dim=64, layers=2, heads=4),
    encoder=StackShape(dim=32, layers=1, heads=2, window=512),
    decoder=StackShape(dim=32, layers=2, heads=2, window=512),
    cross_attn_k=2,
)
BASELINE = LST.baseline_of()
STEP = StepShape(seq_length=256, global_batch_size=8, tokens_per_patch=3.1)



@pytest.mark.parametrize("budget", [Budget(flops=1e17), Budget(steps=5000, reference="lst"),
                                    Budget(steps=5000, reference="baseline")])
def test_compute_control_gives_equal_steps_and_global_positions(budget):
    p = plan(budget, LST, BASELINE, "compute", STEP)
    assert p.lst.steps == p.baseline.steps > 0
    assert p.lst.global_positions == p.baseline.global_positions
    if budget.steps is not None:
        assert p.lst.steps == budget.steps
    else:  # the baseline spends the budget, within one step
        assert budget.flops - p.baseline.flops_per_step.total < p.baseline.flops.total <= budget.flops
    # LST reads tokens_per_patch tokens per global position.
    assert p.lst.tokens == pytest.approx(STEP.tokens_per_patch * p.baseline.tokens)


@pytest.mark.parametrize("budget", [Budget(flops=3e17), Budget(steps=4321, reference="lst"),
                                    Budget(steps=4321, reference="baseline")])
def test_flops_control_gives_equal_totals(budget):
    p = plan(budget, LST, BASELINE, ControlMode.FLOPS, STEP)
    total = budget.flops or getattr(p, budget.reference).flops.total
    for model in (p.lst, p.baseline):
        assert total - model.flops_per_step.total < model.flops.total <= total * (1 + 1e-12)
    if budget.steps is not None:
        assert getattr(p, budget.reference).steps == budget.steps
    # LST costs more per global position here, so it gets fewer steps for the same FLOPs.
    assert p.lst.steps < p.baseline.steps


@pytest.mark.parametrize("reference", ["lst", "baseline"])
def test_data_control_gives_equal_tokens(reference):
    p = plan(Budget(steps=1000, reference=reference), LST, BASELINE, "data", STEP)
    assert getattr(p, reference).steps == 1000
    follower = p.baseline if reference == "lst" else p.lst
    ref_tokens = getattr(p, reference).tokens
    assert ref_tokens - follower.tokens_per_step < follower.tokens <= ref_tokens


def test_a_model_following_itself_keeps_its_steps():
    # Every patch one token: LST and baseline read the same tokens per step.
    step = StepShape(seq_length=256, global_batch_size=8, tokens_per_patch=1.0)
    assert plan(Budget(steps=777, reference="lst"), LST, BASELINE, "data", step).baseline.steps == 777


def test_plan_flops_per_step_is_the_estimate():
    p = plan(Budget(steps=10), LST, BASELINE, "compute", STEP)
    assert p.lst.flops_per_step == estimate_flops(LST, 256 * 3.1, 256, 8)
    assert p.baseline.flops_per_step == estimate_flops(BASELINE, 256, 256, 8)
    assert p.lst.flops.total == pytest.approx(10 * p.lst.flops_per_step.total)


def test_bad_budgets_and_arguments_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        Budget(flops=1e18, steps=10)
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="positive"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="positive"):
        Budget(flops=0.0)
    with pytest.raises(ValueError, match="'lst' or 'baseline'"):
        Budget(steps=1, reference="bpe")
    with pytest.raises(ValueError, match="tokens_per_patch"):
        StepShape(256, 8, 0.5)
    # Infinite or NaN amounts used to end in an OverflowError from Fraction, or a message about
    # "integer ratio" that named no flag.
    for amount in (math.inf, math.nan):
        with pytest.raises(ValueError, match="positive and finite"):
            Budget(flops=amount)
        with pytest.raises(ValueError, match="a finite tokens_per_patch"):
            StepShape(256, 8, amount)
    with pytest.raises(ValueError, match="LST shape first"):
        plan(Budget(steps=1), BASELINE, LST, "compute", STEP)
    with pytest.raises(ValueError, match="'tokens' is not a valid ControlMode"):
        plan(Budget(steps=1), LST, BASELINE, "tokens", STEP)


def test_a_budget_below_one_step_is_refused_naming_the_model():
    baseline_step, lst_step = STEP.flops(BASELINE).total, STEP.flops(LST).total
    assert 1.5 * baseline_step < lst_step
    for mode in ControlMode:  # the reference model (the baseline) cannot take one step
        with pytest.raises(ValueError, match=f"no training step of baseline under {mode.value}"):
            plan(Budget(flops=0.5 * baseline_step), LST, BASELINE, mode, STEP)
    # One baseline step and not one LST step: only equal FLOPs leaves LST without a step.
    between = Budget(flops=1.5 * baseline_step)
    assert plan(between, LST, BASELINE, "compute", STEP).lst.steps == 1
    with pytest.raises(ValueError, match="no training step of lst under flops control"):
        plan(between, LST, BASELINE, "flops", STEP)


def test_model_shape_from_the_paper_1b_preset():
    shape = ModelShape.from_model_config(preset("paper-1b", vocab_size=32508))
    assert shape.global_stack == StackShape(dim=2048, layers=25, heads=16, ffn_hidden=5632)
    assert shape.encoder == StackShape(dim=1024, layers=1, heads=16, ffn_hidden=2816, window=512)
    assert shape.decoder.layers == 9 and shape.cross_attn_k == 2 and not shape.needs_global_projection
    # Baseline per token: 6 * (non-embedding params + head) + causal attention over 2048 tokens.
    params = 25 * (4 * 2048**2 + 3 * 2048 * 5632) + 2048 * 32508
    attention = 3 * 4 * 25 * 2048 * (2048 + 1) / 2
    per_token = estimate_flops(shape.baseline_of(), 2048, 2048, 1).total / 2048
    assert per_token == pytest.approx(6 * params + attention, rel=1e-12)


def test_tool_prints_every_control_mode_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = load_tool("plan_compute").main([
        "--budget-flops", "1e17", "--preset", "tiny", "--text-vocab-size", "512",
        "--seq-length", "256", "--global-batch-size", "8", "--tokens-per-patch", "3.1",
        "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for mode in ("compute", "flops", "data"):
        assert f"control {mode}: budget 1.000e+17 FLOPs" in printed
    written = json.loads(out.read_text())
    assert written["model"]["shape"]["vocab_size"] == 512 + 6 + 502
    plans = {p["control"]: p for p in written["plans"]}
    assert plans["compute"]["lst"]["steps"] == plans["compute"]["baseline"]["steps"]
    flops_plan = plans["flops"]
    for model in ("lst", "baseline"):
        spent = flops_plan[model]["flops"]["total"]
        assert 1e17 - flops_plan[model]["flops_per_step"]["total"] < spent <= 1e17
    # The tiny preset is the LST shape above with a 1020-id vocabulary.
    assert plans["compute"]["lst"]["flops_per_step"] == plan(
        Budget(flops=1e17), LST, BASELINE, "compute", STEP
    ).lst.flops_per_step.as_dict()


def test_tool_that_fills_the_disk_keeps_the_earlier_plan(tmp_path, capsys, disk_full_at):
    """--out was opened (emptied) and then written: a disk that filled part way left half a
    JSON where the earlier plan was, after a traceback. (The benchmark tools' JSON, too.)"""
    out = tmp_path / "plan.json"
    out.write_text('{"earlier": "plan"}\n')
    with disk_full_at(200):
        status = load_tool("plan_compute").main([
            "--budget-flops", "1e17", "--preset", "tiny", "--text-vocab-size", "512",
            "--seq-length", "256", "--global-batch-size", "8", "--tokens-per-patch", "3.1",
            "--out", str(out)])
    assert status == 2
    assert capsys.readouterr().err == (f"plan_compute: cannot write --out {out} (File too "
                                       f"large); the plans are printed above\n")
    assert out.read_text() == '{"earlier": "plan"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_tool_with_explicit_dimensions_matches_the_preset(capsys):
    tool = load_tool("plan_compute")
    common = ["--budget-steps", "100", "--reference", "lst", "--control", "compute",
              "--text-vocab-size", "512", "--seq-length", "256", "--global-batch-size", "8",
              "--tokens-per-patch", "2"]
    assert tool.main([*common, "--preset", "tiny"]) == 0
    from_preset = capsys.readouterr().out
    assert tool.main([*common, "--global-dim", "64", "--global-layers", "2", "--global-heads", "4",
                      "--local-dim", "32", "--encoder-layers", "1", "--decoder-layers", "2",
                      "--local-heads", "2"]) == 0
    assert capsys.readouterr().out == from_preset


def test_tool_plans_the_head_shapes_lst_train_can_set(tmp_path):
    """A model with grouped key/value heads and head sizes other than width / heads (lst-train
    --kv-channels, --local-*-query-groups, --local-*-kv-channels) is planned with its own FLOPs:
    the planner had no flags for the head sizes or the local key/value heads."""
    tool = load_tool("plan_compute")
    dims = ["--global-dim", "64", "--global-layers", "2", "--global-heads", "4",
            "--local-dim", "32", "--encoder-layers", "1", "--decoder-layers", "2",
            "--local-heads", "4"]
    common = ["--budget-steps", "100", "--reference", "lst", "--control", "compute",
              "--text-vocab-size", "512", "--seq-length", "256", "--global-batch-size", "8",
              "--tokens-per-patch", "2", *dims]
    plain, shaped = tmp_path / "plain.json", tmp_path / "shaped.json"
    assert tool.main([*common, "--out", str(plain)]) == 0
    assert tool.main([*common, "--global-kv-channels", "24", "--local-kv-heads", "2",
                      "--local-kv-channels", "12", "--out", str(shaped)]) == 0

    def lst_flops(path):
        [computed] = json.loads(path.read_text())["plans"]
        return computed["lst"]["flops"]

    # Independent count of the change (training = 3 x forward; 100 steps of 8 rows of 256
    # patches, 2 tokens each). Projections per position and layer: q and o 2 * dim * (heads x
    # head size), k and v 2 * dim * head size * key/value heads, against 4 * dim^2 before;
    # attention products 4 * (heads x head size) per query-key pair and layer.
    rows, patches, tokens = 100 * 8, 256, 512
    global_pairs, local_pairs = patches * (patches + 1) // 2, tokens * (tokens + 1) // 2

    def change(layers, positions, pairs, dim, attention_dim, kv_width):
        dense = 2 * positions * layers * (2 * dim * attention_dim + 2 * dim * kv_width
                                          - 4 * dim * dim)
        attention = 4 * layers * (attention_dim - dim) * pairs
        return 3 * rows * (dense + attention)

    plain_flops, shaped_flops = lst_flops(plain), lst_flops(shaped)
    expected = {"global": change(2, patches, global_pairs, 64, 4 * 24, 4 * 24),
                "encoder": change(1, tokens, local_pairs, 32, 4 * 12, 2 * 12),
                "decoder": change(2, tokens, local_pairs, 32, 4 * 12, 2 * 12),
                "cross_attention": 0, "head": 0}
    for part, value in expected.items():
        assert shaped_flops[part] - plain_flops[part] == pytest.approx(value, rel=1e-9), part


def test_tool_reports_bad_model_arguments(capsys):
    tool = load_tool("plan_compute")
    common = ["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "8",
              "--tokens-per-patch", "2"]
    assert tool.main([*common, "--global-dim", "64"]) == 2
    assert "give the model dimensions --global-layers" in capsys.readouterr().err
    assert tool.main([*common, "--preset", "tiny", "--local-dim", "32"]) == 2
    assert "use a preset or the dimension flags" in capsys.readouterr().err
    assert tool.main([*common, "--preset", "tiny", "--cross-attn-k", "4"]) == 2
    assert "--cross-attn-k both given" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--pipeline-model-parallel-size", "0"], "--pipeline-model-parallel-size must be at least 1"),
    (["--out", "/nonexistent_dir/plan.json"], "directory /nonexistent_dir does not exist"),
    # the tiny preset's 2 global layers (the error came after the tables)
    (["--pipeline-model-parallel-size", "4"], "2 global layers cannot be split over 4 pipeline stages (each needs at least 1): use "
     "--pipeline-model-parallel-size 2 or less"),
    (["--micro-batch-size", "3"], "--global-batch-size 8 is not a multiple of --micro-batch-size x "
     "--data-parallel-size = 3"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1, got 0"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
     "--num-virtual-stages-per-pipeline-rank needs --micro-batch-size"),
    # lst-train's own layout checks (parallel.virtual_pipeline_size)
    (["--num-virtual-stages-per-pipeline-rank", "2", "--micro-batch-size", "1"],
     "it needs --pipeline-model-parallel-size 2 or more"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
      "--micro-batch-size", "1"], "must divide every pipeline stage's global layers [1, 1]"),
])
def test_tool_checks_its_flags_before_planning(flags, message, capsys):
    """A pipeline size below 1 was ignored (no split printed, status 0), and a missing --out
    directory was a traceback after the tables."""
    common = ["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "8",
              "--tokens-per-patch", "2", "--preset", "tiny"]
    assert load_tool("plan_compute").main([*common, *flags]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.slow  # a fresh interpreter imports megatron.core through megatron_lst.models
def test_tool_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(TOOL), "--budget-steps", "10", "--preset", "tiny", "--control", "data",
         "--seq-length", "64", "--global-batch-size", "2", "--tokens-per-patch", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "control data: budget 10 steps of baseline" in result.stdout


def test_pipeline_split_balances_the_stages():
    tool = load_tool("plan_compute")
    from megatron_lst.training.flops import FlopBreakdown

    # Only global layers: megatron's even split wins where there is one.
    split = tool.balanced_pipeline_split(24, 4, FlopBreakdown(global_=24.0))
    assert (split.first, split.last, split.timing) == (None, None, None)
    # A last stage carrying the cost of 5 layers besides its own gets fewer layers:
    # 25 layers + 5 over 2 stages balance at 15 + (10 + 5).
    split = tool.balanced_pipeline_split(25, 2, FlopBreakdown(global_=25.0, head=5.0))
    assert split.costs == [15.0, 15.0] and split.layers == [15, 10]


def test_known_micro_batches_pick_the_split_with_the_shortest_simulated_step():
    """The planner balanced the largest stage only; with 2 micro-batches over 2 stages a heavier
    first stage hides in the pipeline's fill (pipeline_schedule_model's hand-worked case): 18 | 12
    steps in 21 where the balanced 15 | 15 takes 22.5 (FLOPs as time)."""
    tool = load_tool("plan_compute")
    from megatron_lst.training.flops import FlopBreakdown
    from megatron_lst.training.pipeline_schedule_model import simulate

    flops = FlopBreakdown(global_=24.0, head=6.0)
    split = tool.balanced_pipeline_split(24, 2, flops, num_micro_batches=2)

    def step_time(first_layers):  # stage FLOPs per micro-batch; forward a third, backward 2/3
        per_micro_batch = [first_layers / 2, (24 - first_layers + 6) / 2]
        return simulate([c / 3 for c in per_micro_batch], [c * 2 / 3 for c in per_micro_batch],
                        2, 2).step_time

    assert split.timing.step_time == min(step_time(n) for n in range(1, 24))
    assert split.timing.step_time < step_time(15) == 22.5
    assert split.costs == [18.0, 12.0] and split.timing.step_time == 21.0
    assert split.timing.bubble == pytest.approx(1 - 30 / 42)


def test_pipeline_bubble_is_the_idle_share_of_a_1f1b_step():
    """Narayanan et al. 2021: the bubble is (p - 1) / m of the ideal time, / v interleaved; of the
    whole step (ideal + bubble) that is (p - 1) / (v m + p - 1)."""
    tool = load_tool("plan_compute")
    assert tool.pipeline_bubble(4, 1, 8) == pytest.approx(3 / 11)
    ideal_share = 3 / (2 * 8)  # p = 4, v = 2, m = 8
    assert tool.pipeline_bubble(4, 2, 8) == pytest.approx(ideal_share / (1 + ideal_share))
    assert tool.pipeline_bubble(1, 1, 8) == 0


def test_tool_prints_the_bubble_of_the_flags_micro_batches(capsys):
    """The split came without the bubble, and virtual stages were unknown to the planner."""
    tool = load_tool("plan_compute")
    common = ["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "16",
              "--tokens-per-patch", "2", "--preset", "tiny", "--control", "compute",
              "--pipeline-model-parallel-size", "2"]
    assert tool.main(common) == 0
    assert "pipeline bubble: give --micro-batch-size" in capsys.readouterr().out
    # 16 rows / (2 rows x 2 replicas) = 4 micro-batches: (2 - 1) / (4 + 2 - 1) with equal stages,
    # more over the tiny preset's unequal ones.
    assert tool.main([*common, "--micro-batch-size", "2", "--data-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    simulated = re.search(r"pipeline bubble: ([0-9.]+)% of a step idle, megatron's 1F1B schedule "
                          r"simulated over these stages", out)
    assert simulated and float(simulated.group(1)) > 20.0
    assert ("equal-stage formula (p - 1) / (v m + p - 1) = (2 - 1) / (1 x 4 + 2 - 1) = 20.0%"
            in out)
    # Each stage's 1 global layer is 1 chunk per rank; 8 micro-batches.
    assert tool.main([*common, "--micro-batch-size", "2", "--num-virtual-stages-per-pipeline-rank",
                      "1"]) == 0
    assert "(2 - 1) / (1 x 8 + 2 - 1) = 11.1%" in capsys.readouterr().out


def test_tool_writes_the_pipeline_split_and_both_bubbles_to_its_json(tmp_path, capsys):
    """--out held the plans only: the suggested split and its bubble were on the screen alone."""
    tool = load_tool("plan_compute")
    out = tmp_path / "plan.json"
    common = ["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "16",
              "--tokens-per-patch", "2", "--preset", "tiny", "--control", "compute",
              "--out", str(out)]
    assert tool.main(common) == 0
    assert "pipeline" not in json.loads(out.read_text())
    assert tool.main([*common, "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                      "--data-parallel-size", "2"]) == 0
    printed = capsys.readouterr().out
    pipeline = json.loads(out.read_text())["pipeline"]
    assert pipeline["layers_per_stage"] == [1, 1] and pipeline["micro_batches_per_step"] == 4
    assert pipeline["bubble_equal_stages"] == pytest.approx(0.2)
    assert f"pipeline bubble: {pipeline['bubble_simulated']:.1%} of a step idle" in printed
    assert pipeline["bubble_simulated"] > pipeline["bubble_equal_stages"]


def test_a_step_too_long_to_simulate_gets_the_imbalance_bound(monkeypatch, capsys):
    """A --global-batch-size given in tokens, not rows, makes millions of micro-batches: the
    simulation would run for minutes and hold gigabytes. Above MAX_SIMULATED_PASSES the planner
    balances the largest stage and prints the bound every schedule obeys instead."""
    tool = load_tool("plan_compute")
    from megatron_lst.training.flops import FlopBreakdown

    monkeypatch.setattr(tool, "MAX_SIMULATED_PASSES", 15)  # 2 stages x 4 micro-batches x 2 = 16
    flops = FlopBreakdown(global_=24.0, head=6.0)
    split = tool.balanced_pipeline_split(24, 2, flops, num_micro_batches=4)
    assert split.timing is None and split.costs == [15.0, 15.0]
    assert tool.main(["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "16",
                      "--tokens-per-patch", "2", "--preset", "tiny", "--control", "compute",
                      "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                      "--data-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pipeline bubble: at least [0-9.]+% of a step idle \(the stages' "
                     r"imbalance\); not simulated: a step of 4 micro-batches has 16 passes, more "
                     r"than the planner simulates \(15\)", out)
    assert "equal-stage formula (p - 1) / (v m + p - 1) = (2 - 1) / (1 x 4 + 2 - 1) = 20.0%" in out


def test_virtual_stages_restrict_the_split_to_layers_they_divide():
    tool = load_tool("plan_compute")
    from megatron_lst.training.flops import FlopBreakdown

    # 24 layers + a head of 6 on the last stage balance at 15 | 9 + 6, but 2 chunks per rank need
    # an even number of layers on each stage: 14 | 10 + 6 or 16 | 8 + 6 it is.
    flops = FlopBreakdown(global_=24.0, head=6.0)
    assert tool.balanced_pipeline_split(24, 2, flops).costs == [15.0, 15.0]
    split = tool.balanced_pipeline_split(24, 2, flops, 2, 4)
    assert sorted(split.costs) == [14.0, 16.0]
    assert all(n % 2 == 0 for n in split.layers)


def test_padded_lst_rows_cost_their_max_tokens_and_consume_their_real_tokens():
    """lst-train pads every LST row to --max-tokens and counts (and logs) FLOPs over all of
    them; the planner used to cost a step at seq_length x tokens_per_patch tokens, so a plan
    at 3.1 tokens per patch for rows of 4 x seq_length positions undercounted each LST step and
    equal-FLOPs control gave LST more FLOPs than the baseline."""
    padded = StepShape(seq_length=256, global_batch_size=8, tokens_per_patch=3.1, max_tokens=1024)
    # Training counts rows of 1024 positions over 256 patches (flops_per_batch).
    assert padded.flops(LST) == estimate_flops(LST, 1024, 256, 8)
    assert padded.flops(BASELINE) == STEP.flops(BASELINE)
    budget = Budget(flops=50 * padded.flops(BASELINE).total)
    equal_flops = plan(budget, LST, BASELINE, "flops", padded)
    assert equal_flops.lst.flops.total <= budget.flops < equal_flops.lst.flops.total \
        + padded.flops(LST).total
    assert equal_flops.lst.steps < plan(budget, LST, BASELINE, "flops", STEP).lst.steps
    # The data a step consumes is still the real tokens.
    equal_data = plan(budget, LST, BASELINE, "data", padded)
    assert equal_data.lst.tokens_per_step == 256 * 8 * 3.1
    assert equal_data.lst.steps == math.floor(equal_data.baseline.tokens / (256 * 8 * 3.1))


@pytest.mark.parametrize("max_tokens, tokens_per_patch, message", [
    (200, 1.0, "max_tokens 200 is smaller than seq_length 256"),
    (1024, 4.5, "do not fit in max_tokens 1024 positions; a row holds at most 4 tokens per patch"),
])
def test_impossible_rows_are_refused(max_tokens, tokens_per_patch, message):
    with pytest.raises(ValueError, match=message):
        StepShape(256, 8, tokens_per_patch, max_tokens=max_tokens)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "tiyn"], "invalid choice: 'tiyn'"),
    (["--preset", "tiny", "--seq-length", "0"], "needs seq_length >= 2"),
    (["--preset", "tiny", "--global-batch-size", "-8"], "global_batch_size >= 1"),
    (["--preset", "tiny", "--tokens-per-patch", "0.5"], "a finite tokens_per_patch >= 1"),
    (["--preset", "tiny", "--max-tokens", "100"], "max_tokens 100 is smaller than seq_length 256"),
    (["--preset", "tiny", "--max-tokens", "300"], "a row holds at most 1.17188 tokens per patch"),
    # used to be an OverflowError traceback from Fraction(inf)
    (["--preset", "tiny", "--tokens-per-patch", "1e307"], "beyond float range"),
    (["--global-dim", "0", "--global-layers", "2", "--global-heads", "2", "--local-dim", "8",
      "--encoder-layers", "1", "--decoder-layers", "1", "--local-heads", "2"],
     "global hidden_size (0), num_layers (2), num_heads (2)"),
])
def test_tool_refuses_crafted_sizes_with_one_clear_error(flags, message, capsys):
    # A flag given twice takes its last value, so `flags` override these.
    argv = ["--budget-steps", "10", "--seq-length", "256", "--global-batch-size", "8",
            "--tokens-per-patch", "2", *flags]
    tool = load_tool("plan_compute")
    try:
        status = tool.main(argv)
    except SystemExit as exit_:  # argparse's own refusal
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert message in captured.err and "Traceback" not in captured.err


def test_the_plan_agrees_with_what_training_logs(tmp_path):
    """A few steps of lst-train on the tiny CPU preset log the planner's FLOPs per step, to the
    one term the planner estimates: with cross-attention windows (16) wider than the rows' 8
    patches, a row's encoder and decoder cross-attention pairs add up to P (N + 1) - 1 whatever
    its patches, where the planner's even patches give N (2P + 1) / 2."""
    from data.document_cases import VOCAB  # the vocabulary of write_corpus's stores

    from megatron_lst.training.arguments import parse_args, validate_args
    from megatron_lst.training.loop import pretrain
    from megatron_lst.training.model_provider import lst_config_from_args
    from training.training_cases import tiny_flags, write_corpus

    args = validate_args(parse_args(tiny_flags(write_corpus(tmp_path)) + ["--train-iters", "3"]), 1)
    rows, patches, tokens = args.global_batch_size, args.seq_length, args.max_tokens
    config = lst_config_from_args(args, VOCAB.size, VOCAB.eos_id)
    xattn = config.cross_attention
    assert min(xattn.encoder_window, xattn.decoder_window) >= patches
    assert not (xattn.all_encoder_layers and config.encoder.num_layers > 1)
    assert not (xattn.all_decoder_layers and config.decoder.num_layers > 1)

    planned = StepShape(patches, rows, 1.0, max_tokens=tokens).flops(
        ModelShape.from_model_config(config)).total
    estimated_pairs = rows * tokens * (2 * patches + 1) / 2
    true_pairs = rows * (patches * (tokens + 1) - 1)
    per_pair = 3 * 4 * config.encoder.hidden_size * xattn.slots_per_patch
    logged = pretrain(args).flops
    steps = [logged[i] - logged.get(i - 1, 0.0) for i in sorted(logged)]
    assert steps == [planned - per_pair * (estimated_pairs - true_pairs)] * 3


def test_a_control_named_twice_is_planned_once(capsys):
    argv = ["--budget-steps", "10", "--seq-length", "64", "--global-batch-size", "2",
            "--tokens-per-patch", "2", "--preset", "tiny", "--control", "flops", "data", "flops"]
    assert load_tool("plan_compute").main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("control flops:") == 1 and out.count("control data:") == 1
