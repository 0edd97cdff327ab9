"""The conversions `lst-convert` runs, each verified by a forward pass before and after.

Every function runs in one process after `initialize_parallel()` (TP=1/PP=1): the source is
loaded into a model, the target is written, read back into a second model, and both run the
same fixed batch (`verify.py`); a difference above the tolerance raises `VerificationError`.
Returns the measured max abs logit difference.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from megatron_lst.models.reference_config import (
    ReferenceImportError,
    lst_config_from_reference,
    row_limit_notice,
)
from megatron_lst.models.reference_fields import fields_not_carried_over
from megatron_lst.models.reference_tensors import canonical_state_dict
from megatron_lst.tokenizer.vocab import NUM_RESERVED, JointVocab

from .dist import (
    checkpoint_model,
    load_dist_checkpoint,
    resolve_checkpoint,
    save_dist_checkpoint,
    saved_dtypes,
    training_args_for,
)
from .full_shapes import check_full_state_shapes, check_layer_count, full_state_shapes
from .model_state import (
    CheckpointContentError,
    build_full_model,
    check_finite_weights,
    check_weight_dtypes,
    full_state_dict,
    load_full_state_dict,
    weights_as,
)
from .portable import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    PortableCheckpoint,
    load_portable,
    save_portable,
)
from .reference import (
    REFERENCE_LST_PATCHERS,
    check_reference_shapes,
    export_reference,
    import_reference,
    read_reference_model_args,
    read_reference_patcher_args,
    read_reference_tokenizer_args,
    reference_model_args,
)
from .reference_files import (
    locate_reference_checkpoint,
    read_reference_state_dict,
    reference_params_beside,
)
from .reference_run import check_lst_tokenizer, export_sections, imported_tokenizer
from .stale_scratch import WRITER_TAG_PATTERN, remove_stale_scratch, writer_tag
from .verify import VerificationError, verify_same_function

REFERENCE_WEIGHTS_FILENAME = "consolidated.pth"
DEFAULT_REFERENCE_UNITS = 502  # the reference tokenizer's speech_vocab_size_unit default
REFERENCE_ARGS_FILENAME = "params.json"
PORTABLE_FILENAMES = (WEIGHTS_FILENAME, CONFIG_FILENAME)


def portable_model(checkpoint: PortableCheckpoint, source: str):
    """The model of a portable checkpoint, its tensors' names and shapes checked against its
    config before the model is built, and its weights checked to be of a dtype the conversions
    read (`check_weight_dtypes`) and finite."""
    check_full_state_shapes({name: tuple(t.shape) for name, t in checkpoint.state.items()},
                            checkpoint.config, source)
    check_weight_dtypes(checkpoint.state, f"{source} ({WEIGHTS_FILENAME})")
    check_finite_weights(checkpoint.state, f"{source} ({WEIGHTS_FILENAME})")
    model = build_full_model(checkpoint.config)
    load_full_state_dict(model, checkpoint.state, source)
    return model


def reference_vocab(vocab_size: int, num_units: int) -> JointVocab:
    """The reference's joint layout: `vocab_size = V + 6 + num_units`."""
    text_size = vocab_size - NUM_RESERVED - 2 - num_units
    if text_size <= 2:
        raise CheckpointContentError(
            f"reference vocab_size {vocab_size} cannot hold {num_units} speech units plus "
            f"{NUM_RESERVED + 2} special ids and a text vocabulary; pass the right --num-units")
    return JointVocab(text_size=text_size, num_units=num_units)


def import_reference_to_portable(reference_ckpt: str | Path, reference_args: str | Path | None,
                                 output: str | Path, num_units: int | None = None,
                                 stream: TextIO | None = None,
                                 notify: Callable[[str], None] | None = None) -> float:
    """Reference checkpoint (any form `reference_files` reads) + model args (None: the
    params.json the reference writes beside the checkpoint) -> portable checkpoint in `output`,
    in the checkpoint's dtype. Nothing is written unless every check passes.

    `num_units`: the vocabulary's speech units; None: the `speech_vocab_size_unit` of the run's
    "lst" tokenizer (`data.tokenizer_args`), else its default 502. The tokenizer's SentencePiece
    model is recorded as the `tokenizer_model` flag (what `lst-eval` loads, and the export
    writes back). Also checks that exporting the imported tensors gives back the reference state
    dict exactly. `notify` is given a notice for each field of the model args that is not
    carried over but set to other than the reference's default (`fields_not_carried_over`), and
    one naming the longest row the reference ran (`row_limit_notice`).
    """
    _refuse_to_overwrite(output, PORTABLE_FILENAMES)
    checkpoint = locate_reference_checkpoint(reference_ckpt)
    if reference_args is None or Path(reference_args).is_dir():
        reference_args = reference_params_beside(checkpoint if reference_args is None
                                                 else reference_args)
    if stream is not None:
        form = "torch.distributed.checkpoint" if checkpoint.is_dir() else "file"
        print(f"import-reference: {checkpoint} ({form}), model args {reference_args}", file=stream)
    original = read_reference_state_dict(checkpoint)
    model_args = read_reference_model_args(reference_args)
    patching = reference_patching(model_args, read_reference_patcher_args(reference_args))
    tokenizer_model, num_units = _reference_tokenizer(reference_args, num_units)
    if tokenizer_model is not None:
        patching["tokenizer_model"] = tokenizer_model
    config = lst_config_from_reference(model_args)
    if notify is not None:
        for notice in (*fields_not_carried_over(model_args), row_limit_notice(model_args)):
            notify(notice)
    try:  # names and shapes before a model of the size the args give is built
        check_layer_count(config, len(original), "the model args")
        check_reference_shapes(original, config, full_state_shapes(config))
        state = canonical_state_dict(original, config)
    except (CheckpointContentError, ReferenceImportError) as error:
        raise ReferenceImportError(f"{checkpoint} (model args {reference_args}): {error}") from None
    before = build_full_model(config)
    _check_identical(export_reference(state, config), original, "re-exported reference state dict")
    if stream is not None:
        print(f"verify import-reference: export of the import == original ({len(original)} "
              "tensors identical)", file=stream)
    load_full_state_dict(before, state, str(checkpoint))
    with staged_output(output, PORTABLE_FILENAMES) as staged:
        save_portable(staged, PortableCheckpoint(
            config=config, state=state, vocab=reference_vocab(config.vocab_size, num_units),
            training_args=patching, reference_model_args=model_args,
            source=f"reference checkpoint {checkpoint}"))
        after = portable_model(load_portable(staged), str(output))
        return verify_same_function(before, after, "import-reference", stream=stream)


def export_portable_to_reference(portable_dir: str | Path, output: str | Path,
                                 stream: TextIO | None = None,
                                 tokenizer_model: str | None = None) -> float:
    """Portable checkpoint -> `output/consolidated.pth` (BLT's `{"model": state dict}`, the
    portable's tensors exactly, in their dtype) and `output/params.json`: `{"model": model
    args, "data": {"tokenizer_args": ..., "patcher_args": ...}, "distributed": {"model_dtype":
    ...}}` (`reference_run`; `patcher_args` where the checkpoint's flags name a patching the
    reference has, `reference_patcher_args`): the reference's `generate.py`/`eval.py` load that
    directory (`load_consolidated_model_and_tokenizer`). `tokenizer_model`: the SentencePiece
    model the tokenizer args name (default: the checkpoint's `tokenizer_model` flag)."""
    _refuse_to_overwrite(output, (REFERENCE_WEIGHTS_FILENAME, REFERENCE_ARGS_FILENAME))
    _refuse_output_inside_source(output, "--output", portable_dir, "--portable")
    checkpoint = load_portable(portable_dir)
    before = portable_model(checkpoint, str(portable_dir))  # checks every tensor's name and shape
    reference = export_reference(checkpoint.state, checkpoint.config)
    training_args = checkpoint.training_args or {}
    model_args = reference_model_args(checkpoint.config, checkpoint.reference_model_args,
                                      training_args.get("max_tokens"),
                                      _patch_size(training_args.get("patch_size")))
    if tokenizer_model is None and isinstance(training_args.get("tokenizer_model"), str):
        tokenizer_model = training_args["tokenizer_model"]
    params = {"model": model_args, **export_sections(reference, tokenizer_model, checkpoint.vocab)}
    patcher_args = reference_patcher_args(checkpoint.training_args)
    if patcher_args is not None:
        params["data"]["patcher_args"] = patcher_args
    if tokenizer_model is None and stream is not None:
        print("export-reference: no SentencePiece model is known for this checkpoint, so "
              "params.json names none (data.tokenizer_args.init_kwargs.bpe_tokenizer_path): "
              "pass --tokenizer-model for the reference to build its tokenizer", file=stream)
    with staged_output(output, (REFERENCE_WEIGHTS_FILENAME, REFERENCE_ARGS_FILENAME)) as staged:
        torch.save({"model": reference}, staged / REFERENCE_WEIGHTS_FILENAME)
        (staged / REFERENCE_ARGS_FILENAME).write_text(json.dumps(params, indent=1) + "\n")
        config, state = import_reference(
            read_reference_state_dict(staged / REFERENCE_WEIGHTS_FILENAME),
            read_reference_model_args(staged / REFERENCE_ARGS_FILENAME))
        after = build_full_model(config)
        load_full_state_dict(after, state, str(output))
        return verify_same_function(before, after, "export-reference", stream=stream)


def _reference_tokenizer(reference_args: str | Path, num_units: int | None) -> tuple[str | None, int]:
    """`(SentencePiece model or None, speech units)` of the reference run whose config is
    `reference_args`: its "lst" tokenizer's (`data.tokenizer_args`), the units `num_units` when
    given. Refuses a run tokenized by another tokenizer than "lst" (`check_lst_tokenizer`), and
    a `num_units` other than the tokenizer's: the ids past the text pieces would name other
    units."""
    tokenizer_args = read_reference_tokenizer_args(reference_args)
    check_lst_tokenizer(tokenizer_args, reference_args)
    path, units = imported_tokenizer(tokenizer_args)
    if num_units is None:
        return path, units or DEFAULT_REFERENCE_UNITS
    if units is not None and units != num_units:
        raise ReferenceImportError(
            f"--num-units {num_units} differs from the {units} speech units of the reference "
            f"run's tokenizer (data.tokenizer_args.init_kwargs.speech_vocab_size_unit in "
            f"{reference_args}); leave --num-units out to use the run's")
    return path, num_units


def dist_to_portable(load: str | Path, output: str | Path,
                     stream: TextIO | None = None) -> float:
    """Dist checkpoint (any TP/PP it was saved with) -> portable checkpoint in `output`, each
    tensor in the dtype the dist checkpoint holds it in."""
    _refuse_to_overwrite(output, PORTABLE_FILENAMES)
    path = resolve_checkpoint(load)
    # The --save directory that holds the checkpoint: its iterations, pointer and metrics.
    _refuse_output_inside_source(output, "--output", path.parent, "--load")
    config, vocab, training_args = checkpoint_model(path)
    before = build_full_model(config)
    load_dist_checkpoint(path, before, vocab)
    # In the dtypes saved (bf16 weights loaded into the fp32 model stay bf16 in the file).
    dtypes = saved_dtypes(path, before)
    state = {name: tensor.to(dtypes[name]) for name, tensor in full_state_dict(before).items()}
    check_finite_weights(state, f"dist checkpoint {path}")
    with staged_output(output, PORTABLE_FILENAMES) as staged:
        save_portable(staged, PortableCheckpoint(
            config=config, state=state, vocab=vocab,
            training_args=training_args, source=f"dist checkpoint {path}"))
        after = portable_model(load_portable(staged, vocab), str(output))
        return verify_same_function(before, after, "dist-to-portable", stream=stream)


def portable_to_dist(portable_dir: str | Path, save: str | Path, iteration: int = 0,
                     stream: TextIO | None = None) -> float:
    """Portable checkpoint -> dist checkpoint `iteration` under `save` (weights only, each in
    the dtype the portable checkpoint holds it in), loadable under any TP/PP with
    `lst-train --load save --finetune`, `lst-eval` and `lst-generate`; it records the model's
    whole configuration, so any model the portable form holds converts.
    Refuses a portable checkpoint that records no vocabulary (`_require_vocab`), and, before
    converting, a `save` that is a file or lies under one (the save failed after the conversion,
    with the trainer's advice to resume) or whose pointer file is no file (the checkpoint was
    written, then the pointer update failed, exit status 1)."""
    from megatron_lst.training.checkpoint_discovery import check_tracker_is_a_file

    _refuse_to_overwrite(save, ())  # the save itself refuses an existing checkpoint
    check_tracker_is_a_file(save)  # which the save replaces, after writing the checkpoint
    _refuse_output_inside_source(save, "--save", portable_dir, "--portable")
    checkpoint = load_portable(portable_dir)
    _require_vocab(checkpoint, Path(portable_dir))
    before = portable_model(checkpoint, str(portable_dir))
    # the reference patching only for a checkpoint without flags (the import records them)
    training_args = training_args_for(
        checkpoint.config, checkpoint.training_args,
        None if checkpoint.training_args else reference_patching(checkpoint.reference_model_args or {}))
    # Saved in the portable checkpoint's dtypes (bf16 stays bf16), compared in the model's.
    with weights_as(before, {name: tensor.dtype for name, tensor in checkpoint.state.items()}):
        path = save_dist_checkpoint(Path(save), before, training_args, checkpoint.vocab,
                                    iteration)
    after = build_full_model(checkpoint.config)
    load_dist_checkpoint(path, after, checkpoint.vocab)
    return verify_same_function(before, after, "portable-to-dist", stream=stream)


def _require_vocab(checkpoint: PortableCheckpoint, portable_dir: Path) -> None:
    """Refuse a portable checkpoint without its vocabulary layout for a dist checkpoint: every
    reader of one (lst-train, lst-eval, dist-to-portable) needs the layout, and the dist
    checkpoint written without it was refused by all of them as "not written by lst-convert"."""
    if checkpoint.vocab is not None:
        return
    size = checkpoint.config.vocab_size
    raise CheckpointContentError(
        f"{portable_dir / CONFIG_FILENAME} records no vocabulary ('vocab' is null or absent), "
        f"which a dist checkpoint needs (lst-train, lst-eval and dist-to-portable read its "
        f"layout), so none is written. Add the layout the model was trained with: \"vocab\": "
        f"{{\"text_size\": T, \"num_units\": U, \"pad_id\": 0, \"bos_id\": 1, \"eos_id\": 2}} "
        f"with T + U + {NUM_RESERVED + 2} = its vocab_size {size}")


# The model args' `patching_mode` values the import patches by (when the data's patcher is no LST
# one): the reference's static and LST patchers, and this package's names "aligned" and
# "curriculum"; null (the args name none) is static patching of 4 units.
MODEL_ARGS_PATCHING_MODES = ("static", *REFERENCE_LST_PATCHERS, "aligned", "curriculum")


def reference_patching(model_args: dict, patcher_args: dict | None = None) -> dict[str, object]:
    """The patching flags for the evaluation tools' patcher from a reference run: its data's
    patcher (`patcher_args`, the `data.patcher_args` of its params.json) where that is one of its
    LST patchers (`REFERENCE_LST_PATCHERS`, with its `patch_size`), else (no data patcher, or
    one of no form the reference reads) the model args' mode (`MODEL_ARGS_PATCHING_MODES`):
    "static" and the static LST patchers with their `patch_size`, "aligned" and "lst_align";
    null or absent (the import refuses those args: `lst_config_from_reference`; a portable
    checkpoint of no reference run), static patching of 4 units. The model args' own
    `patching_mode` and `patch_size` are not what the data was patched with when the data's
    patcher is given (the reference's lst.yaml: model static 6, data lst_static 4).

    Refuses, naming the field, a data patcher of the reference that is no LST one (its entropy
    patcher, also when `patching_mode` is left out, or its static, bpe, space or byte patchers),
    a model args mode no patching here gives (those patchers, or a misspelt mode, which its
    patcher refuses), and a static one without a whole `patch_size`: the model would be
    evaluated on patches other than its data's."""
    if patcher_args is not None:
        _refuse_other_data_patcher(patcher_args)
    patcher_args = patcher_args or {}
    mode = patcher_args.get("patching_mode")
    mode = REFERENCE_LST_PATCHERS.get(mode) if isinstance(mode, str) else None
    if mode == "aligned":
        return {"patching_mode": "aligned"}
    if mode == "static" and _patch_size(patcher_args.get("patch_size")):
        return {"patching_mode": "static", "patch_size": _patch_size(patcher_args["patch_size"])}
    mode = model_args.get("patching_mode")
    if mode is None:
        return {"patching_mode": "static", "patch_size": 4}
    _check_model_args_patching(mode, model_args.get("patch_size"))
    if REFERENCE_LST_PATCHERS.get(mode, mode) == "aligned":
        return {"patching_mode": "aligned"}
    return {"patching_mode": "static", "patch_size": _patch_size(model_args["patch_size"])}


def _refuse_other_data_patcher(patcher_args: dict) -> None:
    """Refuse a data patcher (`data.patcher_args`) whose `patching_mode` names one of the
    reference's patchers other than its LST ones (left out: its default, entropy): the model was
    trained on those patches, which no patching here gives, and the model args' mode would
    evaluate it on others. A mode of another form (no string) is no patcher: left to the model
    args, as the reader of the params.json refuses it."""
    mode = patcher_args.get("patching_mode", "entropy")
    if not isinstance(mode, str) or mode in REFERENCE_LST_PATCHERS:
        return
    given = "" if "patching_mode" in patcher_args else " (the reference default, left out)"
    raise ReferenceImportError(
        f"reference data.patcher_args patching_mode {mode!r}{given} is no LST patcher: the model "
        f"was trained on its patches, which no --patching-mode here gives (accepted are "
        f"{', '.join(map(repr, REFERENCE_LST_PATCHERS))}), and the model args' patching_mode "
        f"would evaluate it on others; not supported (to import the weights all the same, "
        f"patched as the model args say, remove data.patcher_args from a copy of the params.json)")


def _check_model_args_patching(mode: object, size: object) -> None:
    """Refuse model args `patching_mode` `mode` outside `MODEL_ARGS_PATCHING_MODES`, and a
    static one whose `patch_size` `size` is no whole number of units, naming the field."""
    advice = ("give the run's data.patcher_args (e.g. {\"patching_mode\": \"lst_static\", "
              "\"patch_size\": 4}) in its params.json, or correct the model args")
    if not isinstance(mode, str) or mode not in MODEL_ARGS_PATCHING_MODES:
        raise ReferenceImportError(
            f"reference model args patching_mode {mode!r} (with no LST patcher in "
            f"data.patcher_args) is no patching lst-eval can give: accepted are "
            f"{', '.join(map(repr, MODEL_ARGS_PATCHING_MODES))} or null; {advice}")
    if REFERENCE_LST_PATCHERS.get(mode, mode) != "aligned" and _patch_size(size) is None:
        raise ReferenceImportError(
            f"reference model args patching_mode {mode!r} with patch_size {size!r}: static "
            f"patches need a whole number of units there; {advice}")


def reference_patcher_args(training_args: dict | None) -> dict[str, object] | None:
    """The reference data's `patcher_args` for our patching flags (the inverse of
    `reference_patching`): static -> lst_static with the patch size, aligned -> lst_align,
    curriculum -> lst_curriculum with its steps, mixed (no reference counterpart; scored static)
    -> lst_static; None for the token baseline or flags that name no patching."""
    args = training_args or {}
    mode, size = args.get("patching_mode"), _patch_size(args.get("patch_size"))
    if mode == "aligned":
        return {"patching_mode": "lst_align"}
    if mode not in ("static", "mixed", "curriculum") or size is None:
        return None
    steps = args.get("curriculum_tau1"), args.get("curriculum_tau2")
    if mode == "curriculum" and all(isinstance(step, int) and not isinstance(step, bool)
                                    for step in steps):
        return {"patching_mode": "lst_curriculum", "patch_size": size,
                "patcher_curr_align_steps": steps[0], "patcher_curr_mixed_steps": steps[1]}
    return {"patching_mode": "lst_static", "patch_size": size}


def _patch_size(size: object) -> int | None:
    """A reference `patch_size` (a float there) as a whole number of units, or None."""
    if isinstance(size, int | float) and not isinstance(size, bool) and float(size).is_integer() \
            and size >= 1:
        return int(size)
    return None


@contextlib.contextmanager
def staged_output(output: str | Path, filenames: tuple[str, ...]) -> Iterator[Path]:
    """A scratch directory beside `output` for a conversion to write `filenames` into and verify
    them there; when the block completes they move into `output` (`_move_into_place`), else the
    scratch directory is removed: a conversion that fails or is interrupted leaves nothing at
    `output`, and never replaces a checkpoint there (`_refuse_to_overwrite`, checked again
    before the move). The scratch of an earlier conversion to `output` whose process was killed
    (so its cleanup never ran) is removed first (`remove_stale_scratch`)."""
    _refuse_to_overwrite(output, filenames)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Named after this process, so that a later conversion to `output` removes the scratch of
    # one that was killed (no cleanup ran), and never a live one's.
    remove_stale_scratch(
        output.parent.iterdir(),
        rf"\.{re.escape(output.name)}\.partial-{WRITER_TAG_PATTERN}-[a-z0-9_]+",
        f"scratch folders of conversions to {output.name}", output.parent)
    # mkdir, not mkdtemp (0700): the scratch may become `output`, with the mode of a new directory
    scratch = output.parent / f".{output.name}.partial-{writer_tag()}-{secrets.token_hex(6)}"
    scratch.mkdir()
    try:
        yield scratch
        _refuse_to_overwrite(output, filenames)
        _move_into_place(scratch, output, filenames)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(scratch: Path, output: Path, filenames: tuple[str, ...]) -> None:
    """Move the converted `filenames` from `scratch` into `output`. Where `output` is absent, the
    scratch directory becomes it in one rename, so a conversion killed while moving leaves the
    whole checkpoint or none (moved one file at a time, it left the weights without their
    config, which the next conversion refused to overwrite). Into an existing directory (kept as
    it is: its owner and mode, a mount point) they move one at a time, the config last."""
    if not output.exists() and not output.is_symlink():
        os.rename(scratch, output)
        return
    for name in filenames:
        os.replace(scratch / name, output / name)


def _refuse_to_overwrite(output: str | Path, filenames: tuple[str, ...]) -> None:
    """Refuse an `output` directory that already holds a file the conversion would write: a
    checkpoint converted before, which a failed conversion would leave half replaced; and an
    `output` that is a file or lies under one (the move into it failed, after the whole
    conversion and its checks, with a bare 'File exists')."""
    existing = Path(output).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointContentError(
            f"{output}: {existing} is a file, not a directory; give a directory for the converted "
            f"checkpoint (created if missing)")
    existing = [name for name in filenames if (Path(output) / name).exists()]
    if existing:
        raise CheckpointContentError(
            f"{output} already holds {existing}; refusing to overwrite a checkpoint. Give a new "
            f"--output directory, or move that checkpoint away")
    _refuse_a_checkpoint_directory(Path(output))


def _refuse_output_inside_source(output: str | Path, output_flag: str, source: str | Path,
                                 source_flag: str) -> None:
    """Refuse an `output` that is the directory of the checkpoint converted (`source`) or lies
    inside it: the converted checkpoint would be mixed into its source, copied, shared (a
    portable checkpoint is shared as safe, a dist one holds pickles) and deleted with it, and a
    directory of two checkpoints is named as the wrong one by the tools that read it."""
    source_dir, written = Path(source).resolve(), Path(output).resolve()
    if written.is_relative_to(source_dir):
        raise CheckpointContentError(
            f"{output_flag} {output} is inside the {source_flag} checkpoint directory "
            f"{source_dir}; the converted checkpoint would be mixed into the one it is converted "
            f"from. Give {output_flag} a directory outside {source_dir}")


def _checkpoint_markers() -> tuple[str, ...]:
    """Files that make a directory one checkpoint: a torch.distributed.checkpoint index (an
    `iter_XXXXXXX` of lst-train, a step directory of the reference), lst-train's records, and
    the files of a portable checkpoint and of the reference's consolidated one."""
    from megatron_lst.training.checkpointing import METADATA_FILENAME

    from .integrity import MANIFEST_FILENAME
    from .safe_pickle import DCP_METADATA_FILENAME

    return (DCP_METADATA_FILENAME, METADATA_FILENAME, MANIFEST_FILENAME, *PORTABLE_FILENAMES,
            REFERENCE_WEIGHTS_FILENAME)


def _refuse_a_checkpoint_directory(output: Path) -> None:
    """Refuse an `output` that is a checkpoint's own directory: a dist checkpoint lists its
    files, so the converted files written into it (`dist-to-portable --output SAVE/iter_0000100`)
    made it fail verification, and no tool loaded it any more; a directory of two checkpoints
    (`export-reference --output` its portable input) is refused by `import-reference` and
    named as the wrong one by `lst-eval`."""
    markers = [name for name in _checkpoint_markers() if (output / name).exists()]
    if markers:
        raise CheckpointContentError(
            f"{output} is a checkpoint's own directory (it holds {markers}); files written into "
            f"it would make that checkpoint fail verification or hold two checkpoints. Give a "
            f"directory outside it")


def _check_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     what: str) -> None:
    if actual.keys() != expected.keys():
        raise VerificationError(
            f"{what}: tensors {sorted(actual.keys() ^ expected.keys())} are in only one of the two")
    for name, tensor in expected.items():
        if actual[name].dtype != tensor.dtype or not torch.equal(actual[name], tensor):
            raise VerificationError(f"{what}: tensor {name!r} differs from the original")
