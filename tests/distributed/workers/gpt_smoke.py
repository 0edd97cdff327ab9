"""Worker for test_gpt_smoke.py: a tiny megatron.core GPTModel under several layouts.

Launched by `harness.run_distributed` as `gpt_smoke.py SCENARIO --checkpoints DIR`.
Each scenario measures losses of one fixed batch under one or more parallel layouts and
reports `{measurement: loss}` per rank (None on ranks that are not the last pipeline
stage). Scenario "tp2" must run first: it writes the checkpoints the others load.

Losses come from megatron's `get_forward_backward_func` schedule, so pipeline stages
exchange activations as in training. megatron.core is imported inside functions: saving a
dist checkpoint spawns a helper process that re-imports this file, and should not pay
for megatron.core again.
"""

import argparse
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from distributed.harness import report_results

from megatron_lst.parallel import destroy_parallel, initialize_parallel

SEED = 1234
VOCAB_SIZE = 128
SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2


def block_spec(config):
    """The local (plain PyTorch) GPT layer, with norms that support sequence parallelism."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_lst.compat.norm import SequenceParallelTorchNorm

    layer = get_gpt_layer_local_spec()
    layer = replace(layer, submodules=replace(
        layer.submodules,
        input_layernorm=SequenceParallelTorchNorm,
        pre_mlp_layernorm=SequenceParallelTorchNorm,
    ))
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config),
        layer_norm=SequenceParallelTorchNorm,
    )


def build_model(sequence_parallel: bool):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_lst.models.config import CUDA_FUSIONS

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        # The full master weight is drawn from the CPU generator and sliced, so every
        # tensor-parallel layout starts from the same weights.
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        **dict.fromkeys(CUDA_FUSIONS, False),
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config),
        vocab_size=VOCAB_SIZE,
        max_sequence_length=SEQ_LENGTH,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
    )


def fixed_batch() -> dict[str, torch.Tensor]:
    """The same batch on every rank and layout (its own generator, not the global one)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB_SIZE, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=generator)
    return {
        "tokens": tokens[:, :-1],  # [b, s]
        "labels": tokens[:, 1:],  # [b, s]
        "loss_mask": (torch.rand(MICRO_BATCH_SIZE, SEQ_LENGTH, generator=generator) > 0.2).float(),
        "position_ids": torch.arange(SEQ_LENGTH).expand(MICRO_BATCH_SIZE, -1),
    }


def masked_mean_loss(loss_mask, output_tensor):
    losses = output_tensor.float()  # [b, s] per-token cross entropy
    loss = (losses * loss_mask).sum() / loss_mask.sum()
    return loss, {"loss": loss.detach()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output_tensor = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                          labels=batch["labels"])
    return output_tensor, partial(masked_mean_loss, batch["loss_mask"])


def run_schedule(model, forward_only: bool) -> float | None:
    """One micro-batch through the schedule; the loss on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([fixed_batch()]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH_SIZE,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return reduced[0]["loss"].item()


def evaluate(model) -> float | None:
    model.eval()
    with torch.no_grad():
        loss = run_schedule(model, forward_only=True)
    model.train()
    return loss


def load_checkpoint(model, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    state_dict = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state_dict)


def save_checkpoint(model, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def train_one_step(model):
    """Wrap in megatron DDP, take one distributed-optimizer step; returns the wrapped model."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp_model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-3, clip_grad=1.0,
                        use_distributed_optimizer=True, params_dtype=torch.float32),
        [ddp_model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    run_schedule(ddp_model, forward_only=False)
    update_successful, _, _ = optimizer.step()
    if not update_successful:
        raise RuntimeError("the distributed optimizer skipped its step")
    return ddp_model


def scenario_tp2(checkpoints: Path) -> dict:
    """TP=2: fresh-init loss; save it; sequence-parallel copy loaded from it, trained one
    step and saved."""
    initialize_parallel(tensor_model_parallel_size=2, seed=SEED)
    model = build_model(sequence_parallel=False)
    record = {"tp2.fresh": evaluate(model)}
    save_checkpoint(model, checkpoints / "init")
    model = build_model(sequence_parallel=True)
    load_checkpoint(model, checkpoints / "init")
    record["tp2_sp.loaded_init"] = evaluate(model)
    record["tp2_sp.trained"] = evaluate(train_one_step(model))
    save_checkpoint(model, checkpoints / "tp2_trained")
    destroy_parallel(keep_process_group=True)
    return record


def scenario_tp1_then_pp2(checkpoints: Path) -> dict:
    """On 2 processes: TP=1 (DP=2) fresh, loaded from the TP=2 init, trained one step, and
    loaded from the TP=2 trained checkpoint; then PP=2 loaded from the init and trained."""
    initialize_parallel(seed=SEED)
    model = build_model(sequence_parallel=False)
    record = {"tp1.fresh": evaluate(model)}
    load_checkpoint(model, checkpoints / "init")
    record["tp1.loaded_init"] = evaluate(model)
    record["tp1.trained"] = evaluate(train_one_step(model))
    model = build_model(sequence_parallel=False)
    load_checkpoint(model, checkpoints / "tp2_trained")
    record["tp1.loaded_tp2_trained"] = evaluate(model)
    destroy_parallel(keep_process_group=True)

    initialize_parallel(pipeline_model_parallel_size=2, seed=SEED)
    model = build_model(sequence_parallel=False)
    load_checkpoint(model, checkpoints / "init")
    record["pp2.loaded_init"] = evaluate(model)
    record["pp2.trained"] = evaluate(train_one_step(model))
    destroy_parallel(keep_process_group=True)
    return record


def scenario_tp2_pp2(checkpoints: Path) -> dict:
    """On 4 processes: TP=2 x PP=2 with sequence parallelism, loaded from the init, trained."""
    initialize_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                        seed=SEED)
    model = build_model(sequence_parallel=True)
    load_checkpoint(model, checkpoints / "init")
    record = {"tp2_pp2_sp.loaded_init": evaluate(model)}
    record["tp2_pp2_sp.trained"] = evaluate(train_one_step(model))
    destroy_parallel(keep_process_group=True)
    return record


SCENARIOS = {"tp2": scenario_tp2, "tp1_then_pp2": scenario_tp1_then_pp2,
             "tp2_pp2": scenario_tp2_pp2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    record = SCENARIOS[args.scenario](args.checkpoints)
    report_results(args.results, record)
    destroy_parallel()


# dist-checkpoint saving spawns writer processes, which re-import this file.
if __name__ == "__main__":
    main()
