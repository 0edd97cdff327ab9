"""`lst-generate`: continuations of a text or speech prompt by a checkpoint.

    lst-generate --load runs/demo/lst --prompt-text "the girl ran" --continue-in speech

Prints one JSON object per continuation: the generated ids, their units and text,
the global steps and the wall time (see `generation.py` for how patches close while generating);
`--prompts FILE` continues every prompt of a JSON Lines file (`prompts_file.py`), each
`--num-samples` times, on one loaded model, shared among data-parallel replicas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.evaluation.cli_shared import (
    add_ckpt_step_flag,
    refuse_before_arming,
    refuse_with_the_others,
)
from megatron_lst.evaluation.generation import (
    GenerationError,
    GenerationResult,
    SamplingConfig,
    build_prompt,
    check_prompt,
    check_text_prompt,
    generate,
)
from megatron_lst.evaluation.prompts_file import PromptRecord, read_prompts
from megatron_lst.training import stop_together
from megatron_lst.training.arguments import MAX_SEED, FlagParser, seed_flag

if TYPE_CHECKING:
    import numpy as np

    from megatron_lst.evaluation.loading import InferenceModel

logger = logging.getLogger(__name__)


def build_generate_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="lst-generate", allow_abbrev=False,
                        description="Continue a text or speech prompt.")
    parser.add_argument("--load", required=True,
                        help="A training --save directory (its latest complete checkpoint) or one "
                             "checkpoint directory in it (DIR/iter_0000100).")
    add_ckpt_step_flag(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-text", default=None)
    prompt.add_argument("--prompt-units", default=None,
                        help="Whitespace-separated unit values, or @FILE to read them from "
                             "FILE (text, or the .npy tools/extract_units.py writes).")
    prompt.add_argument("--prompts", default=None,
                        help="A JSON Lines file of prompts, one object per line: "
                             "{\"id\": ..., \"text\": ...} or {\"id\": ..., \"units\": [...]} "
                             "(id optional: the line number). Every prompt is checked before "
                             "the first is generated, and each continuation is printed as one "
                             "JSON line with its \"id\" as soon as it is generated.")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="Continuations per prompt, sample k drawn with seed --seed + k "
                             "(printed as \"sample\" when above 1); needs --temperature above "
                             "0.")
    parser.add_argument("--continue-in", choices=("speech", "text"), default=None,
                        help="Continue in this modality: the prompt ends with its mode marker "
                             "(<s> or <t>) and only units, or only text pieces, are generated "
                             "until EOS or --max-new-tokens. Default: the model continues the "
                             "prompt freely.")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy.")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--speech-only", action="store_true",
                        help="The same as --continue-in speech: generate only units (and the "
                             "end of sequence), after the speech marker.")
    parser.add_argument("--seed", type=seed_flag, default=0)
    parser.add_argument("--no-cache", action="store_true",
                        help="Re-run the whole model every step (the reference's way).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="The processes of one model replica; torchrun with a multiple of "
                             "it runs data-parallel replicas, which share the prompts' "
                             "continuations.")
    parser.add_argument("--tokenizer-model", default=None)
    return parser


def _unit_prompt(text: str) -> list[int]:
    """The unit values of --prompt-units: inline, or @FILE (whitespace-separated values, or the
    .npy array tools/extract_units.py writes)."""
    from megatron_lst.data.document_parsing import parse_units_text
    from megatron_lst.data.documents import DocumentError
    from megatron_lst.data.unit_files import load_units

    if text.startswith("@"):
        try:
            units = load_units(Path(text[1:])).tolist()
        except OSError as error:
            raise ValueError(f"--prompt-units {text}: cannot read {text[1:]} "
                             f"({error.strerror or error})") from None
        except DocumentError as error:  # not UTF-8 or .npy, or not integers; names the file
            raise ValueError(f"--prompt-units {text}: {error}") from None
    else:
        try:  # as a units file is read: int() took "2_0" for 20 and full-width digits for ASCII
            units = parse_units_text(text, "--prompt-units").tolist()
        except DocumentError as error:
            raise ValueError(f"{error}; give whitespace-separated integer unit values") from None
    if not units:
        raise ValueError(f"--prompt-units {text!r} holds no units; give the units to continue")
    return units


def _warn_of_unused_sampling_flags(args: argparse.Namespace) -> None:
    """--temperature 0 decodes greedily: say that --top-k / --top-p, when given, do nothing."""
    unused = [flag for flag, value, default in (("--top-k", args.top_k, 0),
                                                 ("--top-p", args.top_p, 1.0))
              if value != default]
    if args.temperature == 0 and unused:
        logger.warning("--temperature 0 decodes greedily (the most likely token each step): %s "
                       "%s no effect; give a --temperature above 0 to sample with %s",
                       " and ".join(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}"
                                    for flag in unused),
                       "has" if len(unused) == 1 else "have",
                       "it" if len(unused) == 1 else "them")


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse a sampling flag out of its range, naming the flag (SamplingConfig names its
    fields, which are not what the user typed)."""
    if not 0 <= args.temperature < math.inf:
        raise ValueError(f"--temperature {args.temperature} must be a finite number >= 0 "
                         f"(0: greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 0 (0: every token)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1] (1.0: every token)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples} must be >= 1")
    if args.num_samples > 1 and args.temperature == 0:
        raise ValueError(f"--num-samples {args.num_samples} with --temperature 0 (greedy) would "
                         f"print the same continuation {args.num_samples} times; give a "
                         f"--temperature above 0 to sample")
    if args.seed + args.num_samples - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed} + --num-samples {args.num_samples} - 1 is past the "
                         f"largest seed {MAX_SEED}; give a smaller --seed")


def generate_main(argv: Sequence[str] | None = None) -> int:
    from megatron_lst.evaluation.loading import load_inference_model
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_generate_parser().parse_args(argv)
    try:  # the flags, before the model is loaded (minutes for a large one)
        if args.speech_only and args.continue_in == "text":
            raise GenerationError("--speech-only contradicts --continue-in text")
        # --speech-only is --continue-in speech: a text prompt ends with "space, <s>", as the
        # interleaver opens a speech run (units right after text pieces: a layout never trained)
        continue_in = "speech" if args.speech_only else args.continue_in
        _check_sampling_flags(args)
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                                  args.seed, continue_in)
        _warn_of_unused_sampling_flags(args)
        if args.prompt_text is not None:
            check_text_prompt(args.prompt_text)
    except ValueError as error:  # GenerationError is one
        return refuse_before_arming("lst-generate", error, same_on_every_rank=True)
    try:  # inline, or @FILE / --prompts FILE: what this rank reads of the file
        records = _prompt_records(args)
    except ValueError as error:  # ItemError is one
        return refuse_before_arming("lst-generate", error, same_on_every_rank=(
            args.prompt_units is not None and not args.prompt_units.startswith("@")))
    try:  # an impossible layout (ParallelLayoutError) is a ValueError too
        context = initialize_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
        stop_together.arm()
        loaded = load_inference_model(args.load, args.tensor_model_parallel_size, 1,
                                      args.tokenizer_model, args.ckpt_step)
        prompts = [_checked_prompt(record, loaded, continue_in) for record in records]
        jobs = [(record, prompt, sample) for record, prompt in zip(records, prompts, strict=True)
                for sample in range(args.num_samples)]
        for line in _continuation_lines(jobs, loaded, sampling, args):
            if context.rank == 0:  # at once: a long run keeps what it generated
                print(line, flush=True)
    except (CheckpointError, GenerationError, OSError, ValueError) as error:
        return refuse_with_the_others("lst-generate", error)
    finally:
        destroy_parallel()
    return 0


def _continuation_lines(jobs: list[tuple[PromptRecord, np.ndarray, int]],
                        loaded: InferenceModel, sampling: SamplingConfig,
                        args: argparse.Namespace) -> Iterator[str]:
    """The JSON line of each `(record, prompt, sample)` job, in the order of `jobs`.
    Data-parallel replicas take the jobs in rounds, one each (replica r the r-th of its round),
    and exchange their lines when the round ends: the lines are those of one process."""
    import torch
    from megatron.core import parallel_state

    replicas = parallel_state.get_data_parallel_world_size()
    replica = parallel_state.get_data_parallel_rank()
    for first in range(0, len(jobs), replicas):
        round_jobs = jobs[first:first + replicas]
        line = None
        if replica < len(round_jobs):
            record, prompt, sample = round_jobs[replica]
            result = generate(loaded.model_chunks[0], prompt, loaded.vocab,
                              loaded.patcher.config,
                              dataclasses.replace(sampling, seed=args.seed + sample),
                              use_cache=not args.no_cache)
            labels = {"id": record.id} if args.prompts is not None else {}
            if args.num_samples > 1:
                labels["sample"] = sample
            line = json.dumps({**labels, **_continuation(prompt, result, loaded)})
        lines = [line]
        if replicas > 1:
            lines = [None] * replicas
            torch.distributed.all_gather_object(
                lines, line, group=parallel_state.get_data_parallel_group())
        yield from lines[:len(round_jobs)]


def _prompt_records(args: argparse.Namespace) -> list[PromptRecord]:
    """The prompts of the flags: --prompts FILE's, or the one of --prompt-text/--prompt-units."""
    if args.prompts is not None:
        return read_prompts(args.prompts)
    if args.prompt_units is not None:
        return [PromptRecord("1", "", units=_unit_prompt(args.prompt_units))]
    return [PromptRecord("1", "", text=args.prompt_text)]


def _checked_prompt(record: PromptRecord, loaded: InferenceModel,
                    continue_in: str | None) -> np.ndarray:
    """`[n]` joint ids of `record`, checked as `generate` checks a prompt (before any prompt of
    a file is generated); a GenerationError names the record's file and line."""
    try:
        prompt = build_prompt(loaded.vocab, loaded.tokenizer, record.text, record.units,
                              continue_in)
        check_prompt(loaded.model_chunks[0], prompt, loaded.vocab, loaded.patcher.config)
    except GenerationError as error:
        if not record.where:
            raise
        raise type(error)(f"{record.where}: {error}") from None
    return prompt


def _continuation(prompt: np.ndarray, result: GenerationResult, loaded: InferenceModel) -> dict:
    """The JSON object of one continuation of `prompt`."""
    vocab, ids = loaded.vocab, result.tokens
    is_unit = vocab.is_unit(ids)
    pieces = [int(i) for i in ids if i < vocab.text_size and i not in (vocab.bos_id, vocab.eos_id)]
    return {
        "prompt": prompt.tolist(),
        "tokens": ids.tolist(),
        "units": vocab.ids_to_units(ids[is_unit]).tolist(),
        "text": loaded.tokenizer.decode(pieces),
        "stopped_at_eos": result.stopped_at_eos,
        "stopped_at_context_limit": result.stopped_at_context_limit,
        "global_steps": result.global_steps,
        "seconds": round(result.seconds, 4),
    }
