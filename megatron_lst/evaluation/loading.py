"""The model a training checkpoint describes, with its weights, ready for scoring or generation.

A checkpoint's `lst_checkpoint.json` keeps the model's configuration, the joint vocabulary and the
training flags. The model is built from that configuration by the trainer's own
`build_model_chunks` (so it is the same model, LST or baseline) under the layout asked for here
(the global layers split evenly over its pipeline stages, any remainder on the first, whatever
split training used), and its weights are read with `load_checkpoint` (dist-checkpointing
reshards them to that layout). Optimizer and RNG state are not read. Flags the checkpoint does
not record (one written by `lst-convert` records only the model's) take `lst-train`'s defaults.
Call after `initialize_parallel` with the same tensor/pipeline sizes.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lst.checkpoint.errors import CheckpointError
from megatron_lst.checkpoint.model_config import SavedModel, read_model_config
from megatron_lst.checkpoint.model_state import CheckpointContentError
from megatron_lst.checkpoint.saved_flags import saved_flags_problem
from megatron_lst.models.config import LSTConfig
from megatron_lst.parallel import ParallelLayoutError, first_stage_layers_for_any_split
from megatron_lst.patching import Patcher
from megatron_lst.tokenizer.text_tokenizer import TextTokenizer, load_text_tokenizer
from megatron_lst.tokenizer.vocab import JointVocab
from megatron_lst.training.checkpoint_discovery import select_checkpoint
from megatron_lst.training.checkpoint_load import load_checkpoint
from megatron_lst.training.checkpoint_metadata import read_checkpoint_metadata
from megatron_lst.training.checkpointing import METADATA_FILENAME


@dataclass
class InferenceModel:
    model_chunks: list[torch.nn.Module]
    """This rank's model chunks, in eval mode."""
    vocab: JointVocab
    tokenizer: TextTokenizer
    patcher: Patcher
    """The training patcher; scoring and generation turn it into the inference one."""
    checkpoint: Path
    iteration: int
    trained_task: str
    """The `--task` its run trained on: "lm" (pretraining), "asr" or "tts"."""


def load_inference_model(load_dir: str | os.PathLike, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1,
                         tokenizer_model: str | None = None,
                         ckpt_step: int | None = None) -> InferenceModel:
    """Collective: build and load the latest checkpoint under `load_dir`, or the one of
    iteration `ckpt_step` (`select_checkpoint`).

    `tokenizer_model` overrides the tokenizer path the training flags name (a checkpoint moved
    to another machine); its size must match the checkpoint's vocabulary.
    """
    from megatron_lst.training.data_provider import patching_config_from_args
    from megatron_lst.training.model_provider import build_model_chunks

    path = select_checkpoint(load_dir, ckpt_step)
    if path is None:
        raise CheckpointError(_no_checkpoint_message(Path(load_dir)))
    metadata = read_checkpoint_metadata(path)
    if metadata.get("vocab") is None:
        raise CheckpointError(f"{path} does not record its vocabulary; it cannot be evaluated")
    vocab = JointVocab.from_dict(metadata["vocab"])
    try:
        saved = read_model_config(metadata, path)
    except CheckpointContentError as error:
        raise CheckpointError(str(error)) from None
    if saved is None:
        raise CheckpointError(f"{path} records no LST or baseline model; it was not written by "
                              "lst-train or lst-convert")
    args = _inference_args(metadata.get("args") or {}, saved, path)
    args.tensor_model_parallel_size = tensor_model_parallel_size
    args.pipeline_model_parallel_size = pipeline_model_parallel_size
    _check_tensor_parallel_size_fits(saved.config, tensor_model_parallel_size, path)
    # The training run's stage split fits its own pipeline size only.
    args.decoder_first_pipeline_num_layers = first_stage_layers_for_any_split(
        saved.config.global_model.num_layers, pipeline_model_parallel_size)
    args.decoder_last_pipeline_num_layers = None

    tokenizer_path = tokenizer_model or args.tokenizer_model
    if tokenizer_path is None:
        raise CheckpointError(f"{path} names no tokenizer (its run had no --tokenizer-model, or "
                              f"lst-convert wrote it from a portable or reference checkpoint "
                              f"that names none); pass --tokenizer-model with the tokenizer of "
                              f"its vocabulary ({vocab.text_size} text pieces)")
    tokenizer = load_text_tokenizer(tokenizer_path)
    vocab.check_tokenizer(tokenizer, f"checkpoint {path}")  # size, and digest when recorded

    model_chunks, _ = build_model_chunks(args, vocab.size, config=saved.config)
    # The checkpoint read above, even where a running training saved a newer one since.
    loaded = load_checkpoint(path, model_chunks, None, None, args, vocab)
    for chunk in model_chunks:
        chunk.eval()
    return InferenceModel(model_chunks, vocab, tokenizer,
                          Patcher(patching_config_from_args(args)), loaded.path,
                          int(metadata["iteration"]), args.task)


def _no_checkpoint_message(load_dir: Path) -> str:
    """Why `load_dir` gives no model: no dist checkpoint is there; where it holds a checkpoint of
    another form (portable, or the reference implementation's), the conversions that make one;
    where it is one checkpoint under another name than iter_XXXXXXX, the name to give it."""
    from megatron_lst.checkpoint.portable import CONFIG_FILENAME, WEIGHTS_FILENAME
    from megatron_lst.checkpoint.reference_files import CONSOLIDATED_FILENAME, CONSOLIDATED_FOLDER
    from megatron_lst.checkpoint.safe_pickle import DCP_METADATA_FILENAME
    from megatron_lst.training.foreign_checkpoints import renamed_checkpoint_advice

    renamed = renamed_checkpoint_advice(load_dir)
    if renamed is not None:  # before the reference's: it holds a .metadata too
        return renamed
    to_dist = "`lst-convert portable-to-dist --portable {} --save NEW_DIR`, then pass --load NEW_DIR"
    if (load_dir / CONFIG_FILENAME).is_file() or load_dir.name == WEIGHTS_FILENAME:
        portable = load_dir if load_dir.is_dir() else load_dir.parent
        return (f"{load_dir} is a portable checkpoint ({WEIGHTS_FILENAME} + {CONFIG_FILENAME}), "
                f"not a dist checkpoint of lst-train: convert it with {to_dist.format(portable)}")
    reference_parts = (CONSOLIDATED_FILENAME, CONSOLIDATED_FOLDER, DCP_METADATA_FILENAME)
    if load_dir.suffix in (".pth", ".pt") or any((load_dir / part).exists()
                                                  for part in reference_parts):
        return (f"{load_dir} holds a checkpoint of the reference implementation, not a dist "
                f"checkpoint of lst-train: import it with `lst-convert import-reference "
                f"--reference-ckpt {load_dir} --output PORTABLE_DIR`, convert that with "
                f"{to_dist.format('PORTABLE_DIR')}")
    return (f"{load_dir} holds no complete checkpoint (no iter_XXXXXXX with "
            f"lst_checkpoint.json); pass the --save directory of a run")


def _check_tensor_parallel_size_fits(config: LSTConfig, tp: int, path: Path) -> None:
    """Tensor parallelism splits the global model's heads, query groups and FFN width and the
    vocabulary over its ranks: refuse a size that does not divide them all, naming the sizes
    that do."""
    model = config.global_model
    sizes = {"attention heads": model.num_heads,
             "query groups": model.num_query_groups or model.num_heads,
             "FFN width": model.ffn_hidden_size, "vocabulary size": config.vocab_size}
    undivided = [f"{name} ({count})" for name, count in sizes.items() if count % tp]
    if undivided:
        common = math.gcd(*sizes.values())
        fitting = [size for size in range(1, common + 1) if common % size == 0]
        raise ParallelLayoutError(
            f"--tensor-model-parallel-size {tp} does not divide the {', '.join(undivided)} of "
            f"the model of {path}; use one of {fitting}")


def _inference_args(saved_args: dict, saved: SavedModel, path: Path) -> argparse.Namespace:
    """The flags `build_model_chunks` and the patcher read: `lst-train`'s defaults, then the
    checkpoint's saved flags (each checked against what its flag takes), then one process's
    inference settings."""
    from megatron_lst.training.arguments import build_parser

    parser = build_parser()
    _check_saved_flags(saved_args, parser, path)
    args = parser.parse_args([])
    vars(args).update(saved_args)
    if saved.baseline:
        args.patching_mode = "none"
    elif args.patching_mode == "none":  # an LST model whose data flags were not recorded
        args.patching_mode = "static"
    args.params_dtype_name = saved_args.get("params_dtype_name", "float32")
    _backends_that_run_here(args)
    args.sequence_parallel = False
    args.use_distributed_optimizer = args.overlap_param_gather = False
    args.finetune, args.no_load_optim, args.no_load_rng = False, True, True
    args.ckpt_step = None  # a run resumed with --ckpt-step N saved it: not this load's pick
    return args


def _backends_that_run_here(args: argparse.Namespace) -> None:
    """The global-block implementation and kernel backend training chose, where they run on this
    machine, else "auto" (what runs here): they decide how the model computes, not what it is. A
    run trained on GPUs with --transformer-impl transformer_engine or --kernel-backend triton
    failed to load on a machine without Transformer Engine or CUDA (a RuntimeError traceback)."""
    import torch
    from lst_kernels.backend import resolve_backend

    from megatron_lst.models.specs import resolve_transformer_impl

    try:
        resolve_transformer_impl(args.transformer_impl)
    except RuntimeError:
        args.transformer_impl = "auto"
    try:  # CUDA tensors stand for themselves: none is made (it would open a CUDA context)
        resolve_backend(args.kernel_backend,
                        *(() if torch.cuda.is_available() else (torch.empty(0),)))
    except RuntimeError:
        args.kernel_backend = "auto"


def _check_saved_flags(saved_args: dict, parser: argparse.ArgumentParser, path: Path) -> None:
    """Refuse saved flags of a value their `lst-train` flag cannot give (a hand-edited or damaged
    `lst_checkpoint.json`; `saved_flags.saved_flags_problem`)."""
    problem = saved_flags_problem(saved_args, parser)
    if problem is not None:
        raise CheckpointError(f"{path / METADATA_FILENAME}: {problem}; the file is damaged or "
                              f"was edited: restore it")
