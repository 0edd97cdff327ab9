"""Which curriculum step the rows of each training iteration are patched at: the first optimizer
step (logged as iteration 1) is step 0, so iteration i is step i - 1, whatever the
data-parallel size, the micro-batch size and the iteration a run resumes at."""

import pytest

from megatron_lst.patching import Patcher, PatchingConfig
from megatron_lst.training.arguments import parse_args, validate_args
from megatron_lst.training.data_provider import PretrainingBatchSampler, build_datasets
from training.training_cases import tiny_flags, write_store

TAU = 3  # --curriculum-tau1 = --curriculum-tau2: aligned through step 3, static from step 4
GLOBAL_BATCH = 4
TRAIN_ITERS = 8


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory):
    """The train rows of an ASR run blending two speech datasets (so rows' training positions are
    not their indices in either source), under curriculum patching with tau1 = tau2 = TAU."""
    root = tmp_path_factory.mktemp("curriculum_iterations")
    first = str(write_store(root / "a", "aligned", 12, seed=3))
    second = str(write_store(root / "b", "aligned", 12, seed=4))
    flags = tiny_flags(["1.0", first, "1.0", second])
    for flag, value in (("--curriculum-tau1", TAU), ("--curriculum-tau2", TAU),
                        ("--seq-length", 200), ("--max-position-embeddings", 256)):
        flags[flags.index(flag) + 1] = str(value)
    flags[flags.index("--max-tokens") + 1] = "256"
    flags += ["--task", "asr", "--train-iters", str(TRAIN_ITERS), "--split", "100,0,0"]
    return build_datasets(validate_args(parse_args(flags), 1)).train


def _rule(rows, index: int) -> str | None:
    """The rule row `index` of the blend was patched with (None: both rules give its patches)."""
    source = rows.datasets[int(rows.dataset_index[index])]
    row, lengths = source.row(int(rows.dataset_sample_index[index]))
    aligned = Patcher(PatchingConfig("aligned")).patch_lengths(row.doc).tolist()
    static = Patcher(PatchingConfig("static", patch_size=4)).patch_lengths(row.doc).tolist()
    assert lengths.tolist() in (aligned, static), index
    if aligned == static:
        return None
    return "aligned" if lengths.tolist() == aligned else "static"


@pytest.mark.parametrize(("micro_batch", "data_parallel"), [(4, 1), (1, 2), (2, 2), (1, 4)])
@pytest.mark.parametrize("resumed_at", [0, 2, TAU, TAU + 1, 6])
def test_iteration_i_is_patched_at_step_i_minus_1(train_rows, micro_batch, data_parallel,
                                                  resumed_at):
    micro_batches = GLOBAL_BATCH // (micro_batch * data_parallel)  # per rank and iteration
    seen = {"aligned": set(), "static": set()}
    for rank in range(data_parallel):
        sampler = PretrainingBatchSampler(len(train_rows), resumed_at * GLOBAL_BATCH, micro_batch,
                                          rank, data_parallel)
        for k, batch in enumerate(sampler):
            iteration = resumed_at + k // micro_batches + 1  # as the loop logs it
            for index in batch:
                rule = _rule(train_rows, index)
                if rule is not None:
                    expected = "aligned" if iteration - 1 <= TAU else "static"
                    assert rule == expected, (iteration, index)
                    seen[rule].add(iteration)
    # The boundary itself is exercised: the last aligned iteration TAU + 1 and the first static
    # one TAU + 2 (when the run has not resumed past them).
    if resumed_at <= TAU:
        assert TAU + 1 in seen["aligned"]
    assert TAU + 2 in seen["static"] or resumed_at > TAU + 1
    assert max(seen["aligned"], default=0) <= TAU + 1 and min(seen["static"]) >= TAU + 2
