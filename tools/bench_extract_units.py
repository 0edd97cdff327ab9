"""Units per second per core of HuBERT unit extraction on CPU, tiny and base-size models.

    python tools/bench_extract_units.py [--seconds 30] [--threads 1]

Builds each architecture from its config with random weights (the speed does not depend on the
weights; nothing is downloaded), saves it as a model directory, and times
`HubertFeatures.batch` + nearest-centroid assignment (500 random centroids) on generated 16 kHz
audio cut into 5-second utterances, after one warm-up batch. `base` is `HubertConfig()`'s
defaults (HuBERT base: 12 layers of 768, 320x downsampling), quantised at layer 6 as the textless
units are; `tiny` is the 2-layer model of the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
ARCHITECTURES = {"tiny": (TINY, 2), "base": ({}, 6)}
"""name -> (HubertConfig overrides, layer quantised)."""


def bench(name: str, seconds: float, batch_size: int, workdir: Path) -> dict:
    import torch

    from megatron_lst.audio.hubert import HubertFeatures, load_transformers
    from megatron_lst.demo_corpus.units import KMeansCodebook

    transformers = load_transformers()
    overrides, layer = ARCHITECTURES[name]
    torch.manual_seed(0)
    model_dir = workdir / name
    transformers.HubertModel(transformers.HubertConfig(**overrides)).save_pretrained(model_dir)
    features = HubertFeatures(model_dir, layer)
    rng = np.random.default_rng(0)
    codebook = KMeansCodebook(rng.standard_normal((500, features.dim)).astype(np.float32))
    waves = [(0.1 * rng.standard_normal(5 * 16000)).astype(np.float32)
             for _ in range(max(1, round(seconds / 5)))]
    batches = [waves[i:i + batch_size] for i in range(0, len(waves), batch_size)]
    for array in features.batch(batches[0]):  # warm-up
        codebook.assign(array)
    start = time.perf_counter()
    units = 0
    for batch in batches:
        units += sum(len(codebook.assign(array)) for array in features.batch(batch))
    wall = time.perf_counter() - start
    threads = torch.get_num_threads()
    return {"model": name, "layer": layer, "audio_s": len(waves) * 5.0, "units": units,
            "wall_s": wall, "threads": threads, "units_per_s_per_core": units / wall / threads,
            "realtime_per_core": len(waves) * 5.0 / wall / threads}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHITECTURES),
                        default=["tiny", "base"])
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (cores)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows.append(bench(name, args.seconds, args.batch_size, Path(workdir)))
    print(f"{'model':<6} {'layer':>5} {'audio s':>8} {'units':>7} {'wall s':>7} {'threads':>7} "
          f"{'units/s/core':>12} {'x realtime/core':>15}")
    for r in rows:
        print(f"{r['model']:<6} {r['layer']:>5} {r['audio_s']:>8.0f} {r['units']:>7} "
              f"{r['wall_s']:>7.2f} {r['threads']:>7} {r['units_per_s_per_core']:>12,.0f} "
              f"{r['realtime_per_core']:>15.1f}")
    return rows


if __name__ == "__main__":
    main()
