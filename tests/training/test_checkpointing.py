"""Checkpoints: finding the latest complete one, atomic saves, exact resume, TP resharding.

The multi-process tests run `workers/checkpoint_worker.py` (a tiny megatron.core GPTModel with
dropout, megatron DDP + optimizer + OptimizerParamScheduler, real `lst-train` flags) on gloo.
"""

import argparse
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed.harness import TESTS_DIR, run_distributed

from megatron_lst.checkpoint import integrity
from megatron_lst.checkpoint.errors import CheckpointError, CheckpointIntegrityError
from megatron_lst.training.checkpoint_advice import describe_good_checkpoint
from megatron_lst.training.checkpoint_discovery import find_latest_checkpoint, select_checkpoint
from megatron_lst.training.checkpoint_load import verify_or_point_elsewhere
from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata
from megatron_lst.training.checkpointing import METADATA_FILENAME, TRACKER_FILENAME
from training.training_cases import fake_checkpoint

WORKER = Path(__file__).parent / "workers" / "checkpoint_worker.py"
TINY_RUN = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
    "--weight-decay", "0.01", "--clip-grad", "1.0",
]
# Attention dropout needs attention over whole rows (document masking's range attention has none).
WITH_DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--no-reset-attention-mask"]


# --- finding the latest complete checkpoint (no processes) -------------------------------

def test_no_directory_and_empty_directory_mean_no_checkpoint_yet(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None


def test_pointer_names_the_checkpoint_to_load(tmp_path):
    fake_checkpoint(tmp_path, 100)
    newest = fake_checkpoint(tmp_path, 200)
    (tmp_path / TRACKER_FILENAME).write_text("200\n")
    assert find_latest_checkpoint(tmp_path) == newest


def test_interrupted_save_is_reported_skipped_and_kept(tmp_path, caplog):
    complete = fake_checkpoint(tmp_path, 100)
    (tmp_path / TRACKER_FILENAME).write_text("100")
    leftover = tmp_path / "iter_0000200.tmp-0a1b2c"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(tmp_path) == complete
    assert "iter_0000200.tmp-0a1b2c" in caplog.text
    assert leftover.is_dir(), "an interrupted save must never be deleted silently"


def test_complete_checkpoint_newer_than_the_pointer_wins(tmp_path, caplog):
    fake_checkpoint(tmp_path, 100)
    newer = fake_checkpoint(tmp_path, 200)
    (tmp_path / TRACKER_FILENAME).write_text("100")
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(tmp_path) == newer
    assert "newer" in caplog.text


def test_load_may_name_one_checkpoint_directory(tmp_path):
    older = fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200)
    (tmp_path / TRACKER_FILENAME).write_text("200")
    assert find_latest_checkpoint(older) == older


def test_ckpt_step_picks_an_older_checkpoint_over_pointer_and_newer_ones(tmp_path):
    older = fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200)
    (tmp_path / TRACKER_FILENAME).write_text("200")
    assert select_checkpoint(tmp_path, 100) == older
    assert select_checkpoint(tmp_path) == tmp_path / "iter_0000200"
    with pytest.raises(CheckpointError, match=r"no complete checkpoint of iteration 150; "
                                              r"complete ones: \[100, 200\]"):
        select_checkpoint(tmp_path, 150)
    with pytest.raises(CheckpointError, match="give one or the other"):
        select_checkpoint(older, 100)


def test_the_good_checkpoint_is_named_after_divergence(tmp_path):
    assert "No checkpoint was saved before" in describe_good_checkpoint(tmp_path)
    fake_checkpoint(tmp_path, 100)
    newest = fake_checkpoint(tmp_path, 200)
    (tmp_path / TRACKER_FILENAME).write_text("200")
    assert describe_good_checkpoint(tmp_path).startswith(
        f"The newest checkpoint, {newest} (iteration 200), held finite weights when it was "
        f"saved: resume from it with --load {tmp_path} (or --ckpt-step 200)")


def test_a_run_resumed_from_elsewhere_goes_back_to_its_own_start_after_divergence(tmp_path):
    """A run that resumed from --load L with another --save S and diverged before its first save
    was told 'No checkpoint was saved before (none under --save): start again', losing L's."""
    started = fake_checkpoint(tmp_path / "L", 300)
    save = tmp_path / "S"
    assert describe_good_checkpoint(save, started).startswith(
        f"No checkpoint was saved after {started} (iteration 300), which this run resumed from: "
        f"resume from it again with --load {started}")
    fake_checkpoint(save, 100)  # an earlier run's, behind the one this run started from
    assert "which this run resumed from" in describe_good_checkpoint(save, started)
    newest = fake_checkpoint(save, 400)  # this run's own
    assert describe_good_checkpoint(save, started).startswith(f"The newest checkpoint, {newest}")


def test_a_fine_tuning_run_that_diverged_before_saving_fine_tunes_again(tmp_path):
    pretrained = fake_checkpoint(tmp_path / "pretrained", 5000)
    save = tmp_path / "tuned"
    assert describe_good_checkpoint(save, pretrained, finetune=True).startswith(
        f"No checkpoint of this fine-tuning run was saved yet: fine-tune again from {pretrained} "
        f"(--load {pretrained} --finetune)")
    own = fake_checkpoint(save, 20)  # iterations count from 0 again
    assert describe_good_checkpoint(save, pretrained, finetune=True).startswith(
        f"The newest checkpoint, {own} (iteration 20)")
    # its only checkpoint passed over: that one was saved, so not "saved yet"
    assert describe_good_checkpoint(save, pretrained, finetune=True,
                                    nonfinite_loss_at=21).startswith(
        f"{own} (iteration 20) is passed over: its weights gave this loss on iteration 21's "
        f"batch, which resuming from it replays. No checkpoint of this fine-tuning run was saved "
        f"before it: fine-tune again from {pretrained} (--load {pretrained} --finetune)")


def test_directory_without_metadata_is_not_complete(tmp_path):
    fake_checkpoint(tmp_path, 100, complete=False)
    assert find_latest_checkpoint(tmp_path) is None


def test_load_naming_an_incomplete_checkpoint_says_so(tmp_path):
    """Not "no checkpoint": the directory named is one, left by a save that did not finish."""
    fake_checkpoint(tmp_path, 100)
    partial = fake_checkpoint(tmp_path, 200, complete=False)
    with pytest.raises(CheckpointError, match=rf"{partial} is an incomplete checkpoint \(no "
                                              rf"{METADATA_FILENAME}\).* \(\[100\]\)"):
        find_latest_checkpoint(partial)


# A pointer of bytes that are not UTF-8 was "'utf-8' codec can't decode byte 0xff", naming no
# file.
@pytest.mark.parametrize("pointer", ["300", "not-a-number", b"\xff\xfe1\x00"])
def test_pointer_to_nothing_is_corruption_not_a_fresh_start(tmp_path, pointer):
    fake_checkpoint(tmp_path, 100)
    tracker = tmp_path / TRACKER_FILENAME
    tracker.write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    with pytest.raises(CheckpointError, match=f"{tracker} .*corrupt"):
        find_latest_checkpoint(tmp_path)


# The pointer's message said "(no lst_checkpoint.json)" whichever file was missing.
@pytest.mark.parametrize("missing, message", [
    ("metadata.json", r"is incomplete \(no metadata\.json\)"),
    (METADATA_FILENAME, rf"is incomplete \(no {METADATA_FILENAME}\)"),
    ("the directory", r"is missing\b"),
])
def test_pointer_to_an_incomplete_checkpoint_names_the_missing_file(tmp_path, missing, message):
    fake_checkpoint(tmp_path, 100)
    (tmp_path / TRACKER_FILENAME).write_text("200")
    if missing != "the directory":
        (fake_checkpoint(tmp_path, 200) / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"iter_0000200 {message}.*\(\[100\]\)"):
        find_latest_checkpoint(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("[1]", "holds a JSON list, not the checkpoint's metadata object"),
    ('{"format_version": 99}', "format version 99"),
    # true and 1.0 equal 1, yet no save writes them
    ('{"format_version": true}', "format version True"),
    ('{"format_version": 1.0}', "format version 1.0"),
    ("{", "cannot read"),
    # 'utf-8' codec can't decode byte 0xff ..., naming no file
    (b"\xff\xfe{\x00", rf"cannot read .*{METADATA_FILENAME}: 'utf-8' codec can't decode"),
])
def test_unreadable_checkpoint_metadata_is_named(tmp_path, content, message):
    path = fake_checkpoint(tmp_path, 100)
    (path / METADATA_FILENAME).write_bytes(content if isinstance(content, bytes)
                                           else content.encode())
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint_metadata(path)


# --- saving, killing, resuming (processes) -----------------------------------------------

def run_killable(args: list[str], log: Path, kill_when: Path | None = None,
                 timeout: float = 180.0) -> tuple[int, str]:
    """Run the worker as a world of one without torchrun; SIGKILL it once `kill_when` exists.
    Returns the exit code and the end of its output (kept in `log`, not a pipe that could fill
    up and stall it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH"))
                                          if p))
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if kill_when is not None and kill_when.exists():
                os.killpg(process.pid, signal.SIGKILL)
            elif time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail(f"worker timed out after {timeout:.0f} s; output:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.1)
    try:  # helpers dist-checkpointing spawned outlive a worker that died mid-save: end them too
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.returncode, log.read_text()[-4000:]


@pytest.mark.distributed
def test_round_trip_kill_during_save_and_bitwise_resume(tmp_path):
    save = tmp_path / "ckpt"
    run = [*TINY_RUN, *WITH_DROPOUT, "--train-iters", "6", "--save", str(save)]

    # Straight run: 6 iterations, saving after 3, with a load-into-fresh-objects check.
    [straight] = run_distributed(WORKER, 1, [*run, "--save-at", "3", "--verify-round-trip"])
    assert straight["round_trip_mismatches"] == []

    # Resume from 3 and die in the middle of saving iteration 4: data written, no rename.
    code, output = run_killable([*run, "--load", str(save), "--save-at", "4",
                                 "--crash", "hang-after-write", "--results", "unused"],
                                tmp_path / "killed.log", kill_when=save / "ready-to-kill")
    assert code == -signal.SIGKILL, output
    assert (save / TRACKER_FILENAME).read_text() == "3"
    assert not (save / "iter_0000004").exists()
    assert [p.name.split(".tmp-")[0] for p in save.glob("*.tmp-*")] == ["iter_0000004"]
    assert find_latest_checkpoint(save) == save / "iter_0000003"

    # Die after the rename, before the pointer update: iteration 4 is complete and is found.
    code, output = run_killable([*run, "--load", str(save), "--save-at", "4",
                                 "--crash", "exit-before-pointer", "--results", "unused"],
                                tmp_path / "exited.log")
    assert code == 17, output
    assert (save / TRACKER_FILENAME).read_text() == "3"
    assert find_latest_checkpoint(save) == save / "iter_0000004"

    # A fresh process resumes from the newest complete checkpoint and follows the straight
    # run's loss curve bit for bit (fp32, dropout on: RNG states are restored too).
    [resumed] = run_distributed(WORKER, 1, [*run, "--load", str(save)])
    assert resumed["resumed_from"] == 4
    assert resumed["consumed_samples"] == 4 * 4
    assert resumed["losses"] == {k: straight["losses"][k] for k in ("5", "6")}


@pytest.mark.distributed
def test_tensor_parallel_checkpoint_loads_into_one_process(tmp_path):
    save = tmp_path / "ckpt"
    run = [*TINY_RUN, "--train-iters", "5"]
    [tp_rank0, _] = run_distributed(WORKER, 2, [*run, "--tensor-model-parallel-size", "2",
                                                "--save", str(save), "--save-at", "3", "--eval",
                                                "--vocab-text-size", "100"])
    metadata = json.loads((save / "iter_0000003" / METADATA_FILENAME).read_text())
    assert metadata["parallel_layout"]["tensor_model_parallel_size"] == 2

    [single] = run_distributed(WORKER, 1, [*run, "--load", str(save), "--eval",
                                           "--vocab-text-size", "100"])
    assert single["resumed_from"] == 3
    # Iteration 4 checks the weights, 5 the resharded Adam moments, eval the final weights.
    for key in ("4", "5"):
        assert single["losses"][key] == pytest.approx(tp_rank0["losses"][key], abs=1e-5)
    assert single["eval_loss"] == pytest.approx(tp_rank0["eval_loss"], abs=1e-5)

    # A checkpoint refuses another vocabulary, and a model of another shape, naming what differs.
    [errors] = run_distributed(WORKER, 1, [*run, "--load", str(save), "--probe-load-errors",
                                           "--vocab-text-size", "101"])
    assert re.search(r"checkpoint .*iter_0000003 was made with 100 text pieces and 502 speech "
                     r"units \(608 ids\) but this run's data has 101 and 502 \(609 ids\)",
                     errors["vocabulary"])
    assert re.search(r"model tensor 'embedding.word_embeddings.weight' has shape \(128, 48\) "
                     r"but checkpoint .*iter_0000003 holds \(128, 32\)", errors["shape"])


def test_entry_module_imports_no_megatron_so_saving_prints_no_import_warnings_again():
    """Saving spawns a process that re-imports the entry module (`pretrain_lst.py`, or the
    `lst-train` script importing `training.cli`); megatron.core's import-time warnings (no Apex /
    Transformer Engine ...) would be printed again at the first save."""
    code = ("import sys, runpy; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    loaded = subprocess.run([sys.executable, "-c", code, str(TESTS_DIR.parent / "pretrain_lst.py")],
                            capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout
    assert "Warning" not in loaded.stderr, loaded.stderr


def test_a_nan_loss_names_the_checkpoint_to_resume_from(tmp_path):
    from megatron_lst.training.divergence import NonFiniteLossError
    from megatron_lst.training.flops import FlopBreakdown
    from megatron_lst.training.loop import StepResult, _record_step

    fake_checkpoint(tmp_path, 50)
    fake_checkpoint(tmp_path, 100)
    (tmp_path / TRACKER_FILENAME).write_text("100")
    state = argparse.Namespace(args=argparse.Namespace(fp16=False, clip_grad=1.0, save=str(tmp_path),
                                                       load=None),
                               iteration=102)
    step = StepResult(loss=float("nan"), num_tokens=64, flops=FlopBreakdown(), seconds=0.1,
                      learning_rate=1e-3, grad_norm=None, loss_scale=None, skipped=False)
    with pytest.raises(NonFiniteLossError) as stopped:
        _record_step(state, step, result=None, training_logger=None)
    assert "iteration 102: lm loss = nan" in str(stopped.value)
    assert f"The newest checkpoint, {tmp_path / 'iter_0000100'} (iteration 100)" in str(stopped.value)


def test_a_nan_loss_stops_an_fp16_run_whose_update_was_skipped(tmp_path):
    """fp16 skips an update whose scaled gradients overflow. The check used to pass over skipped
    steps, so a diverged fp16 run (NaN loss, NaN gradients, every update skipped) trained on to
    --train-iters without learning. A skip with a finite loss is the loss scaler's business."""
    from megatron_lst.training.divergence import NonFiniteLossError
    from megatron_lst.training.flops import FlopBreakdown
    from megatron_lst.training.loop import StepResult, TrainingResult, _record_step

    fake_checkpoint(tmp_path, 100)
    state = argparse.Namespace(args=argparse.Namespace(fp16=True, clip_grad=1.0, save=str(tmp_path),
                                                       load=None),
                               iteration=110, flops=FlopBreakdown(), tokens=0, consumed_samples=0)

    def step(loss: float) -> StepResult:
        return StepResult(loss=loss, num_tokens=64, flops=FlopBreakdown(), seconds=0.1,
                          learning_rate=1e-3, grad_norm=None, loss_scale=1.0, skipped=True)

    class Logger:
        iterations = []

        def on_iteration(self, iteration, **values):
            self.iterations.append((iteration, values["skipped"]))

    _record_step(state, step(2.5), TrainingResult(0, 0), Logger())
    assert Logger.iterations == [(110, True)]
    with pytest.raises(NonFiniteLossError, match=r"iteration 110: lm loss = nan.*with --fp16"):
        _record_step(state, step(float("nan")), TrainingResult(0, 0), Logger())


def test_a_nan_loss_right_after_a_save_passes_over_the_checkpoint_that_gave_it(tmp_path):
    """The loss of iteration 101 comes from the weights saved at iteration 100, on batch 101:
    resuming from iter_0000100, as the advice said, replays that batch on those weights (the data
    order and the random state come back with them) and stops there again, whatever --lr says."""
    from megatron_lst.training.divergence import NonFiniteLossError
    from megatron_lst.training.flops import FlopBreakdown
    from megatron_lst.training.loop import StepResult, _record_step

    step = StepResult(loss=float("nan"), num_tokens=64, flops=FlopBreakdown(), seconds=0.1,
                      learning_rate=1e-3, grad_norm=None, loss_scale=None, skipped=False)

    def advice(save, iteration, resume_from=None):
        args = argparse.Namespace(fp16=False, clip_grad=1.0, save=str(save), load=None,
                                  resume_from=resume_from and str(resume_from), finetune=False)
        with pytest.raises(NonFiniteLossError) as stopped:
            _record_step(argparse.Namespace(args=args, iteration=iteration), step, result=None,
                         training_logger=None)
        return str(stopped.value)

    save = tmp_path / "S"
    newest = fake_checkpoint(save, 100)
    assert advice(save, 101).endswith(
        f"{newest} (iteration 100) is passed over: its weights gave this loss on iteration 101's "
        f"batch, which resuming from it replays. No checkpoint before it was found: start again.")
    older = fake_checkpoint(save, 50)
    assert (f"is passed over: its weights gave this loss on iteration 101's batch, which resuming "
            f"from it replays. The newest checkpoint before it, {older} (iteration 50), held "
            f"finite weights when it was saved: resume from it with --load {save} --ckpt-step "
            f"50, after") in advice(save, 101)
    # --save S again would be refused while iter_0000100, newer, is there; --load S picks it.
    assert advice(save, 101).endswith(
        f"first move the diverging checkpoint out of the way (nothing is deleted; lst-train "
        f"refuses a --save holding a newer checkpoint than where the run starts): mv {newest} "
        f"{save / 'diverging_iter_0000100'}")
    # A run resumed from another directory that diverged at its first iteration.
    started = fake_checkpoint(tmp_path / "L", 300)
    assert f"{started} (iteration 300) is passed over" in advice(save, 301, started)
    before_start = fake_checkpoint(tmp_path / "L", 200)
    assert (f"The newest checkpoint before it, {before_start} (iteration 200), held finite weights "
            f"when it was saved: resume from it with --load {tmp_path / 'L'}") in advice(
                save, 301, started)


def test_a_nan_loss_before_the_first_save_names_the_checkpoint_the_run_resumed_from(tmp_path):
    from megatron_lst.training.divergence import NonFiniteLossError
    from megatron_lst.training.flops import FlopBreakdown
    from megatron_lst.training.loop import StepResult, _record_step

    started = fake_checkpoint(tmp_path / "L", 300)
    args = argparse.Namespace(fp16=False, clip_grad=1.0, save=str(tmp_path / "S"),
                              load=str(tmp_path / "L"), resume_from=str(started), finetune=False)
    step = StepResult(loss=float("inf"), num_tokens=64, flops=FlopBreakdown(), seconds=0.1,
                      learning_rate=1e-3, grad_norm=None, loss_scale=None, skipped=False)
    with pytest.raises(NonFiniteLossError) as stopped:
        _record_step(argparse.Namespace(args=args, iteration=302), step, result=None,
                     training_logger=None)
    assert f"resume from it again with --load {started}" in str(stopped.value)


def run_lst_train_on_two_ranks(tmp_path: Path, script: str, args: list[str],
                               timeout: float = 240.0) -> str:
    """Run `script` (the text of an entry script: `cli.main` with a fault injected) on two ranks
    with torchrun; returns its output. A run past `timeout` (ranks left waiting for each other)
    fails the test, its whole process group killed."""
    path = tmp_path / "entry_with_fault.py"
    path.write_text(script)
    with open(tmp_path / "torchrun.log", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             str(path), *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.seek(0)
            pytest.fail(f"the ranks were still running after {timeout:.0f} s (a rank waiting "
                        f"for one that stopped?); output:\n{log.read()[-4000:]}")
        log.seek(0)
        return log.read()


FULL_DISK_ON_RANK0 = """
import errno, pathlib, sys

if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron_lst.checkpoint import integrity
    from megatron_lst.training import cli

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if sys.argv.pop(1) == "manifest":
        integrity.write_manifest = full_disk  # rank 0 alone writes the manifest
    else:  # rank 0 alone makes the save's temporary directory
        make_directory = pathlib.Path.mkdir
        pathlib.Path.mkdir = lambda path, *args, **kwargs: (
            full_disk() if ".tmp-" in path.name else make_directory(path, *args, **kwargs))
    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("failing_write, interrupted_saves", [("manifest", 1), ("mkdir", 0)])
def test_a_save_failing_on_rank_0_stops_every_rank_with_one_line(tmp_path, failing_write,
                                                                 interrupted_saves):
    """The other ranks waited for rank 0 in a barrier that broke with a gloo traceback
    ('Connection closed by peer') when rank 0 stopped on a full disk: at the manifest, and at
    the save's first write, its temporary directory."""
    from training.training_cases import tiny_flags, write_corpus

    save = tmp_path / "ckpt"
    output = run_lst_train_on_two_ranks(
        tmp_path, FULL_DISK_ON_RANK0,
        [failing_write, *tiny_flags(write_corpus(tmp_path / "data")), "--train-iters", "2",
         "--save", str(save)])
    # Each rank exits with 3; once one has, torchrun may end the other with SIGTERM (-15) before
    # it exits by itself (both lines below show that both ranks got there).
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "3" in codes and set(codes) <= {"3", "-15"}, output[-3000:]
    assert "[rank1]: Traceback" not in output and "Connection closed by peer" not in output, \
        output[-3000:]
    assert (f"lst-train: saving the checkpoint of iteration 2 into {save} failed (OSError: [Errno "
            f"28] No space left on device)") in output
    assert (f"lst-train: saving the checkpoint of iteration 2 into {save} failed: rank 0 "
            f"stopped with OSError: [Errno 28] No space left on device (its output says where); "
            f"this rank stops with it; checkpoints saved before are untouched") in output
    assert find_latest_checkpoint(save) is None
    assert len(list(save.glob("iter_0000002.tmp-*"))) == interrupted_saves


WRITERS_FAIL_ON_RANK1 = """
import errno, os, shutil, sys, types

if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from torch.distributed.checkpoint.utils import _wrap_exception

    from megatron_lst.training import checkpoint_save, cli

    if os.environ["RANK"] == "1":  # rank 1's writers report a full disk, which it sees full
        FileSystemWriterAsync.retrieve_write_results = lambda self: _wrap_exception(
            OSError(errno.ENOSPC, "No space left on device"))
        disk_usage = shutil.disk_usage
        checkpoint_save.shutil = types.SimpleNamespace(
            disk_usage=lambda path: disk_usage(path)._replace(free=0))
    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_save_failing_on_rank_1_is_explained_on_every_rank(tmp_path):
    """Only rank 0, which gathers the writers' results, heard why: rank 1 itself said 'another
    rank's checkpoint writers failed; its message says why', sending a multi-node run's user to
    another node's log."""
    from training.training_cases import tiny_flags, write_corpus

    save = tmp_path / "ckpt"
    output = run_lst_train_on_two_ranks(
        tmp_path, WRITERS_FAIL_ON_RANK1,
        [*tiny_flags(write_corpus(tmp_path / "data")), "--train-iters", "2", "--save", str(save)])
    reason = (f"lst-train: saving the checkpoint of iteration 2 into {save} failed (rank 1: "
              f"OSError: [Errno 28] No space left on device); 0.0 MiB free on the filesystem "
              f"of {save} (the least that a rank measured: rank 1's). ")
    # Both ranks' line, printed once, though the ranks measure different free space (as the
    # nodes of a node-local --save, rank 1's full): each printed its own figure.
    assert output.count("lst-train: ") == 1 and reason in output, output[-3000:]
    assert "its message says why" not in output, output[-3000:]
    assert find_latest_checkpoint(save) is None


FAILS_ON_RANK1_ALONE = """
import errno, os, sys

if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron_lst.checkpoint import integrity
    from megatron_lst.training import cli, optimizer_state

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    step = sys.argv.pop(1)
    if os.environ["RANK"] == "1":
        if step == "hashing":  # after the shards are written, each rank hashes a share
            digest_file = integrity.digest_file  # which also fingerprints the training data
            integrity.digest_file = lambda path: (
                unreadable() if ".tmp-" in str(path) else digest_file(path))
        else:  # before anything is written
            optimizer_state.sharded_state_to_save = unreadable
    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("step, what, interrupted_saves", [
    ("hashing", "record the files of iter_0000002.tmp-", 1),
    ("state", "gather its state to save", 1),
])
def test_a_save_failing_on_rank_1_alone_stops_every_rank_with_its_line(tmp_path, step, what,
                                                                       interrupted_saves):
    """A step of a save that each rank takes on its own (building its state to save, hashing
    its share of the files) raised on rank 1 alone: rank 0 went on into the next collective and
    broke there with a gloo traceback ('Connection closed by peer') once rank 1 exited, or,
    across nodes, waited for it up to the process-group timeout."""
    from training.training_cases import tiny_flags, write_corpus

    save = tmp_path / "ckpt"
    output = run_lst_train_on_two_ranks(
        tmp_path, FAILS_ON_RANK1_ALONE,
        [step, *tiny_flags(write_corpus(tmp_path / "data")), "--train-iters", "2",
         "--save", str(save)])
    codes = re.findall(r"exitcode  : (-?\d+)", output)  # 1: a rank's traceback
    assert "3" in codes and set(codes) <= {"3", "-15"}, output[-3000:]
    assert "Connection closed by peer" not in output, output[-3000:]
    stopped = re.findall(
        rf"lst-train: saving the checkpoint of iteration 2 into {re.escape(str(save))} failed "
        rf"\(rank 1 could not {re.escape(what)}[0-9a-f]* \(OSError: \[Errno 5\] Input/output "
        rf"error\)\); .*?Checkpoints saved before are untouched", output)
    assert len(stopped) == 1, output[-3000:]  # both ranks' line, printed once
    assert find_latest_checkpoint(save) is None and not (save / TRACKER_FILENAME).exists()
    assert len(list(save.glob("iter_0000002.tmp-*"))) == interrupted_saves


SEES_A_LATER_CHECKPOINT = """
import os, sys
from pathlib import Path

if __name__ == "__main__":  # the checkpoint writers re-import this file
    from megatron_lst.training import checkpoint_save, cli

    if os.environ["RANK"] == sys.argv.pop(1):  # its node's view of --save holds iteration 5
        listed = checkpoint_save.checkpoints_from
        checkpoint_save.checkpoints_from = lambda root, first: (
            [Path(root) / "iter_0000005"] if first == 2 else listed(root, first))
    sys.exit(cli.main())
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("seeing_rank", ["0", "1"])
def test_every_rank_follows_rank_0s_listing_of_later_checkpoints_at_a_save(tmp_path, seeing_rank):
    """Each rank listed --save for checkpoints a save would lie behind: where one node saw one
    that another did not (a stale cache of a network filesystem), that rank refused alone and
    the others went on into the save's first collective, waiting for it there."""
    from training.training_cases import tiny_flags, write_corpus

    save = tmp_path / "ckpt"
    output = run_lst_train_on_two_ranks(
        tmp_path, SEES_A_LATER_CHECKPOINT,
        [seeing_rank, *tiny_flags(write_corpus(tmp_path / "data")), "--train-iters", "2",
         "--save", str(save)])
    # No worker's traceback (torchrun prints one of its own for a failed job).
    assert not re.search(r"\[rank\d\]: Traceback", output), output[-3000:]
    assert "Connection closed by peer" not in output, output[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    if seeing_rank == "1":  # rank 0 lists none: the save goes on
        assert not codes, output[-3000:]
        assert find_latest_checkpoint(save) == save / "iter_0000002"
        return
    assert "3" in codes and set(codes) <= {"3", "-15"}, output[-3000:]
    assert output.count(f"lst-train: {save} already holds ['iter_0000005']; refusing to save "
                        f"iteration 2 there") == 1, output[-3000:]
    assert find_latest_checkpoint(save) is None


@pytest.mark.parametrize("older, instead", [
    (True, "load another one with --load {save} --ckpt-step 1 (or --load {save}/iter_0000001); "
           "complete checkpoints there: [1]. To resume from it with --save {save} again, first "
           "move the unreadable checkpoint out of the way (nothing is deleted; lst-train refuses "
           "a --save holding a newer checkpoint than where the run starts): mv "
           "{save}/iter_0000002 {save}/unreadable_iter_0000002"),
    (False, "restore its files from a copy (no other complete checkpoint is next to it)."),
])
def test_a_checkpoint_that_could_not_be_read_is_first_to_be_loaded_again(tmp_path, monkeypatch,
                                                                          older, instead):
    """A read error (EIO) while checking --load sent the user to an older checkpoint, where
    loading the same one again might do: the storage's fault may pass."""
    if older:
        fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)

    def unreadable(directory):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(integrity, "read_manifest", unreadable)
    with pytest.raises(CheckpointIntegrityError) as refused:
        verify_or_point_elsewhere(newest)
    error, advice = str(refused.value).split("\n")
    assert error == (f"checkpoint {newest} could not be checked and is not loaded: rank 0 could "
                     f"not read its manifest (OSError: [Errno 5] Input/output error)")
    assert advice == ("If the read error was transient (a storage or network fault), load the "
                      "same checkpoint again; if it persists, " + instead.format(save=tmp_path))
