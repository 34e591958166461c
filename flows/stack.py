"""The local stack = S3 + Prefect server (infra) + a multi-node Ray cluster (cluster).

State lives in STATE/stack.json; `settings_for` turns it into Settings, with any RECSQUEEZE_*
environment variable taking precedence (that is how a user points at real services).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.local import LocalRayCluster, heal_cluster, start_local_cluster, stop_local_cluster
from infra.prefect_server import PrefectServer, restart_prefect, start_prefect
from infra.process import alive, spawn, stop
from infra.s3server import S3Server, credentials, credentials_path, restart_s3, start_s3
from infra.settings import CLIENT_ENV, QUIET_ENV, Settings

REPO = Path(__file__).resolve().parent.parent  # deployments' entrypoints are relative to it


@dataclass(frozen=True)
class Stack:
    state_dir: str
    s3: S3Server
    prefect: PrefectServer
    ray: LocalRayCluster
    deployments_pid: int | None = None  # `python -m flows.deployments`: serves the deployments

    def pids(self) -> list[int]:
        extra = [self.deployments_pid] if self.deployments_pid else []
        return [self.s3.pid, self.prefect.pid, *(n.pid for n in self.ray.nodes), *extra]

    def settings(self) -> Settings:
        """The stack's settings; the keys come from its credentials file."""
        return Settings(
            state_dir=Path(self.state_dir), s3_endpoint=self.s3.endpoint,
            s3_bucket=self.s3.bucket, prefect_api_url=self.prefect.api_url,
            ray_address=self.ray.address, ray_node_ip=self.ray.head_ip,
            ray_auth_token_path=self.ray.token_path,
            credentials_file=str(credentials_path(Path(self.state_dir))),
        )


def _stack_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def start_stack(state_dir: Path, head_ip: str = "127.0.0.2",
                worker_ips: tuple[str, ...] = ("127.0.0.3",), cpus_per_node: int = 1,
                well_known_ports: bool = False, serve_deployments: bool = True) -> Stack:
    """Start S3, Prefect and Ray (head + workers); stop what was started if any part fails.

    With `well_known_ports`, S3 and Prefect take 8333 and 4200 when those are free (the demo's
    stable UI address); tests leave it off and get free ports. `serve_deployments` also starts
    the process serving the `on-demand` and `nightly` deployments (flows/deployments.py).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(QUIET_ENV)
    s3 = start_s3(state_dir, port=8333 if well_known_ports else None)
    started: list[int] = [s3.pid]
    try:
        prefect = start_prefect(state_dir, port=4200 if well_known_ports else None)
        started.append(prefect.pid)
        ray = start_local_cluster(state_dir, head_ip, worker_ips, cpus_per_node,
                                  extra_env=node_env(state_dir, s3))
    except BaseException:
        for pid in started:
            stop(pid)
        raise
    stack = Stack(str(state_dir), s3, prefect, ray)
    _write(stack)
    if serve_deployments:
        stack = dataclasses.replace(stack, deployments_pid=_serve(stack))
        _write(stack)
    return stack


def node_env(state_dir: Path, s3: S3Server) -> dict[str, str]:
    """What every Ray node's processes get: where the store is, and where the keys are (the
    credentials file: no key is in their environment)."""
    return QUIET_ENV | CLIENT_ENV | {"RECSQUEEZE_S3_ENDPOINT": s3.endpoint, "RECSQUEEZE_S3_BUCKET": s3.bucket,
                        "RECSQUEEZE_CREDENTIALS_FILE": str(credentials_path(state_dir))}


def _serve(stack: Stack) -> int:
    """Start the process serving the deployments; its pid."""
    return spawn([sys.executable, "-m", "flows.deployments", "--state-dir", stack.state_dir],
                 os.environ | QUIET_ENV | {"PREFECT_API_URL": stack.prefect.api_url},
                 Path(stack.state_dir) / "deployments.log", cwd=REPO)


def heal_stack(stack: Stack) -> tuple[Stack, list[str]]:
    """Restart what of `stack` is down -- and only that -- on the same ports and data, so
    clients (a run in flight, the UI, the Ray workers) find it where it was. Returns the
    healed stack (saved) and the names of what was restarted."""
    state_dir = Path(stack.state_dir)
    os.environ.update(QUIET_ENV)
    up = stack_alive(stack)
    restarted: list[str] = []
    if not up["s3"]:
        stack = dataclasses.replace(stack, s3=restart_s3(state_dir, stack.s3))
        restarted.append("s3")
        _write(stack)
    if not up["prefect"]:
        stack = dataclasses.replace(stack, prefect=restart_prefect(state_dir, stack.prefect))
        restarted.append("prefect")
        _write(stack)
    ray, nodes = heal_cluster(stack.ray, node_env(state_dir, stack.s3))
    if nodes:
        stack = dataclasses.replace(stack, ray=ray)
        restarted += [f"ray {ip}" for ip in nodes]
        _write(stack)
    # (it exits when its Prefect server goes away: asked now, after Prefect is back)
    if stack.deployments_pid and not alive(stack.deployments_pid):
        stack = dataclasses.replace(stack, deployments_pid=_serve(stack))
        restarted.append("deployments")
        _write(stack)
    return stack, restarted


def _write(stack: Stack) -> None:
    """stack.json, without the keys (they stay in the credentials file alone)."""
    path = _stack_file(Path(stack.state_dir))
    raw = asdict(stack)
    raw["s3"] |= {"access_key": "", "secret_key": ""}
    path.write_text(json.dumps(raw, indent=2))
    os.chmod(path, 0o600)


def load_stack(state_dir: Path) -> Stack | None:
    path = _stack_file(state_dir.resolve())
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    access, secret = credentials(Path(raw["state_dir"]))
    raw["s3"] |= {"access_key": access, "secret_key": secret}
    return Stack(raw["state_dir"], S3Server(**raw["s3"]), PrefectServer(**raw["prefect"]),
                 LocalRayCluster.from_json(json.dumps(raw["ray"])), raw.get("deployments_pid"))


def stack_alive(stack: Stack) -> dict[str, bool]:
    served = {"deployments": alive(stack.deployments_pid)} if stack.deployments_pid else {}
    return {"s3": alive(stack.s3.pid), "prefect": alive(stack.prefect.pid), **served,
            **{f"ray {n.ip}": alive(n.pid) for n in stack.ray.nodes}}


def stop_stack(stack: Stack) -> None:
    if stack.deployments_pid:
        stop(stack.deployments_pid)
    stop_local_cluster(stack.ray)
    stop(stack.prefect.pid)
    stop(stack.s3.pid)
    _stack_file(Path(stack.state_dir)).unlink(missing_ok=True)


def settings_for(state_dir: Path) -> Settings:
    """Settings of the local stack at `state_dir`, overridden by RECSQUEEZE_* variables."""
    stack = load_stack(state_dir)
    if stack is None:
        return Settings()
    values = stack.settings().model_dump()
    for name in list(values):
        if f"RECSQUEEZE_{name.upper()}" in os.environ:
            values.pop(name)
    return Settings(**values)
