"""Two "nodes" on one machine for multi-node tests, and the torchrun agents that run on them.

`two_nodes()` makes two Linux network namespaces joined by a veth pair, 10.213.0.1 and 10.213.0.2
(addresses that exist only inside those namespaces), or, where namespaces cannot be made (not
root, no `ip`), two "nodes" on loopback, with the reason. `launch_agent` starts one torchrun agent
per node with a c10d rendezvous on the first node, as a multi-node job does. Every process of a
job carries a marker in its environment (`LST_TEST_JOB`): `processes_of(marker)` finds what is
still running, and leaving the `two_nodes()` block kills all of it and removes the namespaces,
whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER_VARIABLE = "LST_TEST_JOB"
RENDEZVOUS_PORT = 29400
"""The c10d rendezvous port inside fresh namespaces (nothing else listens there)."""


@dataclass(frozen=True)
class Node:
    address: str
    interface: str
    """The interface gloo uses (GLOO_SOCKET_IFNAME)."""
    command_prefix: tuple[str, ...] = ()
    """Runs a command on this node (`ip netns exec NAME`)."""


@dataclass
class TwoNodes:
    nodes: tuple[Node, Node]
    rendezvous_port: int
    loopback_reason: str | None
    """Why the nodes share loopback instead of namespaces; None with namespaces."""
    markers: list[str] = field(default_factory=list)
    """The jobs launched on these nodes, killed on leaving `two_nodes()`."""

    def new_job(self) -> str:
        marker = uuid.uuid4().hex
        self.markers.append(marker)
        return marker


@contextlib.contextmanager
def two_nodes() -> Iterator[TwoNodes]:
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
    namespaces = (f"lst-{tag}-a", f"lst-{tag}-b")
    reason = _make_namespaces(namespaces, tag)
    if reason is None:
        nodes = tuple(Node(f"10.213.0.{i + 1}", f"lst{tag}{'ab'[i]}",
                           ("ip", "netns", "exec", name)) for i, name in enumerate(namespaces))
        port = RENDEZVOUS_PORT
    else:
        from megatron_lst.parallel import free_local_port

        nodes = (Node("127.0.0.1", "lo"), Node("127.0.0.1", "lo"))
        port = free_local_port()
    pair = TwoNodes(nodes, port, reason)
    try:
        yield pair
    finally:
        for marker in pair.markers:
            for pid in processes_of(marker):
                _kill(pid)
        if reason is None:
            _remove_namespaces(namespaces)


def _make_namespaces(names: Sequence[str], tag: str) -> str | None:
    """Make the namespaces and their link; None on success, else why not (nothing is left)."""
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    a, b = names
    veth_a, veth_b = f"lst{tag}a", f"lst{tag}b"
    steps = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b],
        ["ip", "link", "set", veth_a, "netns", a], ["ip", "link", "set", veth_b, "netns", b],
    ]
    for namespace, veth, address in ((a, veth_a, "10.213.0.1/24"), (b, veth_b, "10.213.0.2/24")):
        steps += [["ip", "-n", namespace, "addr", "add", address, "dev", veth],
                  ["ip", "-n", namespace, "link", "set", veth, "up"],
                  ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            _remove_namespaces(names)
            subprocess.run(["ip", "link", "del", veth_a], capture_output=True)
            return f"`{' '.join(step)}` failed: {done.stderr.strip() or done.returncode}"
    return None


def _remove_namespaces(names: Sequence[str]) -> None:
    for name in names:
        listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in listed.stdout.split():
            _kill(int(pid))
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth along


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def processes_of(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (zombies excluded)."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().split(") ")[1][0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_until_gone(marker: str, seconds: float) -> list[int]:
    """Wait for every process of the job to end; returns those still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := processes_of(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def launch_agent(pair: TwoNodes, node_rank: int, marker: str, script_args: Sequence[str],
                 log_path: Path, max_restarts: int = 0,
                 ignore_sigterm: bool = False) -> subprocess.Popen:
    """One torchrun agent on node `node_rank` of `pair` running `pretrain_lst.py script_args`,
    one worker, rendezvous on node 0. `ignore_sigterm`: launched as
    examples/pretrain_lst_slurm.sbatch launches its agents, which leave SIGTERM to the workers."""
    node, host = pair.nodes[node_rank], pair.nodes[0]
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host.address}:{pair.rendezvous_port}",
        "--rdzv-id", marker, "--rdzv-conf", f"is_host={int(node_rank == 0)}",
        "--local-addr", node.address, "--max-restarts", str(max_restarts),
        "--monitor-interval", "0.5", str(REPO_ROOT / "pretrain_lst.py"), *script_args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=node.interface,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{MARKER_VARIABLE: marker})
    if ignore_sigterm:
        torchrun = ["bash", "-c", 'trap "" TERM; exec "$@"', "agent", *torchrun]
        torchrun.insert(torchrun.index("--nnodes"), "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT")
    with open(log_path, "w") as log:
        return subprocess.Popen([*node.command_prefix, *torchrun], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)


def worker_of(agent: subprocess.Popen) -> int | None:
    """The pid of the training worker the agent runs now, if any."""
    pids = [agent.pid]
    while pids:  # breadth-first below the agent (a bash wrapper may stand in between)
        pid = pids.pop(0)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pretrain_lst.py" in cmdline and b"torch.distributed.run" not in cmdline:
                return child
            pids.append(child)
    return None
