"""Sliding-window causal self-attention for the local models: token i attends
`[max(i - W + 1, document start of i), i]`.

`key_start [B, N]` (from `lst_kernels.sliding_window_key_starts`) carries the document cut of
packed rows; None means one document per row (`max(i - W + 1, 0)`). Backends:
- "flash": flash-attn's windowed kernel (`window_size=(W-1, 0)`), CUDA with fp16/bf16 only; with
  documents, its variable-length interface with the documents of all rows as the sequences.
- "sdpa": PyTorch. Rows no longer than the window and without documents use the plain causal
  kernel. Otherwise, on CPU: `sliding_window_cpu` (per query chunk, a causal block and a masked
  earlier block merged by log-sum-exp, about W + 64 scores per query). Elsewhere: range attention
  (`lst_kernels.patch_cross_attention` with keys `[key_start[i], i + 1)` and the model's kernel
  backend: the Triton kernel on CUDA under "auto"): no mask tensor and no copy of the keys. Work
  and memory are O(N * W), never O(N^2).
Grouped key/value heads go into every backend as they are, never repeated to one per query head:
flash-attn's and the range kernel's GQA, SDPA's `enable_gqa`, the CPU flash kernel's GQA (on a
PyTorch whose CPU kernel lacks it, `sliding_window_cpu` repeats them).
"auto" picks flash when it imports (`optional_imports`: a build for another torch or CUDA is
installed but does not import) and the inputs are CUDA fp16/bf16 with heads of at most 256
channels on an Ampere or newer GPU, else sdpa; the choice is logged once per distinct outcome.
The global block's packed-document attention (`global_attention.py`) makes the same choice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lst_kernels import patch_cross_attention

from .optional_imports import import_failure
from .sliding_window_cpu import sliding_window_attention_cpu

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "sdpa")
# flash-attn 2's kernels take heads of at most 256 channels.
FLASH_ATTN_MAX_HEAD_DIM = 256
# ... and run on Ampere (compute capability 8.0) and newer GPUs.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def flash_attn_failure() -> str | None:
    """None when flash-attn's two functions import; else why not (see `optional_imports`)."""
    return import_failure("flash_attn", "flash_attn_func", "flash_attn_varlen_func")


def flash_attn_available() -> bool:
    return flash_attn_failure() is None


@functools.cache
def _log_choice(attention: str, backend: str, reason: str) -> None:
    logger.info("%s backend: %s (%s)", attention, backend, reason)


def resolve_local_attention_backend(requested: str, q: torch.Tensor,
                                    attention: str = "local sliding-window attention",
                                    log_choice: bool = True) -> str:
    """"flash" or "sdpa" for inputs like `q`; raise when an explicit choice cannot run.
    `attention` names the caller in the log line of an "auto" choice; a caller whose "sdpa"
    runs something else logs what runs itself (`log_choice=False`)."""
    if requested not in BACKENDS:
        raise ValueError(f"{attention} backend {requested!r} is not one of {BACKENDS}")
    head_dim = q.shape[-1]
    inputs_ok = (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                 and head_dim <= FLASH_ATTN_MAX_HEAD_DIM)
    # flash-attn 2 refuses GPUs before Ampere at the first call
    capability = torch.cuda.get_device_capability(q.device) if inputs_ok else None
    inputs_ok = inputs_ok and capability >= FLASH_ATTN_MIN_CAPABILITY
    # Only CUDA inputs import flash-attn: CPU runs never pay for (or warn about) it.
    failure = flash_attn_failure() if inputs_ok or requested == "flash" else None
    flash_ok = inputs_ok and failure is None
    gpu = "" if capability is None else f", compute capability {capability[0]}.{capability[1]}"
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            f"{attention} backend 'flash' needs flash-attn installed and CUDA fp16/bf16 inputs "
            f"with heads of at most {FLASH_ATTN_MAX_HEAD_DIM} on a GPU of compute capability "
            f"{'.'.join(map(str, FLASH_ATTN_MIN_CAPABILITY))} or newer (got device {q.device}"
            f"{gpu}, dtype {q.dtype}, head dim {head_dim}"
            + (f"; flash-attn is {failure}" if failure else "") + "); use 'auto' or 'sdpa'"
        )
    if requested == "auto":
        requested = "flash" if flash_ok else "sdpa"
        if log_choice:
            _log_choice(attention, requested, "flash-attn" if flash_ok else
                        f"PyTorch, device {q.device.type}{gpu}, {q.dtype}"
                        + (f", flash-attn {failure}" if failure else ""))
    return requested


class AttentionBackendChoice:
    """`resolve_local_attention_backend(requested, q, attention)` for inputs like `q`, kept per
    device, dtype and head size (on CUDA it asks the GPU's compute capability, not work for every
    forward)."""

    def __init__(self, requested: str, attention: str = "local sliding-window attention",
                 log_choice: bool = True):
        if requested not in BACKENDS:
            raise ValueError(f"{attention} backend {requested!r} is not one of {BACKENDS}")
        self.requested = requested
        self.attention = attention
        self.log_choice = log_choice
        self._resolved: dict[tuple[torch.device, torch.dtype, int], str] = {}

    def __call__(self, q: torch.Tensor) -> str:
        key = (q.device, q.dtype, q.shape[-1])
        if key not in self._resolved:
            self._resolved[key] = resolve_local_attention_backend(self.requested, q,
                                                                  self.attention, self.log_choice)
        return self._resolved[key]


class SlidingWindowAttention(torch.nn.Module):
    """Core attention (no parameters): q `[B, N, H, d]`, k and v `[B, N, G, d]` (G divides H:
    query head h reads key/value head `h // (H / G)`) (+ optional key_start `[B, N]`)
    -> `[B, N, H, d]`, scale 1/sqrt(d). Every backend reads the G heads as they are (no copy;
    the CPU path copies them on a PyTorch whose CPU flash kernel lacks GQA).
    `kernel_backend` ("auto" | "triton" | "torch", see `lst_kernels.backend`) runs the range
    attention off CPU."""

    def __init__(self, window: int, backend: str = "auto", kernel_backend: str = "auto"):
        super().__init__()
        if window < 1:
            raise ValueError(f"sliding window must be >= 1 token, got {window}")
        self.window = window
        self.kernel_backend = kernel_backend
        self._backend_for = AttentionBackendChoice(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_start: torch.Tensor | None = None,
                sequences: Callable[[], VarlenSequences] | None = None) -> torch.Tensor:
        """`sequences`: gives the documents of `key_start` as flash-attn's varlen sequences,
        called only on the flash path (`RowDocuments.varlen_sequences`: found once per batch,
        not per layer); without it the flash path finds them from `key_start`."""
        if self._backend_for(q) == "flash":
            found = sequences() if sequences is not None and key_start is not None else None
            return flash_sliding_window(q, k, v, self.window, key_start, found)
        return sliding_window_sdpa(q, k, v, self.window, key_start, self.kernel_backend)


@dataclass(frozen=True)
class VarlenSequences:
    """The documents of a batch as `flash_attn_varlen_func` takes them: the B rows of N tokens
    flattened to B*N, cut at every document start."""

    cu_seqlens: torch.Tensor
    """`[docs + 1]` int32: the first flat position of every document, then B*N."""
    max_len: int
    """The longest document's length (flash-attn sizes its grid by it)."""

    @classmethod
    def of(cls, starts_sequence: torch.Tensor) -> VarlenSequences:
        """From `starts_sequence [B, N]` bool (true where a document starts: at least position
        0 of every row). One host sync for both the document count and the longest document
        (flash-attn's interface takes them on the host)."""
        batch, num_tokens = starts_sequence.shape
        positions = torch.arange(num_tokens, device=starts_sequence.device)  # [N]
        start = torch.where(starts_sequence, positions, 0).cummax(dim=1).values  # [B, N]
        num_docs, max_len = torch.stack(
            [starts_sequence.sum(), (positions - start).max() + 1]).tolist()
        # The flat positions of the starts, in order, without another host sync (a stable sort
        # puts the starts first; torch.nonzero_static runs on CUDA only from torch 2.6).
        not_start = (~starts_sequence.flatten()).to(torch.uint8)  # [B*N]
        flat_starts = torch.argsort(not_start, stable=True)[:num_docs]  # [docs]
        total = flat_starts.new_full((1,), batch * num_tokens)
        return cls(torch.cat([flat_starts, total]).int(), max_len)  # row b's at b*N + i

    @classmethod
    def of_key_starts(cls, key_start: torch.Tensor) -> VarlenSequences:
        """From the first key of every query, `key_start [B, N]` int, causal within documents:
        `key_start[i] == i` exactly where a document starts (at least at position 0)."""
        positions = torch.arange(key_start.shape[1], device=key_start.device)  # [N]
        return cls.of(key_start.long() == positions)


def flash_sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         key_start: torch.Tensor | None = None,
                         sequences: VarlenSequences | None = None) -> torch.Tensor:
    """flash-attn on q `[B, N, H, d]`, k and v `[B, N, G, d]`; with `key_start`, every document
    of every row is one sequence of `flash_attn_varlen_func` (its window then never crosses a
    document start): `sequences` when given (the documents of `key_start`), else found from
    `key_start`."""
    from flash_attn import flash_attn_func

    if key_start is None:
        return flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
    if sequences is None:
        # key_start[i] == i exactly at a document start (or everywhere when W == 1, where
        # cutting the row into one-token sequences changes nothing).
        sequences = VarlenSequences.of_key_starts(key_start)
    return flash_document_attention(q, k, v, sequences, window)


def flash_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             sequences: VarlenSequences, window: int | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """`flash_attn_varlen_func` on q `[B, N, H, d]`, k and v `[B, N, G, d]` (G heads as they
    are) -> `[B, N, H, d]`: causal attention within every document of `sequences` (the rows
    flattened), over the last `window` keys when given; scale 1/sqrt(d) unless given."""
    from flash_attn import flash_attn_varlen_func

    batch, num_tokens = q.shape[:2]
    cu_seqlens, max_len = sequences.cu_seqlens, sequences.max_len
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens, max_len, max_len,
        softmax_scale=scale, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )  # [B*N, H, d]
    return out.unflatten(0, (batch, num_tokens))


def sliding_window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                        key_start: torch.Tensor | None = None,
                        kernel_backend: str = "auto") -> torch.Tensor:
    """PyTorch sliding-window causal attention: q `[B, N, H, d]`, k and v `[B, N, G, d]` (G divides
    H) -> `[B, N, H, d]` (see module docstring); off CPU, range attention on `kernel_backend`."""
    if q.shape[1] <= window and key_start is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=k.shape[2] != q.shape[2],
        )  # [B, H, N, d]
        return out.transpose(1, 2)
    if q.device.type == "cpu":
        return sliding_window_attention_cpu(q, k, v, window, key_start)
    return range_sliding_window(q, k, v, window, key_start, kernel_backend)


@functools.lru_cache(maxsize=16)
def causal_key_end(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """`[B, S]` int64 (a read-only expanded view): query i sees keys up to i, `key_end = i + 1`.
    One tensor per shape and device, the same object for every layer: the range kernel then
    prepares the ranges once for all layers (`lst_kernels.last_call`). Never an inference tensor,
    even when first made under torch.inference_mode: those it would prepare again every call."""
    with torch.inference_mode(False):
        return torch.arange(1, length + 1, device=device).expand(batch, length)


@functools.lru_cache(maxsize=16)
def window_key_start(batch: int, length: int, window: int, device: torch.device) -> torch.Tensor:
    """`[B, S]` int64: the first key of a causal window of `window` keys, `max(i - W + 1, 0)`;
    one tensor per shape, window and device, as `causal_key_end`."""
    with torch.inference_mode(False):
        return (causal_key_end(batch, length, device) - window).clamp(min=0)


def range_sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         key_start: torch.Tensor | None = None,
                         kernel_backend: str = "auto") -> torch.Tensor:
    """Range attention, any device: query i sees keys `[key_start[i], i + 1)`; q `[B, N, H, d]`,
    k and v `[B, N, G, d]` -> `[B, N, H, d]`. `kernel_backend`: `patch_cross_attention`'s backend."""
    batch, num_tokens = q.shape[:2]
    key_end = causal_key_end(batch, num_tokens, q.device)  # [B, N]
    if key_start is None:
        key_start = window_key_start(batch, num_tokens, window, q.device)
    return patch_cross_attention(q, k, v, key_start, key_end, backend=kernel_backend)
