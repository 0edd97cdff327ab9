"""Training-step cost of document masking (--reset-attention-mask) on packed rows.

For each token count N it builds two LST models with the same weights, one masking documents and
one attending across them, and times full training steps (forward, backward, Adam) of both on the
same rows, alternating between them so a busy host slows both alike. The rows are those of
`bench_model.py` (speech-heavy, static p=4, about N/3.1 patches) with EOS placed at text tokens so
that they pack documents of ragged lengths (`--document-tokens` on average). Reported: the median
step time of each (wall clock and process CPU time), the masked/unmasked ratio (the target is
within 5%), and the process's peak resident memory growth over the idle models after the masked
steps, per token, which stays flat when memory is linear in N (no [N, N], [N, P] or [P, P]
tensor). Each N runs in a fresh process.

    python tools/bench_document_masking.py                     # medium, N = 1024 and 4096
    python tools/bench_document_masking.py --tokens 1024 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import VOCAB_SIZE, speech_heavy_batch  # noqa: E402

EOS_ID = 2  # the joint vocabulary's EOS (text tokenizer id 2)


@dataclass
class Result:
    preset: str
    tokens_per_row: int
    patches_per_row: int
    documents_per_row: float
    batch: int
    masked_seconds: float  # median wall-clock step
    unmasked_seconds: float
    masked_cpu_seconds: float  # median process CPU time per step
    unmasked_cpu_seconds: float
    masked_step_peak_mb: float  # peak RSS after the masked steps minus the idle models'

    @property
    def ratio(self) -> float:
        return self.masked_seconds / self.unmasked_seconds

    @property
    def cpu_ratio(self) -> float:
        return self.masked_cpu_seconds / self.unmasked_cpu_seconds


def packed_rows(batch: int, num_tokens: int, patch_size: int, document_tokens: int, seed: int):
    """`bench_model.speech_heavy_batch` rows with EOS at text tokens (patches of one token) about
    every `document_tokens` tokens: packed documents of ragged lengths, patches never spanning
    two of them."""
    import torch

    rows = speech_heavy_batch(batch, num_tokens, patch_size, seed)
    tokens = rows["tokens"].clone()
    tokens[tokens == EOS_ID] = EOS_ID + 1  # no EOS but the ones placed here
    generator = torch.Generator().manual_seed(seed + 1)
    starts = rows["patch_lengths"].long().cumsum(1) - rows["patch_lengths"].long()  # [B, P]
    for b in range(batch):
        single = starts[b][(rows["patch_lengths"][b] == 1) & (starts[b] < num_tokens - 1)]
        next_end = 0
        for position in single.tolist():
            if position >= next_end + int(torch.randint(document_tokens // 2, 3 * document_tokens // 2,
                                                         (1,), generator=generator)):
                tokens[b, position] = EOS_ID
                next_end = position
    rows["tokens"] = tokens
    rows["labels"] = torch.cat([tokens[:, 1:], rows["labels"][:, -1:]], 1)
    return rows


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(preset_name: str, num_tokens: int, args) -> Result:
    import dataclasses

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from megatron_lst.models import LSTModel, preset
    from megatron_lst.models.config import DocumentMaskingConfig
    from megatron_lst.models.loss import masked_token_mean
    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=0)
    plain = preset(preset_name, VOCAB_SIZE)
    masked = dataclasses.replace(plain, documents=DocumentMaskingConfig(eos_id=EOS_ID))
    batch = packed_rows(args.batch_size, num_tokens, args.patch_size, args.document_tokens, seed=0)
    models, optimizers = {}, {}
    for name, config in (("masked", masked), ("unmasked", plain)):
        torch.manual_seed(0)
        models[name] = LSTModel(config, config.transformer_config(), transformer_impl="local")
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-4)

    def step(name):
        optimizers[name].zero_grad(set_to_none=True)
        per_token = models[name](batch["tokens"], batch["patch_lengths"], labels=batch["labels"])
        masked_token_mean(per_token, batch["loss_mask"]).backward()
        optimizers[name].step()

    idle_rss = _rss_mb()
    for _ in range(args.warmup):
        step("masked")
    masked_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - idle_rss
    for _ in range(args.warmup):
        step("unmasked")
    times = {"masked": [], "unmasked": []}
    cpu_times = {"masked": [], "unmasked": []}
    for i in range(2 * args.steps):
        name = ("masked", "unmasked")[i % 2] if (i // 2) % 2 == 0 else ("unmasked", "masked")[i % 2]
        start, cpu_start = time.perf_counter(), time.process_time()
        step(name)
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
    destroy_parallel()
    documents = float((batch["tokens"] == EOS_ID).sum(1).float().mean()) + 1
    return Result(
        preset=preset_name, tokens_per_row=num_tokens,
        patches_per_row=int((batch["patch_lengths"] > 0).sum(1).max()),
        documents_per_row=documents, batch=args.batch_size,
        masked_seconds=statistics.median(times["masked"]),
        unmasked_seconds=statistics.median(times["unmasked"]),
        masked_cpu_seconds=statistics.median(cpu_times["masked"]),
        unmasked_cpu_seconds=statistics.median(cpu_times["unmasked"]),
        masked_step_peak_mb=masked_peak,
    )


def _child(queue, preset_name, num_tokens, args):
    queue.put(measure(preset_name, num_tokens, args))


def run_isolated(preset_name: str, num_tokens: int, args) -> Result:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, preset_name, num_tokens, args))
    process.start()
    result = queue.get()
    process.join()
    return result


HEADER = (f"{'preset':<8} {'N':>5} {'P':>5} {'docs':>5} {'masked s':>9} {'plain s':>8} "
          f"{'ratio':>6} {'masked cpu s':>12} {'plain cpu s':>11} {'cpu ratio':>9} "
          f"{'peak MB':>8} {'KB/token':>8}")


def report_row(r: Result) -> str:
    per_token = 1024 * r.masked_step_peak_mb / (r.batch * r.tokens_per_row)
    return (f"{r.preset:<8} {r.tokens_per_row:>5} {r.patches_per_row:>5} "
            f"{r.documents_per_row:>5.1f} {r.masked_seconds:>9.3f} {r.unmasked_seconds:>8.3f} "
            f"{r.ratio:>6.3f} {r.masked_cpu_seconds:>12.3f} {r.unmasked_cpu_seconds:>11.3f} "
            f"{r.cpu_ratio:>9.3f} {r.masked_step_peak_mb:>8.0f} {per_token:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["medium"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--document-tokens", type=int, default=300,
                        help="Mean document length in tokens (uniform in [0.5, 1.5] of it).")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps of each model.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=str, default=None, help="Also write the results here.")
    args = parser.parse_args()
    print(HEADER, flush=True)
    results = []
    for preset_name in args.presets:
        for num_tokens in args.tokens:
            results.append(run_isolated(preset_name, num_tokens, args))
            print(report_row(results[-1]), flush=True)
    if args.json:
        from megatron_lst.checkpoint.durable_files import replace_file_durably

        replace_file_durably(args.json, json.dumps(
            [asdict(r) | {"ratio": r.ratio, "cpu_ratio": r.cpu_ratio} for r in results], indent=1))


if __name__ == "__main__":
    main()
