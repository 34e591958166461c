"""A local multi-node Ray cluster: one head and N worker nodes, each its own ``ray start``.

Ray rewrites ``127.0.0.1``/``localhost`` to the machine's routable address and then talks to
that address, so every node gets another loopback address (127.0.0.2 for the head, .3, .4 … for
workers), which Ray leaves alone. Every port is chosen explicitly so two clusters (the demo's
and a test session's) never collide, and every node runs ``ray start --block`` in its own
process session: sending it SIGTERM tears down exactly that node's processes and nothing else
(``ray stop`` would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_WORKER_PORTS = 48  # worker processes per node; each needs one port


@dataclass(frozen=True)
class RayNode:
    ip: str
    pid: int
    head: bool
    log: str


@dataclass(frozen=True)
class LocalRayCluster:
    """What `start_local_cluster` started; enough to connect to it and to stop it."""

    address: str  # head GCS host:port
    head_ip: str
    token_path: str
    temp_dir: str
    nodes: tuple[RayNode, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LocalRayCluster:
        raw = json.loads(text)
        raw["nodes"] = tuple(RayNode(**n) for n in raw["nodes"])
        return cls(**raw)

    def env(self) -> dict[str, str]:
        """Environment a driver needs to join this cluster (token auth, no usage stats)."""
        return ray_env(self.token_path)


def ray_env(token_path: str) -> dict[str, str]:
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if token_path:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    return env


def _port_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def _free_block(ip: str, count: int, taken: set[int]) -> int:
    """First port of `count` consecutive free ports on `ip` (random start, 20000-59999)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        ports = range(base, base + count)
        if not taken.intersection(ports) and all(_port_free(ip, p) for p in ports):
            taken.update(ports)
            return base
    raise RuntimeError(f"no block of {count} free ports on {ip}")


def _node_ports(ip: str, head: bool) -> list[str]:
    """`ray start` flags pinning every port of one node (all on its own loopback address)."""
    taken: set[int] = set()
    base = _free_block(ip, 8 + _WORKER_PORTS, taken)
    args = [
        f"--node-manager-port={base}",
        f"--object-manager-port={base + 1}",
        f"--metrics-export-port={base + 2}",
        f"--dashboard-agent-listen-port={base + 3}",
        f"--dashboard-agent-grpc-port={base + 4}",
        f"--runtime-env-agent-port={base + 5}",
        f"--min-worker-port={base + 8}",
        f"--max-worker-port={base + 8 + _WORKER_PORTS - 1}",
    ]
    if head:
        args += [f"--port={base + 6}", f"--ray-client-server-port={base + 7}"]
    return args


def _spawn(args: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped alone, outlives the CLI
            umask=0o077,  # its logs and sockets are the user's alone
        )
    return proc.pid


def _wait_nodes(address: str, count: int, env: dict[str, str], timeout_s: float) -> None:
    """Block until `count` nodes are alive (asked in a child process: a driver without the
    right token would otherwise retry forever)."""
    probe = (
        "import ray,sys;ray.init(address=sys.argv[1],_node_ip_address=sys.argv[2],"
        "logging_level='ERROR',log_to_driver=False);"
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    head_ip = address.rsplit(":", 1)[0]
    alive = -1
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe, address, head_ip], env=env, capture_output=True,
                text=True, timeout=max(5.0, min(60.0, deadline - time.monotonic())),
            )
            alive = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            alive = -1
        if alive >= count:
            return
        time.sleep(1.0)
    raise TimeoutError(f"Ray cluster at {address}: {alive} of {count} nodes alive after {timeout_s}s")


def start_local_cluster(
    state_dir: Path,
    head_ip: str = "127.0.0.2",
    worker_ips: tuple[str, ...] = ("127.0.0.3",),
    cpus_per_node: int = 1,
    object_store_bytes: int = 256 * 1024**2,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> LocalRayCluster:
    """Start a head and one worker node per address in `worker_ips`, with token auth.

    `extra_env` reaches every node's processes (and so every task): the stack passes the S3
    settings this way, never through task parameters.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / "ray-token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
    os.chmod(token_path, 0o600)
    # Ray's socket paths must stay under 107 bytes: keep its temp dir short. It lives inside a
    # mode-0700 directory (Ray makes its temp dir and some below it 0777: behind the 0700 one
    # nobody else reaches them), its files are created under umask 077, and
    # `stop_local_cluster` removes the whole directory.
    temp_dir = f"{tempfile.mkdtemp(prefix='rsq-', dir='/tmp')}/r"
    env = os.environ | (extra_env or {}) | ray_env(str(token_path))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = [
        f"--num-cpus={cpus_per_node}", "--num-gpus=0" if not _has_cuda() else "",
        f"--object-store-memory={object_store_bytes}", "--disable-usage-stats", "--block",
    ]
    common = [a for a in common if a]
    head_args = [ray_bin, "start", "--head", f"--node-ip-address={head_ip}",
                 "--include-dashboard=false", f"--temp-dir={temp_dir}", *common,
                 *_node_ports(head_ip, head=True)]
    address = f"{head_ip}:{head_args[-2].split('=')[1]}"
    head_log = state_dir / "ray-head.log"
    nodes = [RayNode(head_ip, _spawn(head_args, env, head_log), True, str(head_log))]
    cluster = LocalRayCluster(address, head_ip, str(token_path), temp_dir, tuple(nodes))
    try:
        _wait_nodes(address, 1, env, timeout_s)
        for ip in worker_ips:
            args = [ray_bin, "start", f"--address={address}", f"--node-ip-address={ip}",
                    *common, *_node_ports(ip, head=False)]
            log = state_dir / f"ray-worker-{ip}.log"
            nodes.append(RayNode(ip, _spawn(args, env, log), False, str(log)))
        cluster = LocalRayCluster(address, head_ip, str(token_path), temp_dir, tuple(nodes))
        _wait_nodes(address, 1 + len(worker_ips), env, timeout_s)
    except BaseException:
        stop_local_cluster(cluster)
        raise
    return cluster


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def stop_local_cluster(cluster: LocalRayCluster, timeout_s: float = 30.0) -> None:
    """Stop the nodes this cluster started (workers first), and only those; then remove its
    temp dir (logs, sockets, spilled objects)."""
    for node in sorted(cluster.nodes, key=lambda n: n.head):
        _stop_group(node.pid, timeout_s)
    private = Path(cluster.temp_dir).parent
    if private.name.startswith("rsq-"):
        shutil.rmtree(private, ignore_errors=True)


def _stop_group(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever of its group is left
    except (ProcessLookupError, PermissionError):
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
