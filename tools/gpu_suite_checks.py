"""The GPU suite's own checks (tools/gpu_suite.py runs them; each prints a table, writes JSON, and
exits non-zero on a failed check).

    python tools/gpu_suite_checks.py provenance --megatron-core 0.16.1 --prefix VENV --json P
    python tools/gpu_suite_checks.py correctness --device cuda --fixtures DIR --json P

provenance   megatron-core is the pinned version and is imported from the suite's fresh
             environment (not from the machine's site-packages); megatron_lst and lst_kernels come
             from this checkout; torch and triton are the machine's.
correctness  (1) one LST forward and backward with the Triton kernels against the same model with
             the PyTorch kernels: logits, loss and every parameter gradient, in fp32 and, on CUDA,
             in bf16; the same in fp32 on rows packing four documents with document masking
             (`--reset-attention-mask`), and on those rows, with the Triton kernels, the logits
             after each row's first document end must not move when that first document's tokens
             change; (2) the reference LST's logits from the fixtures, in fp32, with the kernel
             backend the device gets by default (Triton on CUDA). On CPU (1) runs the Triton
             kernels under the Triton interpreter (TRITON_INTERPRET=1 must be set before the
             process starts), in fp32 only: the interpreter computes half-precision `tl.dot`
             wrongly; (2) runs the PyTorch kernels there.

Tolerances (relative errors are ||got - want|| / ||want|| per tensor):
- fp32, Triton vs PyTorch kernels: <= 1e-4. Both compute the same fp32 function (the kernels'
  dots run at full fp32 precision, no TF32) and differ only in summation order, which leaves
  ~1e-6 after a dozen layers; a wrong mask, patch id or softmax scale moves whole rows, >= 1e-2.
- bf16: the Triton model's error against the fp32 model (same weights, PyTorch kernels) must not
  exceed 2x the PyTorch-kernel bf16 model's error plus 1e-3: bf16 rounding (8-bit mantissa,
  ~4e-3 per operation) dominates both, and the kernels accumulate in fp32, so a correct kernel
  adds no error of its own; a bf16-only bug (an overflow, a lost cast) shows as a multiple.
- packed documents: as fp32 above; a later document's logits move by at most 1e-5 of the largest
  logit (summation order only: shapes and ranges are unchanged) where a leak moves them by far more.
- reference logits, fp32: max |difference| <= 1e-4, as tests/models/test_reference_parity.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
REFERENCE_INPUTS = ("static", "aligned", "ragged")


# --- provenance ------------------------------------------------------------------------------

def _origin(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"provenance: {module} is not importable")
    return Path(spec.origin).resolve()


def provenance(expected_megatron_core: str, prefix: Path) -> dict:
    """Where each package comes from; raises SystemExit when the environment is not the one the
    suite installed."""
    from importlib.metadata import version

    prefix = prefix.resolve()
    report = {
        "python": sys.version.split()[0], "executable": sys.executable,
        "megatron-core": version("megatron-core"),
        "paths": {m: str(_origin(m)) for m in ("megatron.core", "megatron_lst", "lst_kernels",
                                                "torch")},
    }
    problems = []
    if report["megatron-core"] != expected_megatron_core:
        problems.append(f"megatron-core {report['megatron-core']} is installed, the suite pins "
                        f"{expected_megatron_core}")
    if not _origin("megatron.core").is_relative_to(prefix):
        problems.append(f"megatron.core comes from {_origin('megatron.core')}, not from the "
                        f"suite's environment {prefix}")
    for module in ("megatron_lst", "lst_kernels"):
        if not _origin(module).is_relative_to(CHECKOUT):
            problems.append(f"{module} comes from {_origin(module)}, not from {CHECKOUT}")
    if _origin("torch").is_relative_to(prefix):
        problems.append("torch was installed into the suite's environment: the machine's torch "
                        "must be used")
    report["problems"] = problems
    return report


# --- correctness -----------------------------------------------------------------------------

def relative_error(got, want) -> float:
    import torch

    want = want.detach().double()
    return float(torch.linalg.vector_norm(got.detach().double() - want)
                 / torch.linalg.vector_norm(want).clamp(min=1e-12))


def _build(config, device, dtype, kernel_backend: str, local_attention_backend: str = "auto"):
    from megatron_lst.models import LSTModel

    model = LSTModel(config, config.transformer_config(), transformer_impl="local",
                     local_attention_backend=local_attention_backend,
                     kernel_backend=kernel_backend)
    return model.to(device=device, dtype=dtype)  # megatron builds its part on the GPU, ours on CPU


def _forward_backward(model, batch) -> dict:
    """Logits, mean token loss and every parameter's gradient of one forward and backward."""
    import torch

    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], batch["patch_lengths"])  # [B, N, V]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             batch["labels"].flatten())
    loss.backward()
    tensors = {"logits": logits.float(), "loss": loss}
    for name, param in model.named_parameters():
        if param.grad is None:
            raise SystemExit(f"correctness: {name} got no gradient")
        tensors[f"grad {name}"] = param.grad.float()
    return tensors


PACKED_EOS = 2  # the end-of-document id of the packed rows (any id of the vocabulary)


def packed_documents(batch: dict, documents_per_row: int, seed: int) -> dict:
    """`batch` with each row cut into `documents_per_row` documents: EOS on the last token of
    `documents_per_row - 1` random single-token patches (an EOS always ends a patch, as the
    patchers guarantee); no other token is EOS. Tokens and labels stay the row's two views."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # [B, N + 1]
    tokens = torch.where(tokens == PACKED_EOS, PACKED_EOS + 1, tokens)
    lengths = batch["patch_lengths"]  # [B, P], summing to N + 1 per row
    ends = lengths.cumsum(dim=1) - 1  # [B, P] last row position of each patch
    num_inputs = batch["tokens"].shape[1]
    for row in range(tokens.shape[0]):
        candidates = ((lengths[row] == 1) & (ends[row] > 0) & (ends[row] < num_inputs - 1))
        candidates = candidates.nonzero().flatten()
        if len(candidates) < documents_per_row - 1:
            raise ValueError(f"row {row} has {len(candidates)} single-token patches, too few "
                             f"for {documents_per_row} documents")
        chosen = candidates[torch.randperm(len(candidates), generator=generator)]
        tokens[row, ends[row, chosen[: documents_per_row - 1]]] = PACKED_EOS
    return {**batch, "tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def check_document_isolation(model, batch, backend: str) -> dict:
    """Change every token of each row's first document (not its EOS): the logits after that EOS
    must not move. `backend` names the model's kernels in the report."""
    import torch

    tokens = batch["tokens"]
    first_end = (tokens == PACKED_EOS).int().argmax(dim=1)  # [B] each row's first EOS
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    first_document = positions[None, :] < first_end[:, None]  # [B, N]
    others = model.lst_config.vocab_size - PACKED_EOS - 1  # ids above EOS
    changed = torch.where(first_document, (tokens + 7) % others + PACKED_EOS + 1, tokens)
    later = positions[None, :] > first_end[:, None]
    with torch.no_grad():
        before = model(tokens, batch["patch_lengths"]).float()  # [B, N, V]
        after = model(changed, batch["patch_lengths"]).float()
    change = (after - before).abs() / before.abs().max()  # [B, N, V], of the largest logit
    moved, changed_first = (float(change[where].max()) for where in (later, first_document))
    return {"check": f"packed documents: later logits unchanged by the first ({backend})",
            "relative_error": moved, "limit": 1e-5, "ok": moved <= 1e-5 and changed_first > 1e-3,
            "first_document_moved": changed_first}


def _within(check: str, worst_tensor: str, error: float, limit: float) -> dict:
    """One check of the report: the worst tensor's relative error against its limit."""
    return {"check": check, "worst_tensor": worst_tensor, "relative_error": error,
            "limit": limit, "ok": error <= limit}


def compare_kernel_backends(device: str, tiny: bool) -> dict:
    """LST with Triton vs PyTorch kernels, fp32 (and bf16 on CUDA): worst relative errors."""
    import dataclasses

    import torch
    from bench_model import speech_heavy_batch

    from megatron_lst.models import preset
    from megatron_lst.models.config import DocumentMaskingConfig

    vocab = 1020
    if tiny:  # CPU: Triton runs interpreted, a few hundred tokens at most
        config, batch_size, num_tokens = preset("tiny", vocab), 2, 96
    else:  # the paper-1b local modules and kernels (windows 512, k=2, 16 heads of 64); 2 of the
        # 25 global layers, which use no LST kernel
        config = preset("paper-1b", vocab)
        config = dataclasses.replace(
            config, global_model=dataclasses.replace(config.global_model, num_layers=2))
        batch_size, num_tokens = 2, 4096
    batch = {k: v.to(device) for k, v in speech_heavy_batch(batch_size, num_tokens, 4, seed=0)
             .items() if v is not None and k in ("tokens", "labels", "patch_lengths")}
    torch.manual_seed(0)
    reference = _build(config, device, torch.float32, "torch")
    weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in reference.state_dict().items()}
    want = _forward_backward(reference, batch)
    report = {"shape": {"preset": "tiny" if tiny else "paper-1b (2 global layers)",
                        "batch": batch_size, "tokens": num_tokens,
                        "patches": int((batch["patch_lengths"] > 0).sum(1).max())},
              "checks": []}

    def worst(got: dict, ref: dict) -> tuple[str, float]:
        errors = {name: relative_error(got[name], ref[name]) for name in ref}
        name = max(errors, key=errors.get)
        return name, errors[name]

    triton_fp32 = _build(config, device, torch.float32, "triton")
    triton_fp32.load_state_dict(weights)
    name, error = worst(_forward_backward(triton_fp32, batch), want)
    report["checks"].append(_within("fp32 triton vs torch kernels", name, error, 1e-4))
    del triton_fp32
    packed_config = dataclasses.replace(config, documents=DocumentMaskingConfig(PACKED_EOS))
    packed = packed_documents(batch, documents_per_row=4, seed=1)
    packed_models = {}
    for backend in ("torch", "triton"):
        packed_models[backend] = _build(packed_config, device, torch.float32, backend)
        packed_models[backend].load_state_dict(weights)
    name, error = worst(_forward_backward(packed_models["triton"], packed),
                        _forward_backward(packed_models["torch"], packed))
    report["checks"].append(
        _within("fp32 triton vs torch kernels, 4 packed documents per row", name, error, 1e-4))
    report["checks"].append(check_document_isolation(packed_models["triton"], packed, "triton"))
    del packed_models
    if device == "cuda":
        errors = {}
        for backend in ("torch", "triton"):
            model = _build(config, device, torch.bfloat16, backend)
            model.load_state_dict(weights)  # copied into the bf16 parameters
            got = _forward_backward(model, batch)
            errors[backend] = {n: relative_error(got[n], want[n]) for n in want}
            del model, got
        ratios = {n: (errors["triton"][n], 2 * errors["torch"][n] + 1e-3) for n in want}
        name = max(ratios, key=lambda n: ratios[n][0] / ratios[n][1])
        error, limit = ratios[name]
        report["checks"].append({
            **_within("bf16 triton kernels vs fp32, against 2x bf16 torch kernels + 1e-3", name,
                      error, limit),
            "torch_kernels_bf16_error": errors["torch"][name]})
    return report


def check_reference_logits(device: str, fixtures: Path) -> dict:
    """The reference LST's logits on the fixture inputs, fp32, the device's default kernels."""
    import numpy as np
    import torch
    from lst_kernels.backend import resolve_backend

    from megatron_lst.models.reference_config import lst_config_from_reference
    from megatron_lst.models.reference_tensors import load_reference_checkpoint

    config = lst_config_from_reference(
        json.loads((fixtures / "config_A.json").read_text())["model_args"])
    model = _build(config, "cpu", torch.float32, "auto", local_attention_backend="sdpa")
    load_reference_checkpoint(model, fixtures / "state_dict_A.safetensors")
    model = model.to(device).eval()
    checks = []
    for inputs in REFERENCE_INPUTS:
        data = json.loads((fixtures / f"inputs_{inputs}.json").read_text())
        tokens = torch.tensor(data["tokens"], device=device)
        patch_lengths = torch.tensor(data["patch_lengths"], dtype=torch.int32, device=device)
        expected = torch.from_numpy(np.load(fixtures / f"logits_A_{inputs}.npy"))
        with torch.no_grad():
            logits = model(tokens, patch_lengths).cpu()
        error = (logits - expected).abs().max().item() if logits.shape == expected.shape \
            else float("inf")
        checks.append({"check": f"reference logits ({inputs})", "max_abs_error": error,
                       "limit": 1e-4, "ok": error <= 1e-4})
    return {"kernel_backend": resolve_backend("auto", torch.empty(0, device=device)),
            "checks": checks}


def correctness(device: str, fixtures: Path | None, tiny: bool) -> dict:
    import torch
    from lst_kernels.backend import interpret_requested

    from megatron_lst.parallel import destroy_parallel, initialize_parallel

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("correctness: --device cuda but torch sees no GPU")
    if device == "cpu" and not interpret_requested():
        raise SystemExit("correctness: on CPU the Triton kernels need TRITON_INTERPRET=1 set "
                         "before this process starts")
    initialize_parallel(seed=1234)
    try:
        report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "backends": compare_kernel_backends(device, tiny)}
        if fixtures is None:
            report["reference"] = {"skipped": "no --fixtures given"}
        else:
            report["reference"] = check_reference_logits(device, fixtures)
    finally:
        destroy_parallel()
    return report


def _all_checks(report: dict) -> list[dict]:
    return [c for part in ("backends", "reference") for c in report[part].get("checks", [])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provenance")
    prov.add_argument("--megatron-core", required=True, help="the pinned version")
    prov.add_argument("--prefix", type=Path, required=True, help="the suite's environment")
    prov.add_argument("--json", type=Path, required=True)
    corr = commands.add_parser("correctness")
    corr.add_argument("--device", choices=["cuda", "cpu"], required=True)
    corr.add_argument("--fixtures", type=Path,
                      help="the reference_lst fixture folder (config_A.json, state_dict_A, ...)")
    corr.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    corr.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "provenance":
        report = provenance(args.megatron_core, args.prefix)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 1 if report["problems"] else 0
    if args.fixtures is not None and not (args.fixtures / "config_A.json").is_file():
        parser.error(f"--fixtures {args.fixtures} holds no config_A.json: copy the reference_lst "
                     "fixture folder there (benchmarks/README.md)")
    report = correctness(args.device, args.fixtures, args.tiny)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    for check in _all_checks(report):
        error = check.get("relative_error", check.get("max_abs_error"))
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']:<70} {error:.3g} "
              f"(limit {check['limit']:.3g}) {check.get('worst_tensor', '')}")
    return 0 if all(c["ok"] for c in _all_checks(report)) else 1


if __name__ == "__main__":
    sys.exit(main())
