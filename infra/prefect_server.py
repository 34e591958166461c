"""A local Prefect server (SQLite under STATE/prefect) on 127.0.0.1, telemetry off."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.process import free_port, port_free, spawn, wait_http
from infra.settings import QUIET_ENV


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    pid: int


def start_prefect(state_dir: Path, port: int | None = None,
                  host: str = "127.0.0.1") -> PrefectServer:
    """Start the server (on `port` when it is free, else any free port) and wait for health."""
    if port and not port_free(host, port):
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
    prefect = str(Path(sys.executable).with_name("prefect"))
    log = state_dir / "prefect.log"
    pid = spawn([prefect, "server", "start", "--host", host, "--port", str(port)], env, log)
    api = f"http://{host}:{port}/api"
    wait_http(f"{api}/health", pid, log, timeout_s=180)
    return PrefectServer(api, f"http://{host}:{port}", pid)
