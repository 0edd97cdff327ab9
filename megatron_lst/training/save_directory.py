"""The `--save` directory of a run: writable before any work, and written by one run at a time.

`check_writable(path)` (flag validation, every rank) creates the directory and writes, syncs and
removes a small probe file in it. A read-only filesystem, a directory without write permission
or a full disk is refused there, naming the directory and the error; it used to fail with a
traceback while rank 0 cached the datasets' row indices under `--save`, or, for a directory the
index cache did not touch, only at the first checkpoint, after training up to it.

`checkpoint_bytes_lower_bound` and `check_room_for_checkpoint` (once the model and optimizer are
built) refuse a `--save` whose filesystem has less free space than one checkpoint of this model
and optimizer takes at least (a full disk that still holds a few files would otherwise fail the
first save, after training up to it), and one whose free space cannot be measured (a mount that
went away or a permission taken away since the flags were checked).

`SaveDirectoryLock` (rank 0, for the whole run) holds a POSIX record lock on
`<save>/lst_train.lock` and writes who holds it into the file. A second run started on the same
`--save` while one trains would interleave its `metrics.jsonl` lines with the first's and race
it to the same `iter_XXXXXXX` names; it is refused before any work, naming the holder. The lock
is the kernel's and belongs to the process: it goes when that process ends, however it ends
(SIGKILL included), so a restarted job takes it again at once, and the processes a trainer forks
(data-loader workers, checkpoint writers) do not inherit it. A lock held from another host is
waited for a while before refusing (a network filesystem keeps a crashed node's lock until its
lease runs out). Nothing is locked on a filesystem without POSIX locks (a warning says so).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from megatron_lst.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILENAME = "lst_train.lock"


class SaveDirectoryError(ValueError):
    """`--save` names a directory this run cannot write."""


class SaveDirectoryLockError(CheckpointError):
    """The lock of the `--save` directory cannot be taken: its lock file cannot be opened, or
    another run holds it (`SaveDirectoryBusyError`)."""


class SaveDirectoryBusyError(SaveDirectoryLockError):
    """Another run holds the lock of the `--save` directory."""


def check_writable(path: str | os.PathLike, flag: str = "--save",
                   contents: str = "checkpoints, metrics.jsonl and the row-index cache") -> None:
    """Create `path` if missing and write, sync and remove a probe file in it; SaveDirectoryError
    naming `flag`, the directory, what goes there (`contents`) and the OS error otherwise."""
    directory = Path(path)
    probe = directory / (f".lst_write_probe-{socket.gethostname()}-{os.getpid()}-"
                         f"{secrets.token_hex(4)}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"lst-train write probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise SaveDirectoryError(
            f"{flag} {path} cannot be written ({_describe(error)}): {contents} go there. Give "
            f"a writable directory with free space") from None


def _describe(error: OSError) -> str:
    reason = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
              errno.EDQUOT: "disk quota exceeded"}.get(error.errno)
    where = f" at {error.filename}" if error.filename else ""
    return f"{reason or error.strerror or error}{where}"


class InsufficientSpaceError(CheckpointError):
    """The `--save` filesystem cannot hold one checkpoint, or its free space cannot be
    measured."""


def checkpoint_bytes_lower_bound(model_chunks, optimizer: str, sgd_momentum: float,
                                 mixed_precision: bool) -> int:
    """Collective: bytes of the tensors one checkpoint holds, summed over ranks, each parameter
    counted once: weights in their dtype, plus the optimizer's fp32 state (Adam's two moments,
    SGD's momentum buffer, and with --bf16/--fp16 the fp32 main copy). Files add their metadata,
    so a checkpoint is at least this large."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from megatron_lst.parallel import collective_device

    state_words = {"adam": 2, "sgd": 1 if sgd_momentum > 0 else 0}[optimizer]
    state_words += 1 if mixed_precision else 0
    total = 0
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for chunk in unwrap_model(list(model_chunks)):
            for param in chunk.parameters():
                # A pipeline replica (`shared`) and the copies of a parameter every
                # tensor-parallel rank holds whole are stored once.
                if getattr(param, "shared", False) or (
                        tp_rank > 0 and not getattr(param, "tensor_model_parallel", False)):
                    continue
                total += param.numel() * (param.element_size() + 4 * state_words)
    count = torch.tensor([total], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(count)
    return int(count.item())


def check_room_for_checkpoint(save_dir: str | os.PathLike, needed_bytes: int) -> None:
    """InsufficientSpaceError unless the filesystem of `save_dir` has `needed_bytes` free (also
    when its free space cannot be measured: the first save would fail there too)."""
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError as error:
        raise InsufficientSpaceError(
            f"--save {save_dir}: the free space of its filesystem cannot be measured "
            f"({_describe(error)}), so a checkpoint could not be saved there either. Check that "
            f"the directory is still there and readable (a mount that went away, a permission "
            f"taken away), or give another --save") from None
    if free < needed_bytes:
        raise InsufficientSpaceError(
            f"--save {save_dir} has {free / 2**20:.1f} MiB free on its filesystem, less than one "
            f"checkpoint of this model and optimizer takes (at least "
            f"{needed_bytes / 2**20:.1f} MiB): the first save would fail after training up to "
            f"it. Make room there or give another --save")


REMOTE_HOLDER_WAIT_SECONDS = 150.0
"""How long a lock held from another host is waited for before refusing: a network filesystem
keeps the lock of a crashed client until its lease runs out (90 s for NFSv4 by default), and a
job restarted on other nodes would otherwise be refused by its own dead predecessor."""


class SaveDirectoryLock:
    """Context manager: hold the lock of `save_dir` (see the module docstring) or raise
    SaveDirectoryBusyError naming the run that holds it (SaveDirectoryLockError when its lock
    file cannot be opened). A holder on this host is alive (the
    kernel frees a dead process's lock): refused at once. A holder on another host may be a
    crashed node whose lock the file server has not yet dropped: waited for up to
    `remote_wait_seconds` first."""

    def __init__(self, save_dir: str | os.PathLike,
                 remote_wait_seconds: float = REMOTE_HOLDER_WAIT_SECONDS):
        self.path = Path(save_dir) / LOCK_FILENAME
        self.remote_wait_seconds = remote_wait_seconds
        self._fd: int | None = None

    def __enter__(self) -> SaveDirectoryLock:
        fd = self._open()
        deadline = None
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    logger.warning("cannot lock %s (%s): nothing stops another run from writing "
                                   "the same --save directory", self.path, error.strerror)
                    return self
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if deadline is None and _holder_host(holder) not in (None, socket.gethostname()):
                logger.warning("%s is held by %s; waiting up to %.0f s in case that is a crashed "
                               "node whose lock the file server still keeps", self.path, holder,
                               self.remote_wait_seconds)
                deadline = time.monotonic() + self.remote_wait_seconds
            if deadline is None or time.monotonic() >= deadline:
                os.close(fd)
                raise SaveDirectoryBusyError(
                    f"--save {self.path.parent} is being written by another run (holder: "
                    f"{holder or 'not recorded'}; lock file {self.path}): two runs on one save "
                    f"directory would mix their metrics and race to the same checkpoint names. "
                    f"Wait for that run to end or stop it, or give this run another --save")
            time.sleep(1.0)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode(), 0)
        except OSError as error:  # a full disk: the lock is held, only its note is missing
            logger.warning("cannot record this run as the holder of %s (%s); the directory is "
                           "locked all the same", self.path, error.strerror or error)
        return self

    def _open(self) -> int:
        """The lock file's descriptor; SaveDirectoryLockError naming it when it cannot be opened
        (a directory or another file of that name in its place)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise SaveDirectoryLockError(
                f"--save {self.path.parent}: its lock file {self.path} cannot be opened "
                f"({_describe(error)}); lst-train keeps it there while it writes the directory. "
                f"Remove what is in its place, or give another --save") from None

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def _holder_host(holder: str) -> str | None:
    """The host a lock file's record names, None when it names none."""
    match = re.search(r" on host (\S+), started ", holder)
    return match.group(1) if match else None
