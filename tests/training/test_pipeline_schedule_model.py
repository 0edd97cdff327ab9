"""The discrete-event model of megatron-core's 1F1B schedules (pipeline_schedule_model)."""

import itertools
import random
import types

import pytest

from megatron_lst.training.pipeline_schedule_model import (
    Pass,
    rank_passes,
    schedule_table,
    simulate,
    warmup_forwards,
)


def _timing(forward_times, pp, num_micro_batches):
    """The simulated step with every backward twice its forward, as the planner counts FLOPs."""
    return simulate(forward_times, [2 * t for t in forward_times], pp, num_micro_batches)


def _layouts():
    """(p, v, m) that megatron's schedules accept: interleaving needs p >= 2 and m a multiple of p."""
    for pp, virtual, micro in itertools.product((1, 2, 3, 4, 8), (1, 2, 3, 4), range(1, 17)):
        if virtual == 1 or (pp >= 2 and micro % pp == 0):
            yield pp, virtual, micro


@pytest.mark.parametrize(("pp", "virtual", "micro"), list(_layouts()))
def test_equal_stages_give_narayanans_bubble(pp, virtual, micro):
    """Narayanan et al. 2021: with stages of equal time t per chunk and micro-batch the step is (v m + p - 1) t
    and (p - 1) / (v m + p - 1) of it idle."""
    timing = _timing([1.0] * (pp * virtual), pp, micro)
    assert timing.step_time == pytest.approx((virtual * micro + pp - 1) * 3)
    assert timing.bubble == pytest.approx((pp - 1) / (virtual * micro + pp - 1))


def test_hand_worked_two_stages_two_micro_batches():
    """p = 2, m = 2; forward 3 on stage 0 and 2 on stage 1, backward twice that:

        rank 0: F0 0-3   F1 3-6   (waits)  B0 9-15   B1 15-21
        rank 1:          F0 3-5   B0 5-9   F1 9-11   B1 11-15

    21 of time, 30 of work on 2 ranks: 1 - 30 / 42 idle. The slower stage first hides part of
    the fill: the last-stage-slowest closed form would give 24."""
    timing = _timing([3.0, 2.0], 2, 2)
    assert timing.step_time == 21.0 and timing.busy == (18.0, 12.0)
    assert timing.bubble == pytest.approx(1 - 30 / 42)
    # Mirrored, the slow stage last: rank 0 F0 0-2 F1 2-4 ... B1 ends at 2 + 2 x 9 + 4 = 24.
    assert _timing([2.0, 3.0], 2, 2).step_time == 24.0


def test_a_slowest_last_stage_gives_the_closed_form():
    """Non-interleaved 1F1B whose last stage is the slowest (t_s = forward + backward per
    micro-batch): micro-batch 0 reaches the last stage after sum_{s < p-1} f_s; from then on the
    last stage, which runs one forward and one backward at a time without warm-up, is never
    starved (every earlier stage is faster), so it ends after m t_{p-1}, and its last backward
    then runs down the idle earlier stages in sum_{s < p-1} b_s:
    step = sum_s t_s + (m - 1) t_{p-1}."""
    rng = random.Random(7)
    for _ in range(300):
        pp, micro = rng.randint(1, 6), rng.randint(1, 12)
        forwards = [float(rng.randint(1, 9)) for _ in range(pp)]
        forwards[-1] = max(forwards)
        stage_times = [3 * f for f in forwards]
        assert _timing(forwards, pp, micro).step_time == pytest.approx(
            sum(stage_times) + (micro - 1) * stage_times[-1]), (forwards, micro)


def test_unequal_stages_idle_more_than_equal_ones():
    """The same work split unevenly takes longer than the equal-stage step: the bubble printed
    from (p - 1) / (v m + p - 1) is optimistic."""
    equal = _timing([2.0, 2.0, 2.0, 2.0], 4, 8)
    unequal = _timing([2.0, 1.5, 1.5, 3.0], 4, 8)
    assert unequal.step_time > equal.step_time and unequal.bubble > equal.bubble


def test_unequal_interleaved_steps_respect_their_bounds_and_grow_with_any_stage():
    """A step is never shorter than its busiest rank's work nor than one micro-batch's forward
    and backward through every virtual stage in turn; with each rank's order fixed, slowing any
    pass cannot shorten it. (The dependencies themselves are pinned by the exact cases above.)"""
    rng = random.Random(11)
    for _ in range(60):
        pp, virtual = rng.randint(2, 4), rng.randint(2, 3)
        micro = pp * rng.randint(1, 3)
        forwards = [float(rng.randint(1, 6)) for _ in range(pp * virtual)]
        timing = _timing(forwards, pp, micro)
        assert timing.step_time >= max(timing.busy) - 1e-9
        assert timing.step_time >= 3 * sum(forwards) - 1e-9
        slower = list(forwards)
        slower[rng.randrange(len(slower))] += 1.0
        assert _timing(slower, pp, micro).step_time >= timing.step_time - 1e-9


def _longest_path_step(forwards, backwards, pp, micro):
    """The step as the longest path through the graph of passes (an independent reading of the
    model): a pass follows its predecessor on its rank and its input from the neighbouring
    virtual stage, and ends its own duration after the later of the two."""
    stages = len(forwards)
    virtual = stages // pp

    edges = {}  # pass -> the passes it waits for
    for rank in range(pp):
        previous = None
        for current in rank_passes(pp, rank, micro, virtual):
            stage = current.chunk * pp + rank
            here = (current.kind, stage, current.micro_batch)
            waits = [previous] if previous else []
            if current.kind == "F" and stage > 0:
                waits.append(("F", stage - 1, current.micro_batch))
            if current.kind == "B":
                waits.append(("B", stage + 1, current.micro_batch) if stage < stages - 1
                             else ("F", stage, current.micro_batch))
            edges[here], previous = waits, here
    ends = {}
    for start in edges:  # iterative depth-first evaluation of end = max(waits) + duration
        stack = [start]
        while stack:
            top = stack[-1]
            pending = [w for w in edges[top] if w not in ends]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            kind, stage, _ = top
            duration = forwards[stage] if kind == "F" else backwards[stage]
            ends[top] = max((ends[w] for w in edges[top]), default=0.0) + duration
    return max(ends.values())


def test_the_simulation_agrees_with_the_longest_path_through_the_passes():
    rng = random.Random(5)
    for _ in range(80):
        pp, virtual = rng.randint(1, 4), rng.randint(1, 3)
        if pp == 1:
            virtual = 1
        micro = pp * rng.randint(1, 3) if virtual > 1 else rng.randint(1, 7)
        forwards = [float(rng.randint(1, 6)) for _ in range(pp * virtual)]
        backwards = [float(rng.randint(1, 12)) for _ in range(pp * virtual)]
        assert simulate(forwards, backwards, pp, micro).step_time == _longest_path_step(
            forwards, backwards, pp, micro), (pp, virtual, micro, forwards, backwards)


def _names(passes):
    return " ".join(f"{p.kind}{p.chunk}.{p.micro_batch}" for p in passes)


def test_rank_orders_match_megatrons_for_two_ranks_two_chunks_four_micro_batches():
    """Hand-derived from megatron-core's forward_backward_pipelining_with_interleaving (group
    size p = 2): rank 0 warms up with 2 (p - 0 - 1) + (v - 1) p = 4 forwards, rank 1 with 2; the
    k-th backward runs the k-th forward's micro-batch on the mirrored chunk. `F1.0`: forward of
    micro-batch 0 through chunk 1."""
    assert _names(rank_passes(2, 0, 4, 2)) == (
        "F0.0 F0.1 F1.0 F1.1 "
        "F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 "
        "B1.2 B1.3 B0.2 B0.3")
    assert _names(rank_passes(2, 1, 4, 2)) == (
        "F0.0 F0.1 "
        "F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 "
        "B0.2 B0.3")
    # Non-interleaved 1F1B: p - r - 1 warm-up forwards, micro-batches in order.
    assert _names(rank_passes(3, 0, 4)) == "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 B0.2 B0.3"
    assert _names(rank_passes(3, 2, 4)) == "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3"


def test_every_rank_runs_each_pass_once():
    for pp, virtual, micro in _layouts():
        for rank in range(pp):
            passes = rank_passes(pp, rank, micro, virtual)
            expected = {Pass(kind, chunk, mb) for kind in "FB" for chunk in range(virtual)
                        for mb in range(micro)}
            assert len(passes) == len(expected) and set(passes) == expected


def test_table_and_warmup_agree_with_megatron_core():
    """megatron-core's own pure functions: `get_schedule_table` and `get_pp_rank_microbatches`
    (given a stand-in for its p2p communicator, which it only asks for sizes and the rank)."""
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    for pp, virtual, micro in _layouts():
        if virtual > 1:
            assert schedule_table(micro, virtual, pp) == [
                tuple(entry) for entry in schedules.get_schedule_table(micro, virtual, pp)]
        if pp == 1:
            continue  # megatron runs p = 1 without a pipeline schedule
        for rank in range(pp):
            communicator = types.SimpleNamespace(
                pp_group=types.SimpleNamespace(size=lambda pp=pp: pp, rank=lambda rank=rank: rank),
                virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None)
            _, _, warmup, _ = schedules.get_pp_rank_microbatches(
                micro, virtual, pp, p2p_communicator=communicator)
            assert warmup_forwards(pp, rank, virtual, micro) == warmup, (pp, virtual, micro, rank)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: simulate([1.0], [1.0, 2.0], 1, 1), "1 forward and 2 backward times"),
    (lambda: simulate([1.0, 1.0, 1.0], [2.0] * 3, 2, 2), "3 stage times do not divide over 2"),
    (lambda: simulate([1.0] * 4, [2.0] * 4, 2, 3), "micro-batches in whole groups"),
    (lambda: simulate([1.0], [2.0], 1, 0), "must all be at least 1"),
])
def test_impossible_layouts_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
