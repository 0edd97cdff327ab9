"""Worker for test_reference_files.py: saves a state dict the way the reference implementation's
FSDP training does, `torch.distributed.checkpoint.save({"model": ..., "optim": ...})` with every
tensor a DTensor sharded by rows over the ranks, so each rank writes its own `__{rank}_0.distcp`.

Launched by `distributed.harness.run_distributed` with `--state FILE` (a safetensors state dict,
the full tensors) and `--save DIR`; reports the number of rows each rank held of the first tensor.
"""

import argparse

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed.harness import init_gloo, report_results
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    init_gloo()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {name: distribute_tensor(tensor, mesh, [Shard(0)])
             for name, tensor in sorted(load_file(args.state).items())}
    optim = {"param_groups": [{"lr": 4e-4, "betas": (0.9, 0.95), "params": sorted(state)}]}
    dcp.save({"model": state, "optim": optim}, checkpoint_id=args.save)
    first = next(iter(state.values()))
    report_results(args.results, first.to_local().shape[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
