"""`lst-convert` / `tools/convert_checkpoint.py`: convert LST checkpoints and verify each result.

    lst-convert import-reference --reference-ckpt STEP_DIR|consolidated.pth [--reference-args params.json] --output DIR
    lst-convert export-reference --portable DIR --output REF_DIR [--tokenizer-model spm.model]
    lst-convert dist-to-portable --load SAVE_DIR --output DIR
    lst-convert portable-to-dist --portable DIR --save SAVE_DIR [--iteration N]
    lst-convert verify --load SAVE_DIR [--ckpt-step N]

The portable form is a directory with `model.safetensors` and `lst_config.json` (`portable.py`).
Dist checkpoints are `lst-train`'s (`--save`/`--load` directories) and carry no layout: the one
written here loads under any TP/PP (`lst-train --load SAVE_DIR --finetune`), and one saved under
any TP/PP converts here. Every command prints the max abs logit difference on a fixed batch
between the model before and after conversion, and exits 1 if it exceeds the tolerance.
`verify` checks a dist checkpoint's files without loading a model: sizes and SHA-256 digests
against the manifest written at save time, truncation against the checkpoint index, that
its pickled parts hold only checkpoint data, and that its lst_checkpoint.json holds every field a
save writes.
Exit status: 0 on success, 1 for a checkpoint that is refused or fails verification, or an
output that exists already or cannot be written; 2 for bad arguments.

Checkpoints from others: see SAFETY_NOTE (printed at the end of --help).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.models.reference_config import ReferenceImportError
from megatron_lst.tokenizer.vocab import VocabularyError

from .model_state import CheckpointContentError
from .verify import VerificationError

SAFETY_NOTE = """\
checkpoints from others:
  portable (model.safetensors + lst_config.json)  safe to accept from anyone: raw tensors and
                                                  JSON, nothing is unpickled
  reference consolidated.pth (import-reference)   read with torch.load(weights_only=True):
                                                  tensors and plain data only; its step
                                                  directories (DCP) with the dist checkpoints'
                                                  restricted unpickler, tensors weights_only
  dist checkpoints (lst-train --save)             hold pickles; every loader reads them with a
                                                  restricted unpickler and refuses anything but
                                                  checkpoint data before megatron reads them
                                                  (`verify` runs the same checks), yet prefer the
                                                  portable form from strangers"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lst-convert", description=__doc__.split("\n\n")[0],
        epilog=SAFETY_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import-reference", help="reference checkpoint -> portable")
    imp.add_argument("--reference-ckpt", required=True,
                     help="the reference's checkpoint: a step directory its training saved "
                          "(torch.distributed.checkpoint), its consolidated/ directory or "
                          "consolidated.pth, or a state dict .pth/.safetensors")
    imp.add_argument("--reference-args", default=None,
                     help="its params.json (model args under 'model'), the training YAML it was "
                          "launched with, or a JSON with 'model_args'; a directory: its "
                          "params.json (default: the params.json beside the checkpoint)")
    imp.add_argument("--output", required=True, help="portable checkpoint directory to write")
    imp.add_argument("--num-units", type=int, default=None,
                     help="speech-unit slots of the reference vocabulary (default: the "
                          "speech_vocab_size_unit of the run's data.tokenizer_args, else 502)")

    exp = commands.add_parser("export-reference", help="portable -> reference checkpoint")
    exp.add_argument("--portable", required=True, help="portable checkpoint directory")
    exp.add_argument("--output", required=True,
                     help="directory for consolidated.pth and params.json")
    exp.add_argument("--tokenizer-model", default=None,
                     help="the SentencePiece model params.json names for the reference's "
                          "tokenizer (default: the checkpoint's --tokenizer-model, kept from "
                          "the training run or the imported params.json)")

    to_portable = commands.add_parser("dist-to-portable", help="dist checkpoint -> portable")
    to_portable.add_argument("--load", required=True,
                             help="lst-train --save directory, or one iter_XXXXXXX directory in it")
    to_portable.add_argument("--output", required=True, help="portable checkpoint directory to write")

    to_dist = commands.add_parser("portable-to-dist", help="portable -> dist checkpoint (weights only)")
    to_dist.add_argument("--portable", required=True, help="portable checkpoint directory")
    to_dist.add_argument("--save", required=True, help="lst-train --save directory to write into")
    to_dist.add_argument("--iteration", type=_iteration, default=0,
                         help="iteration number of the written checkpoint (default 0)")

    verify = commands.add_parser("verify", help="check a dist checkpoint's files")
    verify.add_argument("--load", required=True,
                        help="lst-train --save directory, or one iter_XXXXXXX directory in it")
    verify.add_argument("--ckpt-step", type=int, default=None,
                        help="the checkpoint of this iteration (default: the latest)")
    return parser


def _iteration(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"an iteration number is 0 or more, got {value}")
    return value


def verify_command(load: str, ckpt_step: int | None) -> int:
    """`lst-convert verify`: print what the checks found; 0 for a sound checkpoint, else 1."""
    from megatron_lst.training.checkpoint_discovery import select_checkpoint
    from megatron_lst.training.foreign_checkpoints import renamed_checkpoint_advice

    from .integrity import inspect_checkpoint

    path = select_checkpoint(load, ckpt_step)
    if path is None:
        raise CheckpointError(renamed_checkpoint_advice(load)
                              or f"{load} holds no complete dist checkpoint")
    report = inspect_checkpoint(path)
    if not report.has_manifest:
        print(f"{path}: no manifest (saved before file digests were recorded, or by another "
              f"tool): digests not checked")
    problems = [*report.problems, *_metadata_problems(path)]
    for problem in problems:
        print(f"FAILED {problem}")
    if problems:
        return 1
    print(f"{path}: OK ({report.files_checked} files, {report.bytes_checked} bytes matched "
          f"their digests; index and pickled objects hold only checkpoint data)")
    return 0


def _metadata_problems(path) -> list[str]:
    """The problem with the checkpoint's `lst_checkpoint.json` (written after the manifest, so
    no digest covers it), if any."""
    from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata

    try:
        read_checkpoint_metadata(path)  # checks every field loading reads
    except CheckpointError as error:
        return [str(error)]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "verify":  # reads files only: no process group
        try:
            return verify_command(args.load, args.ckpt_step)
        except CheckpointError as error:
            print(f"lst-convert verify: {error}", file=sys.stderr)
            return 1
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    from . import convert

    initialize_parallel()
    try:
        if args.command == "import-reference":
            convert.import_reference_to_portable(
                args.reference_ckpt, args.reference_args, args.output, args.num_units, sys.stdout,
                notify=lambda notice: print(f"lst-convert {args.command}: {notice}",
                                            file=sys.stderr))
        elif args.command == "export-reference":
            convert.export_portable_to_reference(args.portable, args.output, sys.stdout,
                                                 args.tokenizer_model)
        elif args.command == "dist-to-portable":
            convert.dist_to_portable(args.load, args.output, sys.stdout)
        else:
            convert.portable_to_dist(args.portable, args.save, args.iteration, sys.stdout)
    except (CheckpointContentError, CheckpointError, ReferenceImportError, VocabularyError,
            VerificationError, OSError) as error:  # OSError: an output it cannot write
        print(f"lst-convert {args.command}: {error}", file=sys.stderr)
        return 1
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
