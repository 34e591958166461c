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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.process import alive, free_port_block, spawn, stop

_WORKER_PORTS = 48  # worker processes per node; each needs one port
_NODE_ATTEMPTS = 2  # starts of one worker node before the cluster's start fails


@dataclass(frozen=True)
class RayNode:
    ip: str
    pid: int
    head: bool
    log: str
    args: tuple[str, ...] = ()  # its `ray start` command line (ports included): a restart
    # brings it back on the same addresses


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
        raw["nodes"] = tuple(RayNode(**(n | {"args": tuple(n.get("args", ()))}))
                             for n in raw["nodes"])
        return cls(**raw)

    def env(self) -> dict[str, str]:
        """Environment a driver needs to join this cluster (token auth, no usage stats)."""
        return ray_env(self.token_path)


# What Ray 2.60 binds to every interface whenever the node's IP is not 127.0.0.1 (the one
# address it rewrites to the machine's routable one, so the local stack cannot use it): the
# C++ gRPC servers and the dashboard agent's gRPC server pick the wildcard for any other IP,
# and the dashboard head serves Prometheus on it. No flag or variable binds them elsewhere.
# Every gRPC one checks the cluster's token (RAY_AUTH_MODE=token); the metrics one does not.
# The rest of the stack (S3, Prefect, Ray's runtime-env agent, dashboard and client server)
# listens on loopback, and the agents' and autoscaler's metrics servers are not started.
WILDCARD_LISTENERS = {
    "gcs": "the head's GCS gRPC (--port)",
    "raylet": "each node's node-manager and object-manager gRPC (--node-manager-port, "
              "--object-manager-port)",
    "agent": "each node's dashboard-agent gRPC (--dashboard-agent-grpc-port)",
    "worker": "each Ray worker process's core-worker gRPC (--min-worker-port..--max-worker-port)",
    "driver": "the driver's core-worker gRPC (a free port of the driver's choosing)",
    "metrics": "the dashboard head's Prometheus metrics (DASHBOARD_METRIC_PORT, default 44227, "
               "no auth)",
}


def _flag(args: tuple[str, ...], name: str) -> int | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return int(arg.split("=", 1)[1])
    return None


def wildcard_listener(cluster: LocalRayCluster, process: str, port: int) -> str | None:
    """Which `WILDCARD_LISTENERS` entry a socket listening on every interface is (process
    name, port), or None when it is none of them (a leak)."""
    dashboard_metrics = int(os.environ.get("DASHBOARD_METRIC_PORT", "44227"))
    for node in cluster.nodes:
        ports = {"raylet": {_flag(node.args, "node-manager-port"),
                            _flag(node.args, "object-manager-port")},
                 "agent": {_flag(node.args, "dashboard-agent-grpc-port")}}
        if node.head:
            ports["gcs"] = {_flag(node.args, "port")}
        low, high = _flag(node.args, "min-worker-port"), _flag(node.args, "max-worker-port")
        if process == "gcs_server" and port in ports.get("gcs", ()):
            return "gcs"
        if process == "raylet" and port in ports["raylet"]:
            return "raylet"
        if process == "ray::DashboardAgent" and port in ports["agent"]:
            return "agent"
        if process.startswith("ray::") and low is not None and high is not None \
                and low <= port <= high:
            return "worker"
        if node.head and port == dashboard_metrics and process.startswith("python"):
            return "metrics"
    return None


def ray_env(token_path: str) -> dict[str, str]:
    # no usage stats, and no metrics: each node's agent would serve Prometheus on 0.0.0.0
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0",
           # how long `ray start` waits for its raylet to register (default 30 s): a node
           # started on a machine busy training gives up too early otherwise
           "RAY_raylet_start_wait_time_s": "120"}
    if token_path:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    return env


def _node_ports(ip: str, head: bool) -> list[str]:
    """`ray start` flags pinning every port of one node (all on its own loopback address)."""
    taken: set[int] = set()
    base = free_port_block(ip, 8 + _WORKER_PORTS, taken)
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


def _start_node(args: list[str], env: dict[str, str], log: Path) -> int:
    """`ray start --block` in its own process group (stopped alone, outlives the CLI); its logs
    and sockets are the user's alone."""
    return spawn(args, env, log, umask=0o077)


def _stop_node(pid: int, timeout_s: float) -> None:
    """`ray start --block` shuts its node down on SIGTERM; SIGKILL whatever of its group is
    left after `timeout_s`."""
    stop(pid, timeout_s, term_group=False)


class NodeExited(TimeoutError):
    """A node's `ray start` ended before its raylet registered."""


def _wait_nodes(address: str, ips: set[str], env: dict[str, str], timeout_s: float,
                watch: int | None = None) -> None:
    """Block until the GCS lists a live node at every address in `ips` (asked in a child
    process: a driver without the right token would otherwise retry forever). `watch`: the
    pid of the node being waited for; its exit ends the wait at once (`NodeExited`)."""
    probe = (
        "import ray,sys;ray.init(address=sys.argv[1],_node_ip_address=sys.argv[2],"
        "logging_level='ERROR',log_to_driver=False);"
        "print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    head_ip = address.rsplit(":", 1)[0]
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe, address, head_ip], env=env, capture_output=True,
                text=True, timeout=max(5.0, min(60.0, deadline - time.monotonic())),
            )
            lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
            seen = set(lines[-1].split()) if lines else set()
        except subprocess.TimeoutExpired:
            seen = set()
        if ips <= seen:
            return
        if watch is not None and not alive(watch):
            raise NodeExited(f"Ray cluster at {address}: the node at {sorted(ips - seen)} "
                             f"exited before it registered")
        time.sleep(1.0)
    raise TimeoutError(f"Ray cluster at {address}: nodes {sorted(ips - seen)} not alive after "
                       f"{timeout_s}s")


def start_local_cluster(
    state_dir: Path,
    head_ip: str = "127.0.0.2",
    worker_ips: tuple[str, ...] = ("127.0.0.3",),
    cpus_per_node: int = 1,
    object_store_bytes: int = 256 * 1024**2,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    head_cpus: int | None = None,
) -> LocalRayCluster:
    """Start a head and one worker node per address in `worker_ips`, with token auth.

    `extra_env` reaches every node's processes (and so every task): the stack passes the S3
    settings this way, never through task parameters. `head_cpus` (default `cpus_per_node`):
    0 keeps every task off the head.
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
    env = _inherited() | (extra_env or {}) | ray_env(str(token_path))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = [
        f"--num-cpus={cpus_per_node}", "--num-gpus=0" if not _has_cuda() else "",
        f"--object-store-memory={object_store_bytes}", "--disable-usage-stats", "--block",
    ]
    common = [a for a in common if a]
    # no autoscaler monitor (a fixed cluster needs none; it would serve metrics on 0.0.0.0)
    head_common = common if head_cpus is None else \
        [f"--num-cpus={head_cpus}" if a.startswith("--num-cpus=") else a for a in common]
    head_args = [ray_bin, "start", "--head", f"--node-ip-address={head_ip}",
                 "--include-dashboard=false", "--no-monitor", f"--temp-dir={temp_dir}",
                 *head_common, *_node_ports(head_ip, head=True)]
    address = f"{head_ip}:{head_args[-2].split('=')[1]}"
    head_log = state_dir / "ray-head.log"
    nodes = [RayNode(head_ip, _start_node(head_args, env, head_log), True, str(head_log),
                     tuple(head_args))]
    cluster = LocalRayCluster(address, head_ip, str(token_path), temp_dir, tuple(nodes))
    try:
        _wait_nodes(address, {head_ip}, env, timeout_s, watch=nodes[0].pid)
        # one node at a time: raylets registering at once on a busy machine can take longer
        # than Ray's start wait (each node's `ray start` then gives up), and the wait is longer.
        # A node that does not register (its `ray start` exited, or the wait ran out: a port
        # of its block taken meanwhile, a machine too busy) is stopped and started once more
        # on a fresh port block; both starts write to the same log, the retry noted in it.
        for k, ip in enumerate(worker_ips):
            log = state_dir / f"ray-worker-{ip}.log"
            for attempt in range(_NODE_ATTEMPTS):
                args = [ray_bin, "start", f"--address={address}", f"--node-ip-address={ip}",
                        *common, *_node_ports(ip, head=False)]
                node = RayNode(ip, _start_node(args, env, log), False, str(log), tuple(args))
                cluster = LocalRayCluster(address, head_ip, str(token_path), temp_dir,
                                          (*nodes, node))
                try:
                    _wait_nodes(address, {head_ip, *worker_ips[:k + 1]}, env, timeout_s,
                                watch=node.pid)
                except TimeoutError as failure:
                    if attempt + 1 == _NODE_ATTEMPTS:
                        raise
                    _stop_node(node.pid, 30.0)
                    with open(log, "a") as out:
                        out.write(f"\n[recsqueeze] {failure}; starting it again on other "
                                  f"ports\n")
                    continue
                nodes.append(node)
                break
    except BaseException as failure:
        _keep_logs(temp_dir, state_dir / "ray-logs")
        stop_local_cluster(cluster)
        if isinstance(failure, TimeoutError):
            raise TimeoutError(f"{failure}; read {state_dir}/ray-*.log and Ray's own logs in "
                               f"{state_dir / 'ray-logs'}") from failure
        raise
    return cluster


def _keep_logs(temp_dir: str, into: Path) -> None:
    """Copy the Ray session's own logs (GCS, raylets, agents) out of its temp dir, which
    stopping removes, so that a start that failed can be read afterwards."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    if logs.is_dir():
        shutil.rmtree(into, ignore_errors=True)
        shutil.copytree(logs, into, ignore=shutil.ignore_patterns("*.sock", "events"),
                        dirs_exist_ok=True)


def _inherited() -> dict[str, str]:
    """The starting process's environment without its RECSQUEEZE_* settings: a node gets the
    stack's from `extra_env` (no key among them), never the keys or the store of whoever
    happened to start it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RECSQUEEZE_")}


def heal_cluster(cluster: LocalRayCluster, extra_env: dict[str, str] | None = None,
                 timeout_s: float = 120.0) -> tuple[LocalRayCluster, list[str]]:
    """Restart the nodes of `cluster` that died, each with its own command line (same
    address, same ports), and leave the living ones alone; return the cluster and the
    addresses restarted. A dead head takes the cluster's state with it (its GCS): then the
    whole cluster restarts, on the same ports, so the address clients know stays valid.
    """
    dead = [n for n in cluster.nodes if not alive(n.pid)]
    if not dead:
        return cluster, []
    if any(not n.args for n in dead):
        raise RuntimeError("this cluster was started by an older recsqueeze that did not record "
                           "its nodes' command lines: `recsqueeze down`, then `up`")
    if any(n.head for n in dead):
        for node in cluster.nodes:  # workers of a lost GCS cannot rejoin: restart them too
            _stop_node(node.pid, 30.0)
        dead = list(cluster.nodes)
    private = Path(cluster.temp_dir).parent
    private.mkdir(mode=0o700, exist_ok=True)
    env = _inherited() | (extra_env or {}) | ray_env(cluster.token_path)
    nodes = []
    for node in sorted(cluster.nodes, key=lambda n: not n.head):  # the head first
        if node in dead:
            node = RayNode(node.ip, _start_node(list(node.args), env, Path(node.log)), node.head,
                           node.log, node.args)
            if node.head:
                _wait_nodes(cluster.address, {node.ip}, env, timeout_s)
        nodes.append(node)
    healed = LocalRayCluster(cluster.address, cluster.head_ip, cluster.token_path,
                             cluster.temp_dir, tuple(nodes))
    _wait_nodes(cluster.address, {n.ip for n in nodes}, env, timeout_s)
    return healed, [n.ip for n in dead]


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
        _stop_node(node.pid, timeout_s)
    private = Path(cluster.temp_dir).parent
    if private.name.startswith("rsq-"):
        shutil.rmtree(private, ignore_errors=True)
