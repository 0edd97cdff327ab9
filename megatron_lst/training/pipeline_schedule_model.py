"""A discrete-event model of megatron-core's 1F1B pipeline schedules, for stages of unequal time.

The pipeline bubble (p - 1) / (v m + p - 1) of Narayanan et al. 2021 holds for stages of equal
time. In LST the first stage also runs the local encoder and the last the local decoder, the head
and the encoder replica, so after any split into whole layers the stages differ; this module runs
megatron's schedules over given per-stage times instead.

Each pipeline rank runs its forward and backward passes in the order of megatron-core's
`pipeline_parallel/schedules.py`:

- non-interleaved 1F1B (`forward_backward_pipelining_without_interleaving`): rank r runs
  min(p - r - 1, m) warm-up forwards, then one forward and one backward at a time, then the
  remaining backwards; micro-batches in order;
- interleaved 1F1B (`forward_backward_pipelining_with_interleaving`, v model chunks per rank,
  micro-batches in groups of `microbatch_group_size_per_vp_stage` = p, megatron's default):
  rank r runs min(2 (p - r - 1) + (v - 1) p, v m) warm-up forwards; the k-th forward takes the
  (micro-batch, chunk) of `get_schedule_table`'s k-th entry, the k-th backward the same entry
  with the chunk mirrored (v - 1 - chunk). Chunk c of rank r is virtual stage c p + r.

A pass starts when its rank is free and its input is there: the forward of a micro-batch on
virtual stage s waits for its forward on stage s - 1, the backward on stage s for the backward on
stage s + 1 (the last stage's for its own forward). Point-to-point messages take no time and never
block their sender (megatron's sends are asynchronous; a blocking send would only add waits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

FORWARD, BACKWARD = "F", "B"


@dataclasses.dataclass(frozen=True)
class Pass:
    """One forward or backward pass of a micro-batch through one model chunk of a rank."""

    kind: str  # FORWARD or BACKWARD
    chunk: int  # model chunk of the rank (0 without virtual stages)
    micro_batch: int


@dataclasses.dataclass(frozen=True)
class ScheduleTiming:
    """The simulated step: its time, each rank's busy time, and the idle share of the step."""

    step_time: float
    busy: tuple[float, ...]  # per pipeline rank

    @property
    def bubble(self) -> float:
        """Idle share of the step over all ranks: 1 - sum(busy) / (p x step time)."""
        if self.step_time == 0:
            return 0.0
        return 1 - sum(self.busy) / (len(self.busy) * self.step_time)


def schedule_table(num_micro_batches: int, virtual_stages: int,
                   group_size: int) -> list[tuple[int, int]]:
    """`(micro-batch, chunk)` of each forward of a rank in the interleaved schedule, as
    megatron-core's `get_schedule_table`: micro-batches in groups of `group_size`, each group run
    through chunk 0, then chunk 1, ...; the last group takes all the micro-batches left."""
    table = []
    for start in range(0, num_micro_batches, group_size):
        end = num_micro_batches if start + group_size >= num_micro_batches else start + group_size
        table.extend((micro_batch, chunk) for chunk in range(virtual_stages)
                     for micro_batch in range(start, end))
    return table


def warmup_forwards(pp: int, rank: int, virtual_stages: int, num_micro_batches: int) -> int:
    """Forwards rank `rank` runs before its first backward (megatron-core's
    `get_pp_rank_microbatches` for training, micro-batch groups of `pp`)."""
    total = num_micro_batches * virtual_stages
    if virtual_stages == 1:
        return min(pp - rank - 1, total)
    return min(2 * (pp - rank - 1) + (virtual_stages - 1) * pp, total)


def rank_passes(pp: int, rank: int, num_micro_batches: int, virtual_stages: int = 1) -> list[Pass]:
    """The passes of pipeline rank `rank` in the order megatron-core's training schedule runs
    them: warm-up forwards, then alternately one forward and one backward, then the backwards
    left."""
    _check_layout(pp, virtual_stages, num_micro_batches)
    table = schedule_table(num_micro_batches, virtual_stages, pp)
    forwards = [Pass(FORWARD, chunk, micro_batch) for micro_batch, chunk in table]
    backwards = [Pass(BACKWARD, virtual_stages - 1 - chunk, micro_batch)
                 for micro_batch, chunk in table]
    warmup = warmup_forwards(pp, rank, virtual_stages, num_micro_batches)
    order = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards, strict=False):
        order += [forward, backward]
    return order + backwards[len(forwards) - warmup:]


def simulate(forward_times: Sequence[float], backward_times: Sequence[float], pp: int,
             num_micro_batches: int) -> ScheduleTiming:
    """Run megatron's training schedule over `pp` ranks and `num_micro_batches` micro-batches.

    `forward_times[s]` / `backward_times[s]` are one micro-batch's forward / backward time on
    virtual stage s (chunk s // pp of rank s % pp); there are pp x v of them, v the virtual stages
    per rank (1: the non-interleaved schedule)."""
    if len(forward_times) != len(backward_times) or not forward_times:
        raise ValueError(f"{len(forward_times)} forward and {len(backward_times)} backward times: "
                         f"give one of each per virtual stage")
    if len(forward_times) % pp:
        raise ValueError(f"{len(forward_times)} stage times do not divide over {pp} pipeline "
                         f"ranks: give pp x virtual-stages-per-rank of them")
    virtual_stages = len(forward_times) // pp
    last_stage = len(forward_times) - 1
    orders = [rank_passes(pp, rank, num_micro_batches, virtual_stages) for rank in range(pp)]
    # End time of each pass: ends[kind][virtual stage][micro-batch], None until it has run.
    ends = {kind: [[None] * num_micro_batches for _ in forward_times]
            for kind in (FORWARD, BACKWARD)}
    next_pass, free_at = [0] * pp, [0.0] * pp
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(orders):
            while next_pass[rank] < len(order):
                current = order[next_pass[rank]]
                stage = current.chunk * pp + rank
                if current.kind == FORWARD:
                    ready = ends[FORWARD][stage - 1][current.micro_batch] if stage > 0 else 0.0
                    duration = forward_times[stage]
                else:
                    ready = (ends[BACKWARD][stage + 1] if stage < last_stage
                             else ends[FORWARD][stage])[current.micro_batch]
                    duration = backward_times[stage]
                if ready is None:
                    break
                free_at[rank] = max(free_at[rank], ready) + duration
                ends[current.kind][stage][current.micro_batch] = free_at[rank]
                next_pass[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # megatron's orders never deadlock; this guards the model itself
            raise RuntimeError("pipeline schedule model deadlocked: every rank waits on another")
    busy = tuple(num_micro_batches * sum(forward_times[c * pp + rank] + backward_times[c * pp + rank]
                                         for c in range(virtual_stages)) for rank in range(pp))
    return ScheduleTiming(step_time=max(free_at), busy=busy)


def _check_layout(pp: int, virtual_stages: int, num_micro_batches: int) -> None:
    if pp < 1 or virtual_stages < 1 or num_micro_batches < 1:
        raise ValueError(f"pipeline ranks {pp}, virtual stages per rank {virtual_stages} and "
                         f"micro-batches {num_micro_batches} must all be at least 1")
    if virtual_stages > 1 and (pp < 2 or num_micro_batches % pp):
        raise ValueError(f"the interleaved schedule needs 2 or more pipeline ranks and "
                         f"micro-batches in whole groups of the pipeline size: "
                         f"{num_micro_batches} micro-batches over {pp} ranks")
