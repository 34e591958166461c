"""A local Prefect server (SQLite under STATE/prefect, or PostgreSQL: infra/postgres.py) on
127.0.0.1, telemetry off."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from infra.process import PortTaken, free_port, port_free, spawn, wait_http
from infra.settings import QUIET_ENV


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    pid: int


def start_prefect(state_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                  same_port: bool = False, database_url: str | None = None) -> PrefectServer:
    """Start the server (on `port` when it is free, else any free port) and wait for health.

    With `same_port` (a restart: clients know that address) it is `port` or an error.
    `database_url`: a PostgreSQL (asyncpg) URL instead of SQLite under STATE/prefect; only the
    server's environment holds it.
    """
    if port and not port_free(host, port):
        if same_port:
            raise PortTaken(f"Prefect port {host}:{port} is taken: stop what holds it, or "
                            "`recsqueeze down` and `up` for new ports")
        port = None
    port = port or free_port(host)
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | QUIET_ENV | {
        "PREFECT_HOME": str(home.resolve()),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        "PREFECT_API_URL": f"http://{host}:{port}/api",
    }
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    prefect = str(Path(sys.executable).with_name("prefect"))
    log = state_dir / "prefect.log"
    pid = spawn([prefect, "server", "start", "--host", host, "--port", str(port)], env, log)
    api = f"http://{host}:{port}/api"
    wait_http(f"{api}/health", pid, log, timeout_s=180)
    crash_silent_runs(api)
    return PrefectServer(api, f"http://{host}:{port}", pid)


SILENT_RUNS = "recsqueeze: crash flow runs gone silent"
SILENCE = timedelta(minutes=5)
"""How long a flow run may send no heartbeat (every 30 s: `CLIENT_ENV`) before it is marked
Crashed. Longer than an outage the clients ride out (~2 min of retries): a run that lives
through a server restart must not be crashed by it."""


def crash_silent_runs(api_url: str) -> None:
    """Install (once) Prefect's automation for zombie flow runs: a flow run whose driver died
    -- killed, or gone while the server was down -- stops its heartbeats and is marked Crashed
    after `SILENCE`, never left RUNNING."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            Automation.read(name=SILENT_RUNS)
            return
        except ValueError:
            pass
        ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
        Automation(
            name=SILENT_RUNS,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *ends},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=SILENCE),
            actions=[ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENCE.seconds // 60} minutes: the process running "
                        "this flow run died (killed, or lost while the Prefect server was down); "
                        "rerun it")],
        ).create()


def restart_prefect(state_dir: Path, server: PrefectServer,
                    database_url: str | None = None) -> PrefectServer:
    """The server that died, back on its address, on the same database (STATE/prefect, or
    `database_url`)."""
    host, port = server.api_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return start_prefect(state_dir, int(port), host, same_port=True, database_url=database_url)
