"""Speech generation benchmark: global steps and wall time per generated second of speech,
LST (static p) against the token baseline with the same global transformer.

Both models continue the same speech prompt with `megatron_lst.evaluation.generation.generate`
(KV cache on, sampling restricted to units so every generated token is speech; random weights:
the cost of a step does not depend on what the weights say). A second of speech is
`--frame-rate` units (HuBERT: 25 Hz). EOS is never sampled (its logit is masked), so a run
generates all `--units` unless it reaches the model's context. LST runs its global model once per
closed patch, the baseline once per token, so LST should need about 1/p of the baseline's global
steps; wall time also counts LST's local encoder and decoder, which run on each new token with
their own caches (see generation.py). `--no-cache` times the reference's way (the whole model
every step) too.

    python tools/bench_generation.py                         # medium preset, 200 units, p = 4
    python tools/bench_generation.py --preset tiny --units 100 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Result:
    model: str  # "lst" or "baseline"
    cache: bool
    generated_units: int
    speech_seconds: float
    global_steps: int
    wall_seconds: float
    global_steps_per_speech_second: float
    wall_seconds_per_speech_second: float
    stopped_by: str  # "max-new-tokens" (all --units generated), "eos" or "context limit"


def build(kind: str, preset_name: str, vocab_size: int, eos_id: int):
    """A random-weight model whose logits never pick `eos_id`: random weights sample EOS at some
    point, which ended runs at a length that depended on the seed, not on `--units`."""
    import torch

    from megatron_lst.models import LSTModel, TokenBaselineModel, preset

    config = preset(preset_name, vocab_size)
    megatron_config = config.transformer_config()
    torch.manual_seed(0)
    cls = LSTModel if kind == "lst" else TokenBaselineModel
    model = cls(config, megatron_config, transformer_impl="local").eval()

    def mask_eos(module, inputs, output):  # output: (logits [.., N, V], bias); TP = 1
        logits, bias = output
        return logits.index_fill(-1, torch.tensor([eos_id], device=logits.device),
                                 float("-inf")), bias

    model.output_layer.register_forward_hook(mask_eos)
    return model


def run(args: argparse.Namespace) -> list[Result]:
    import numpy as np

    from megatron_lst.evaluation.generation import SamplingConfig, build_prompt, generate
    from megatron_lst.parallel import destroy_parallel, initialize_parallel
    from megatron_lst.patching import PatchingConfig
    from megatron_lst.tokenizer.vocab import JointVocab

    vocab = JointVocab(args.text_vocab_size)
    prompt = build_prompt(vocab, units=np.random.default_rng(0).integers(0, 500, args.prompt_units))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.units, modality="speech")
    initialize_parallel()
    results = []
    try:
        for kind in ("lst", "baseline"):
            model = build(kind, args.preset, vocab.size, vocab.eos_id)
            patching = PatchingConfig("static" if kind == "lst" else "none",
                                      patch_size=args.patch_size)
            for cache in (True, False) if args.no_cache else (True,):
                generate(model, prompt, vocab, patching,
                         SamplingConfig(temperature=1.0, max_new_tokens=4, modality="speech"))
                out = generate(model, prompt, vocab, patching, sampling, use_cache=cache)
                units = int(vocab.is_unit(out.tokens).sum())
                seconds = units / args.frame_rate
                stopped_by = ("context limit" if out.stopped_at_context_limit
                              else "eos" if out.stopped_at_eos else "max-new-tokens")
                results.append(Result(kind, cache, units, seconds, out.global_steps, out.seconds,
                                      out.global_steps / seconds, out.seconds / seconds,
                                      stopped_by))
    finally:
        destroy_parallel()
    return results


def comparison_lines(results: list[Result], units: int, patch_size: int) -> list[str]:
    """LST's global steps over the baseline's per second of generated speech (the two may
    generate different amounts: a model stops at EOS or at its context), and a note for each run
    that generated fewer than `units` units."""
    lst, base = results[0], next(r for r in results if r.model == "baseline")
    ratio = lst.global_steps_per_speech_second / base.global_steps_per_speech_second
    lines = [f"LST / baseline global steps per second of speech: {ratio:.3f} "
             f"(1/p = {1 / patch_size:.3f})"]
    for r in results:
        if r.generated_units < units:
            lines.append(f"note: {r.model} (cache {r.cache}) generated {r.generated_units} of "
                         f"--units {units} units: it stopped at {r.stopped_by}; its rates are "
                         f"per the speech it generated (a shorter --prompt-units or --units, or "
                         f"a preset with a longer context, generates them all)")
    return lines


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model is built, a flag the runs cannot use (each was a traceback, the
    --json folder one only after every run), with argparse's one line and exit status 2."""
    from megatron_lst.models.config import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset} is not a preset; choose one of {', '.join(PRESETS)}")
    for flag in ("--units", "--prompt-units", "--patch-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not 0 < args.frame_rate < math.inf:
        parser.error(f"--frame-rate must be a positive number of units a second, got "
                     f"{args.frame_rate}")
    if args.json is not None:
        json_path = Path(args.json)
        if not json_path.parent.is_dir():
            parser.error(f"--json {args.json}: directory {json_path.parent} does not exist; "
                         f"create it or write elsewhere")
        if json_path.is_dir():
            parser.error(f"--json {args.json} is a directory; name the results file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium", help="Model size (models.config.preset).")
    parser.add_argument("--units", type=int, default=200, help="Units to generate.")
    parser.add_argument("--prompt-units", type=int, default=50)
    parser.add_argument("--patch-size", type=int, default=4, help="LST static p.")
    parser.add_argument("--frame-rate", type=float, default=25.0, help="Units per second.")
    parser.add_argument("--text-vocab-size", type=int, default=512)
    parser.add_argument("--no-cache", action="store_true",
                        help="Also time generation without the KV cache.")
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args()
    check_args(parser, args)
    warnings.filterwarnings("ignore")
    results = run(args)
    print(f"{'model':9} {'cache':5} {'units':>6} {'speech s':>8} {'global steps':>12} "
          f"{'wall s':>8} {'steps/speech s':>14} {'wall s/speech s':>15}")
    for r in results:
        print(f"{r.model:9} {str(r.cache):5} {r.generated_units:6d} {r.speech_seconds:8.2f} "
              f"{r.global_steps:12d} {r.wall_seconds:8.3f} {r.global_steps_per_speech_second:14.2f} "
              f"{r.wall_seconds_per_speech_second:15.4f}")
    for line in comparison_lines(results, args.units, args.patch_size):
        print(line)
    if args.json:
        from megatron_lst.checkpoint.durable_files import replace_file_durably

        replace_file_durably(args.json, json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
