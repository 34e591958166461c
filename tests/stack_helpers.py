"""Helpers of the tests that start a stack of their own beside the session's."""

from __future__ import annotations

import time
from typing import Any

import httpx

from cluster.local import _inherited


def own_env() -> dict[str, str]:
    """This process's environment without the session stack's RECSQUEEZE_* variables: they
    would take precedence over another stack's state dir (and its keys) in every process
    started with it."""
    return _inherited()


def create_flow_run(api: httpx.Client, deployment_id: str, **body: Any) -> httpx.Response:
    """POST /deployments/ID/create_flow_run as `curl --retry 3` does it: a Prefect server on
    SQLite answers 503 (its "database is locked") when the write meets another one; the
    insert was rolled back, so asking again is safe. `body`: httpx's `json=` or `content=`."""
    url = f"/deployments/{deployment_id}/create_flow_run"
    for wait_s in (1, 2, 4):
        created = api.post(url, **body)
        if created.status_code != 503:
            return created
        time.sleep(wait_s)
    return api.post(url, **body)


def wait_flow_run(api: httpx.Client, run_id: str, timeout_s: float = 420) -> dict:
    """The flow run once it is final (its JSON from the REST API)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {timeout_s}s")
