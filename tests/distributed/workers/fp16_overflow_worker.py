"""Worker for test_virtual_pipeline_fp16.py: `pretrain` runs of real `lst-train` flags recording
every iteration's loss, loss scale, skip, and which of this rank's model chunks the step changed;
one iteration's gradients can be made to overflow in one global layer.

    fp16_overflow_worker.py --training-run "FLAGS" [--training-run "FLAGS" ...]
        [--overflow-at ITERATION --overflow-layer LAYER_NUMBER] --results FILE

`--overflow-at` puts an infinity into the gradient buffer (`main_grad`) of the first parameter of
global transformer layer `--overflow-layer` (megatron's 1-based `layer_number`, the same under
any pipeline layout) after that iteration's backward pass and gradient reduction, before the
optimizer step: the overflow starts on the one rank and chunk holding that layer. Reports per
rank the list of runs: {"losses", "loss_scales", "skipped", "chunks_changed" (per iteration, a
bool per model chunk of this rank)}, iterations as string keys.

dist-checkpoint saving spawns a helper that re-imports this file: everything heavy is imported
under the __main__ guard only.
"""


def main() -> None:
    import argparse
    import os
    import shlex

    import torch
    from distributed.harness import init_gloo, report_results
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_lst.training import loop
    from megatron_lst.training.arguments import parse_args, validate_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--training-run", action="append", required=True)
    parser.add_argument("--overflow-at", type=int)
    parser.add_argument("--overflow-layer", type=int)
    parser.add_argument("--results", required=True)
    own = parser.parse_args()

    def poison(model: list[torch.nn.Module]) -> None:
        for chunk in model:
            for module in chunk.modules():
                if (isinstance(module, TransformerLayer)
                        and module.layer_number == own.overflow_layer):
                    next(module.parameters()).main_grad.view(-1)[0] = float("inf")

    def chunk_weights(model: list[torch.nn.Module]) -> list[list[torch.Tensor]]:
        return [[p.detach().clone() for p in chunk.parameters()] for chunk in model]

    record: dict = {}
    train_step = loop.train_step

    def recording_train_step(state, data_iterator):
        iteration = state.iteration + 1  # the loop counts it after the step
        before = chunk_weights(state.model)
        optimizer_step = state.optimizer.step
        if iteration == own.overflow_at:
            def overflowing_step():
                poison(state.model)
                return optimizer_step()
            state.optimizer.step = overflowing_step
        try:
            step = train_step(state, data_iterator)
        finally:
            state.optimizer.__dict__.pop("step", None)
        after = chunk_weights(state.model)
        record["losses"][str(iteration)] = step.loss
        record["loss_scales"][str(iteration)] = step.loss_scale
        record["skipped"][str(iteration)] = step.skipped
        record["chunks_changed"][str(iteration)] = [
            any(not torch.equal(b, a) for b, a in zip(old, new, strict=True))
            for old, new in zip(before, after, strict=True)]
        return step

    loop.train_step = recording_train_step  # _train looks it up at each iteration
    init_gloo()
    runs = []
    for flags in own.training_run:
        record = {"losses": {}, "loss_scales": {}, "skipped": {}, "chunks_changed": {}}
        args = validate_args(parse_args(shlex.split(flags)), int(os.environ.get("WORLD_SIZE", 1)))
        loop.pretrain(args)
        runs.append(record)
    report_results(own.results, runs)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
