"""Scratch files and folders a tool writes before renaming them into place, named after their
writer (`writer_tag`: its process id and host), so that a later run of the same tool can tell the
scratch of a writer that was killed (SIGKILL, a lost node: no cleanup ran) from a live one's and
remove it (`remove_stale_scratch`). A writer is gone when it ran on this host (and process-id
namespace) and its process is not alive; scratch of another host or container is never touched
(its process ids mean nothing here).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# What a tag may hold: a process id, "@", a host name (no "/" and no "@").
WRITER_TAG_PATTERN = r"(?P<pid>[0-9]+)@(?P<host>[^/@]+)"


def this_host() -> str:
    """The host name, with the process-id namespace where there is one (Linux: containers that
    share the host's name, `docker --network host`, have their own process ids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}~{namespace}"


def writer_tag() -> str:
    """"<pid>@<host>" of this process (`this_host`), to put in the name of its scratch."""
    return f"{os.getpid()}@{this_host()}"


def writer_is_gone(pid: int, host: str | None) -> bool:
    """Whether the writer `pid` on `host` (None: this host, for names without a host) is known
    to have ended: it ran on this host, and no process of that id is alive here."""
    if host is not None and host != this_host():
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: a process of that id, another user's, is alive
        return False
    return False


def remove_stale_scratch(candidates: Iterable[Path], pattern: str, what: str,
                         where: str | Path) -> list[Path]:
    """Remove each of `candidates` whose name matches `pattern` (a regular expression of the
    whole name, with a `pid` and an optional `host` group) and whose writer is gone; says what
    it removed in one log line (`what`: the kind of scratch, `where`: its folder). Returns the
    paths removed. A path that vanished meanwhile, or cannot be removed, is left as it is."""
    compiled = re.compile(pattern)
    removed = []
    for path in candidates:
        match = compiled.fullmatch(path.name)
        if match is None:
            continue
        host = match.groupdict().get("host")
        if not writer_is_gone(int(match["pid"]), host):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("%s: cannot remove the stale %s (%s); remove it by hand", path, what,
                           error.strerror or error)
            continue
        removed.append(path)
    if removed:
        names = [str(path.relative_to(where)) if path.is_relative_to(where) else str(path)
                 for path in removed[:5]]
        logger.warning("removed %d stale %s of killed writers in %s: %s", len(removed), what,
                       where, ", ".join(names)
                       + (f" and {len(removed) - 5} more" if len(removed) > 5 else ""))
    return removed
