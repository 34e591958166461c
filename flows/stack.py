"""The local stack = S3 + Prefect server (infra) + a multi-node Ray cluster (cluster).

State lives in STATE/stack.json; `settings_for` turns it into Settings, with any RECSQUEEZE_*
environment variable taking precedence (that is how a user points at real services).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.local import LocalRayCluster, heal_cluster, start_local_cluster, stop_local_cluster
from infra.postgres import PostgresServer, restart_postgres, start_postgres
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
    deployments_pid: int | None = None  # serves the deployments, or the pool's worker
    work_pool: str | None = None  # None: `python -m flows.deployments` serves them; else the
    # `process` work pool they are registered in, and deployments_pid is its worker
    postgres: PostgresServer | None = None  # Prefect's database; None: SQLite

    def pids(self) -> list[int]:
        extra = [self.deployments_pid] if self.deployments_pid else []
        db = [self.postgres.pid] if self.postgres else []
        return [self.s3.pid, *db, self.prefect.pid, *(n.pid for n in self.ray.nodes), *extra]

    def database_url(self) -> str | None:
        return self.postgres.url(Path(self.state_dir)) if self.postgres else None

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
                well_known_ports: bool = False, serve_deployments: bool = True,
                work_pool: str | None = None, db: str = "sqlite",
                service_ip: str = "127.0.0.1", head_cpus: int | None = None,
                env: Mapping[str, str] | None = None) -> Stack:
    """Start S3, Prefect and Ray (head + workers); stop what was started if any part fails.

    With `well_known_ports`, S3 and Prefect take 8333 and 4200 when those are free (the demo's
    stable UI address); tests leave it off and get free ports. `serve_deployments` also starts
    the process serving the `on-demand` and `nightly` deployments (flows/deployments.py); with
    `work_pool`, they are registered in that `process` work pool instead and a Prefect worker
    polling it runs their flow runs. `db="postgres"` puts the Prefect server on a local
    PostgreSQL under the state dir (infra/postgres.py) instead of SQLite. `service_ip` is
    where S3 and Prefect listen (a test's veth address: nodes on other hosts reach them
    there); `head_cpus=0` keeps every task off the Ray head. `env` is what the deployments'
    process inherits (default: this process's environment, where `RECSQUEEZE_NIGHTLY_CRON`
    and the like come from): a second stack beside a configured process passes it without
    the RECSQUEEZE_* variables, so that its runs find the stack by its state dir alone.
    This process's own environment is never rewritten wholesale (another thread may be
    reading it: glibc's setenv/unsetenv under a concurrent getenv can crash the process).
    """
    if db not in ("sqlite", "postgres"):
        raise ValueError(f"db must be 'sqlite' or 'postgres' (got {db!r})")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _quiet_environ()
    s3 = start_s3(state_dir, port=8333 if well_known_ports else None, host=service_ip)
    started: list[int] = [s3.pid]
    postgres = None
    try:
        if db == "postgres":
            postgres = start_postgres(state_dir)
            started.append(postgres.pid)
        prefect = start_prefect(state_dir, port=4200 if well_known_ports else None,
                                host=service_ip,
                                database_url=postgres.url(state_dir) if postgres else None)
        started.append(prefect.pid)
        ray = start_local_cluster(state_dir, head_ip, worker_ips, cpus_per_node,
                                  extra_env=node_env(state_dir, s3), head_cpus=head_cpus)
    except BaseException:
        for pid in reversed(started):
            stop(pid)
        raise
    stack = Stack(str(state_dir), s3, prefect, ray, work_pool=work_pool, postgres=postgres)
    _write(stack)
    if serve_deployments:
        try:
            if work_pool:
                _register(stack, env)
            stack = dataclasses.replace(stack, deployments_pid=_serve(stack, env))
        except BaseException:
            stop_stack(stack)
            raise
        _write(stack)
    return stack


def node_env(state_dir: Path, s3: S3Server) -> dict[str, str]:
    """What every Ray node's processes get: where the store is, and where the keys are (the
    credentials file: no key is in their environment)."""
    return QUIET_ENV | CLIENT_ENV | {"RECSQUEEZE_S3_ENDPOINT": s3.endpoint, "RECSQUEEZE_S3_BUCKET": s3.bucket,
                        "RECSQUEEZE_CREDENTIALS_FILE": str(credentials_path(state_dir))}


def _quiet_environ() -> None:
    """QUIET_ENV in this process's environment, setting only what differs."""
    for name, value in QUIET_ENV.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _child_env(stack: Stack, env: Mapping[str, str] | None) -> dict[str, str]:
    base = os.environ if env is None else env
    return dict(base) | QUIET_ENV | {"PREFECT_API_URL": stack.prefect.api_url}


def _serve(stack: Stack, env: Mapping[str, str] | None = None) -> int:
    """Start the process that runs the deployments' flow runs (it serves them, or it is the
    work pool's worker), with `env` (default: this process's) under it; its pid."""
    env = _child_env(stack, env)
    log = Path(stack.state_dir) / "deployments.log"
    if stack.work_pool:
        worker = Path(sys.executable).with_name("prefect")
        return spawn([str(worker), "worker", "start", "--pool", stack.work_pool, "--type",
                      "process", "--name", f"recsqueeze-{Path(stack.state_dir).name}"],
                     env, log, cwd=REPO)
    return spawn([sys.executable, "-m", "flows.deployments", "--state-dir", stack.state_dir],
                 env, log, cwd=REPO)


def _register(stack: Stack, env: Mapping[str, str] | None = None) -> None:
    """Register the deployments in the stack's work pool (`flows.deployments --pool`)."""
    import subprocess

    assert stack.work_pool
    log = Path(stack.state_dir) / "register.log"
    with open(log, "ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "flows.deployments", "--state-dir", stack.state_dir,
             "--pool", stack.work_pool], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=300,
            env=_child_env(stack, env))
    if done.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"registering the deployments in work pool {stack.work_pool!r} "
                           f"failed (exit {done.returncode}; {log}):\n{tail}")


def heal_stack(stack: Stack) -> tuple[Stack, list[str]]:
    """Restart what of `stack` is down -- and only that -- on the same ports and data, so
    clients (a run in flight, the UI, the Ray workers) find it where it was. Returns the
    healed stack (saved) and the names of what was restarted."""
    state_dir = Path(stack.state_dir)
    _quiet_environ()
    up = stack_alive(stack)
    restarted: list[str] = []
    if not up["s3"]:
        stack = dataclasses.replace(stack, s3=restart_s3(state_dir, stack.s3))
        restarted.append("s3")
        _write(stack)
    if stack.postgres and not up["postgres"]:
        stack = dataclasses.replace(stack, postgres=restart_postgres(state_dir, stack.postgres))
        restarted.append("postgres")
        _write(stack)
    if not up["prefect"]:
        stack = dataclasses.replace(stack, prefect=restart_prefect(state_dir, stack.prefect,
                                                                   stack.database_url()))
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
                 LocalRayCluster.from_json(json.dumps(raw["ray"])), raw.get("deployments_pid"),
                 raw.get("work_pool"),
                 PostgresServer(**raw["postgres"]) if raw.get("postgres") else None)


def stack_alive(stack: Stack) -> dict[str, bool]:
    served = {"deployments": alive(stack.deployments_pid)} if stack.deployments_pid else {}
    db = {"postgres": alive(stack.postgres.pid)} if stack.postgres else {}
    return {"s3": alive(stack.s3.pid), **db, "prefect": alive(stack.prefect.pid), **served,
            **{f"ray {n.ip}": alive(n.pid) for n in stack.ray.nodes}}


def stop_stack(stack: Stack) -> None:
    if stack.deployments_pid:
        stop(stack.deployments_pid)
    stop_local_cluster(stack.ray)
    stop(stack.prefect.pid)
    if stack.postgres:  # after its one client, so its shutdown waits for nobody
        stop(stack.postgres.pid)
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
