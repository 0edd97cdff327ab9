"""`lst-eval`: story-completion accuracy of a checkpoint, or ASR/TTS rates with `--task`.

    lst-eval --load runs/demo/lst --items storycloze.jsonl hellaswag.jsonl --modes ss,tt,st,ts
    lst-eval --load runs/asr --task asr --utterances data/speech_test
    lst-eval --load runs/tts --task tts --utterances data/speech_test --asr-load runs/asr

Prints one line per (file, mode) on rank 0 and, with `--output`, writes the full results as JSON
(`{"checkpoint", "iteration", "results": {file: {mode: {accuracy, accuracy_ci_low, ...}}}}`).
With `--task asr|tts` it decodes held-out utterances instead (`downstream.py`) and prints one
line per rate. Launch with torchrun for tensor or pipeline parallelism
(`--tensor-model-parallel-size 2` and `--nproc-per-node 2`). Exit status 2 for bad
flags or bad items (the message names the item and its line).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_lst.checkpoint.durable_files import replace_file_durably
from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.data.input_files import checked_file_size
from megatron_lst.evaluation.cli_shared import (
    add_ckpt_step_flag,
    refuse_before_arming,
    refuse_with_the_others,
)
from megatron_lst.evaluation.items import ItemError, load_items
from megatron_lst.evaluation.scoring import MODES, check_items_for_mode, evaluate_items, parse_modes
from megatron_lst.training import stop_together
from megatron_lst.training.arguments import FlagParser, seed_flag
from megatron_lst.training.checkpointing import METADATA_FILENAME, TRACKER_FILENAME
from megatron_lst.training.memory_history import SNAPSHOT_FILENAME
from megatron_lst.training.metrics import METRICS_FILENAME
from megatron_lst.training.save_directory import LOCK_FILENAME

if TYPE_CHECKING:
    from megatron_lst.evaluation.loading import InferenceModel

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH_SIZE = 8
"""Items per forward pass of `lst-eval --items` without `--batch-size`."""


def build_eval_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="lst-eval", allow_abbrev=False,
                        description="Score a checkpoint on story-completion items (accuracy per "
                                    "mode), or, with --task asr|tts, decode held-out utterances "
                                    "(WER and CER, or the unit edit rate and ASR-CER).")
    parser.add_argument("--load", required=True,
                        help="A training --save directory, whose latest complete checkpoint is "
                             "used, or one checkpoint directory in it (DIR/iter_0000100).")
    add_ckpt_step_flag(parser)
    parser.add_argument("--items", nargs="+", default=None,
                        help="Story-completion JSONL files (docs/evaluation.md#the-item-format).")
    parser.add_argument("--task", choices=("asr", "tts"), default=None,
                        help="Instead of --items: decode the --utterances with a model "
                             "fine-tuned on this task and report WER/CER (asr) or the unit edit "
                             "rate and ASR-CER (tts) (docs/evaluation.md#asr-and-tts).")
    parser.add_argument("--utterances", default=None,
                        help="With --task: prefix of an aligned dataset (tools/preprocess_data.py "
                             "output) of held-out utterances.")
    parser.add_argument("--num-utterances", type=int, default=None,
                        help="With --task: the first N utterances (default: all).")
    parser.add_argument("--asr-load", default=None,
                        help="With --task tts: the save directory of an ASR model that "
                             "transcribes the generated units (ASR-CER); use the same one for "
                             "every TTS model compared.")
    parser.add_argument("--no-cache", action="store_true",
                        help="With --task: re-run the whole model every decoding step instead "
                             "of using the KV caches (the same output, slower).")
    parser.add_argument("--modes", default=None,
                        help=f"Comma-separated modes out of {','.join(MODES)} (quote them: the "
                             f"shell reads '>' as a redirect), or spelled ss,tt,st,ts (any case; "
                             f"s2s, t2t, ... also work). Default: all four, or T->T for a "
                             f"text-only file.")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"With --items: items per forward pass (all their endings go in one "
                             f"batch; default {DEFAULT_EVAL_BATCH_SIZE}).")
    parser.add_argument("--truncate-context", action="store_true",
                        help="Cut an item's context from the left until it fits the model's "
                             "context (--max-position-embeddings), as lm-eval-harness does; "
                             "without it such items are scored whole, past the context, with a "
                             "warning.")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--tokenizer-model", default=None,
                        help="Tokenizer path, when it moved since training.")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000)
    parser.add_argument("--seed", type=seed_flag, default=0, help="Seed of the bootstrap resampling.")
    parser.add_argument("--output", default=None, help="Write the results here as JSON.")
    return parser


def _default_modes(items) -> list[str]:
    """All four modes when any item has speech (a text-only item among them is then refused,
    named), T->T for a text-only file."""
    return list(MODES) if any(item.context.has_speech for item in items) else ["T->T"]


def eval_main(argv: Sequence[str] | None = None) -> int:
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_eval_parser().parse_args(argv)
    try:
        _check_eval_flags(args)
        modes = parse_modes(args.modes) if args.modes is not None else None
    except ValueError as error:
        return refuse_before_arming("lst-eval", error, same_on_every_rank=True)
    try:  # what this rank sees of the files: another node may see them otherwise
        if args.output is not None:
            _check_output(args)
        _check_items_files(args.items or [])
    except ValueError as error:
        return refuse_before_arming("lst-eval", error, same_on_every_rank=False)
    if args.task is not None:
        return task_main(args)
    try:  # an impossible layout (ParallelLayoutError) is a ValueError too
        context = initialize_parallel(args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, seed=args.seed)
        stop_together.arm()
        model = load_inference_model(args.load, args.tensor_model_parallel_size,
                                     args.pipeline_model_parallel_size, args.tokenizer_model,
                                     args.ckpt_step)
        if args.output is not None:  # the tokenizer the checkpoint names
            _check_output_spares(args.output, model.tokenizer.path, "the model's tokenizer")
        item_sets = _load_item_sets(args.items, model, modes)
        results = {path: evaluate_items(model.model_chunks, items, model.vocab, model.patcher,
                                        modes or _default_modes(items), args.batch_size,
                                        bootstrap_resamples=args.bootstrap_resamples,
                                        seed=args.seed, truncate_context=args.truncate_context)
                   for path, items in item_sets.items()}
    except (CheckpointError, ItemError, OSError, ValueError) as error:
        return refuse_with_the_others("lst-eval", error)
    finally:
        destroy_parallel()
    if context.rank != 0:
        return 0
    print(f"checkpoint {model.checkpoint} (iteration {model.iteration})")
    for path, per_mode in results.items():
        for mode, s in per_mode.items():
            print(f"{path} {mode}: accuracy {s['accuracy']:.4f} "
                  f"[{s['accuracy_ci_low']:.4f}, {s['accuracy_ci_high']:.4f}]  per-token "
                  f"{s['accuracy_normalised']:.4f}  ({_item_count(s)})")
    if args.output:
        return _write_results(args.output, {"checkpoint": str(model.checkpoint),
                                            "iteration": model.iteration, "results": results})
    return 0


def _item_count(summary: dict[str, float]) -> str:
    """"1871 items", and how many had their context cut or were scored past the model's context
    when any were."""
    parts = [f"{int(summary['num_items'])} items"]
    for key, what in (("num_items_truncated", "context cut to fit"),
                      ("num_items_beyond_context", "beyond the model's context")):
        if int(summary[key]):
            parts.append(f"{int(summary[key])} {what}")
    return ", ".join(parts)


def _load_item_sets(paths: Sequence[str], model, modes: list[str] | None) -> dict[str, list]:
    """Every file's items, checked against the model and what its `modes` (or the file's default
    ones) need before any file is scored (a bad second file was found only after the first was
    evaluated)."""
    item_sets = {path: load_items(path, model.tokenizer, model.vocab) for path in paths}
    for items in item_sets.values():
        for mode in modes or _default_modes(items):
            check_items_for_mode(items, mode, model.patcher.config)
    return item_sets


def _check_items_files(paths: Sequence[str]) -> None:
    """Refuse, before the model is loaded (minutes for a large one; the items are read only
    then), an --items path that is missing, a directory or no regular file (a device, a FIFO),
    and a file given twice, by the same
    path or by another (a link, `./a.jsonl`): the results are keyed by the path given, so the
    same path was scored once, silently, and another path to the file scored it again."""
    given: dict[tuple[int, int], str] = {}  # (device, inode) -> the path first given for it
    for items in paths:
        path = Path(items)
        if not path.exists():
            raise ValueError(f"--items {items} does not exist; give story-completion items as "
                             f"JSONL (docs/evaluation.md#the-item-format)")
        if path.is_dir():
            raise ValueError(f"--items {items} is a directory; give the story-completion JSONL "
                             f"files in it")
        # a device reads forever (/dev/zero), a FIFO blocks until a writer comes
        checked_file_size(path, lambda message: ValueError(f"--items {message}"),
                          "story-completion items (JSONL)")
        status = path.stat()
        identity = status.st_dev, status.st_ino
        if identity in given:
            again = ("given twice" if given[identity] == items
                     else f"the file {given[identity]}, given before it")
            raise ValueError(f"--items {items} is {again}; give each items file once")
        given[identity] = items


def _check_eval_flags(args: argparse.Namespace) -> None:
    """Refuse flags that contradict each other or are out of range: the flags alone tell."""
    if (args.items is None) == (args.task is None):
        raise ValueError("give --items (story completion) or --task asr|tts (exactly one)")
    if args.task is not None and args.utterances is None:
        raise ValueError(f"--task {args.task} decodes held-out utterances: give --utterances "
                         f"PREFIX (an aligned dataset)")
    if args.task is None:
        named = [flag for flag, value in (("--utterances", args.utterances),
                                          ("--num-utterances", args.num_utterances),
                                          ("--asr-load", args.asr_load),
                                          ("--no-cache", args.no_cache or None))
                 if value is not None]
        if named:
            verb = "applies" if len(named) == 1 else "apply"
            raise ValueError(f"{' and '.join(named)} {verb} only to --task asr|tts")
    else:  # they were ignored: the utterances were decoded as if they were not given
        named = [flag for flag, value in (("--modes", args.modes),
                                          ("--batch-size", args.batch_size),
                                          ("--truncate-context", args.truncate_context or None))
                 if value is not None]
        if named:
            verb = "applies" if len(named) == 1 else "apply"
            raise ValueError(f"{' and '.join(named)} {verb} only to story-completion --items; "
                             f"drop {'it' if len(named) == 1 else 'them'} with --task {args.task}")
    if args.asr_load is not None and args.task != "tts":
        raise ValueError("--asr-load transcribes generated speech: it applies to --task tts")
    if args.task is None and args.batch_size is None:
        args.batch_size = DEFAULT_EVAL_BATCH_SIZE
    for flag, value in (("--batch-size", args.batch_size),
                        ("--bootstrap-resamples", args.bootstrap_resamples)):
        # Found only after the model was loaded and every item scored.
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.num_utterances is not None and args.num_utterances < 1:
        raise ValueError(f"--num-utterances must be >= 1, got {args.num_utterances}")


def _check_output(args: argparse.Namespace) -> None:
    """--output is written after all the work, over whatever is there: refuse, before any, a path
    that cannot be a results file or that names an input (an items file, a file of the
    --utterances dataset, the tokenizer, a file of a checkpoint directory)."""
    output = Path(args.output)
    if not output.parent.is_dir():
        raise ValueError(f"--output {args.output}: directory {output.parent} does not exist; "
                         f"create it or write elsewhere")
    if output.is_dir():  # found after all the scoring
        raise ValueError(f"--output {args.output} is a directory; name the results file, e.g. "
                         f"{output / 'results.json'}")
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"--output {args.output}: directory {output.parent} is not writable; "
                         f"write the results elsewhere")
    if any(output.resolve() == Path(items).resolve() for items in args.items or []):
        raise ValueError(f"--output {args.output} is one of the --items files, which the results "
                         f"would overwrite; write them to another file")
    if args.utterances is not None and any(
            output.resolve() == Path(args.utterances + suffix).resolve()
            for suffix in (".bin", ".idx", ".json")):
        raise ValueError(f"--output {args.output} is a file of the --utterances dataset, which "
                         f"the results would overwrite; write them to another file")
    if args.tokenizer_model is not None:
        _check_output_spares(args.output, args.tokenizer_model, "the --tokenizer-model file")
    for flag in ("--load", "--asr-load"):
        directory = getattr(args, flag[2:].replace("-", "_"))
        if directory is None:
            continue
        run = _save_directory(Path(directory))
        if not output.resolve().is_relative_to(run):
            continue
        # Folders hold the checkpoints and the row index; these files the run's state and logs.
        inside = output.resolve().relative_to(run)
        if len(inside.parts) > 1 or inside.name in (TRACKER_FILENAME, METRICS_FILENAME,
                                                    LOCK_FILENAME, SNAPSHOT_FILENAME):
            raise ValueError(f"--output {args.output} is a file of the training run in the "
                             f"{flag} directory {directory} (its checkpoints, index or logs), "
                             f"which the results would overwrite; write them to another file")


def _save_directory(load: Path) -> Path:
    """The training run's save directory behind `--load`: the directory itself, or its parent
    when it is one checkpoint (`DIR/iter_0000100`, which holds the checkpoint's record)."""
    load = load.resolve()
    return load.parent if (load / METADATA_FILENAME).is_file() else load


def _check_output_spares(output: str, path: str | os.PathLike, what: str) -> None:
    """Refuse an --output that is `path`, an input the results would overwrite."""
    if Path(output).resolve() == Path(path).resolve():
        raise ValueError(f"--output {output} is {what}, which the results would overwrite; "
                         f"write them to another file")


def _write_results(output: str, results: dict) -> int:
    """Write the results JSON to --output, a value that is not a number (the steps per second
    of a TTS model that generated no units) as null: standard JSON has no NaN. 0, or 2 with a
    one-line error when it cannot be written (the results are on stdout already). Replaced
    atomically: a write that fails or is killed leaves the file as it was, never half a JSON."""
    try:
        replace_file_durably(output, json.dumps(_nan_as_null(results), indent=1,
                                                allow_nan=False))
    except OSError as error:
        print(f"lst-eval: cannot write the results to --output {output} "
              f"({error.strerror or error}); they are printed above", file=sys.stderr)
        return 2
    return 0


def task_main(args: argparse.Namespace) -> int:
    """`lst-eval --task asr|tts`: decode held-out utterances on one process, print the summary."""
    from megatron_lst.data.indexed import DocumentStore
    from megatron_lst.evaluation.downstream import (
        TaskModel,
        read_utterances,
        run_asr,
        run_tts,
        summarise_asr,
        summarise_tts,
    )
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
        return refuse_before_arming(
            "lst-eval", ValueError("--task decodes on one process; drop the parallel sizes"),
            same_on_every_rank=True)
    try:
        context = initialize_parallel(seed=args.seed)
        stop_together.arm()
        if context.world_size != 1:
            raise ValueError(
                f"--task decodes on one process; it was started on {context.world_size}, which "
                f"would all decode the same utterances: run lst-eval without torchrun")
        store = DocumentStore(args.utterances)
        if store.kind != "aligned":
            raise ValueError(f"--utterances {args.utterances} is a {store.kind} dataset; give an "
                             f"aligned (speech) one")
        if args.num_utterances is not None and args.num_utterances > len(store):
            logger.warning("--num-utterances %d is more than the %d utterances of %s: decoding "
                           "all %d", args.num_utterances, len(store), args.utterances, len(store))
        utterances = read_utterances(store, min(len(store), args.num_utterances or len(store)))
        loaded = load_inference_model(args.load, tokenizer_model=args.tokenizer_model,
                                      ckpt_step=args.ckpt_step)
        if args.output is not None:  # the tokenizer the checkpoint names
            _check_output_spares(args.output, loaded.tokenizer.path, "the model's tokenizer")
        store.vocab.check_same(loaded.vocab, f"checkpoint {loaded.checkpoint}")
        _warn_of_another_task(loaded, args.task, "--load")
        model = TaskModel.from_inference_model(loaded)
        use_cache = not args.no_cache
        if args.task == "asr":
            summary = summarise_asr(run_asr(model, utterances, use_cache),
                                    args.bootstrap_resamples, args.seed)
        else:
            asr = None
            if args.asr_load is not None:
                asr_loaded = load_inference_model(args.asr_load,
                                                  tokenizer_model=args.tokenizer_model)
                _check_asr_reads_the_units(asr_loaded.vocab, loaded.vocab, args)
                _warn_of_another_task(asr_loaded, "asr", "--asr-load")
                if args.output is not None:
                    _check_output_spares(args.output, asr_loaded.tokenizer.path,
                                         "the --asr-load model's tokenizer")
                asr = TaskModel.from_inference_model(asr_loaded)
            outputs = run_tts(model, utterances, asr, use_cache)
            summary = summarise_tts(outputs, store.manifest.frame_rate,
                                    args.bootstrap_resamples, args.seed)
    except (CheckpointError, OSError, ValueError) as error:
        return refuse_with_the_others("lst-eval", error)
    finally:
        destroy_parallel()
    print(f"checkpoint {loaded.checkpoint} (iteration {loaded.iteration}), {args.task} on "
          f"{len(utterances)} utterances of {args.utterances}")
    for name, value in summary.items():
        if not name.endswith(("_ci_low", "_ci_high")):
            interval = (f" [{summary[name + '_ci_low']:.4f}, {summary[name + '_ci_high']:.4f}]"
                        if name + "_ci_low" in summary else "")
            shown = str(value) if isinstance(value, int) else f"{value:.4f}"  # a count, a rate
            print(f"{name}: {shown}{interval}")
    if args.output:
        return _write_results(args.output, {"checkpoint": str(loaded.checkpoint),
                                            "iteration": loaded.iteration, "task": args.task,
                                            "results": summary})
    return 0


def _warn_of_another_task(loaded: InferenceModel, task: str, flag: str) -> None:
    """Warn when `loaded` was fine-tuned on the other task (its run's recorded `--task`): most
    likely the other task's directory was given. Not refused: a model fine-tuned on both in turn
    records the last."""
    if loaded.trained_task not in ("lm", task):
        logger.warning("%s %s was fine-tuned with --task %s, and is evaluated on %s: check that "
                       "it is the %s model", flag, loaded.checkpoint, loaded.trained_task, task,
                       task.upper())


def _nan_as_null(value):
    if isinstance(value, dict):
        return {key: _nan_as_null(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _check_asr_reads_the_units(asr_vocab, tts_vocab, args: argparse.Namespace) -> None:
    """The --asr-load model must read the units the TTS model writes: units past its codebook
    stopped the evaluation midway, a larger codebook of its own gave a garbage ASR-CER."""
    if asr_vocab.num_units != tts_vocab.num_units:
        raise ValueError(f"--asr-load {args.asr_load} reads {asr_vocab.num_units} speech units but "
                         f"the TTS model of --load {args.load} writes {tts_vocab.num_units}; give "
                         f"an ASR model trained on the TTS model's codebook")


if __name__ == "__main__":
    sys.exit(eval_main())
