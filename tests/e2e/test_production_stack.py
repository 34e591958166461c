"""The stack as a platform team runs it: the Prefect server on PostgreSQL, the deployments in a
`process` work pool with a `prefect worker` running their flow runs (not `serve`).

Its own stack (127.0.0.32/.33; the session stack is never touched), started through the
documented path (`recsqueeze up --db postgres --work-pool NAME` is `start_stack(db=...,
work_pool=...)`) and stopped at the end, PostgreSQL with it. On it: the tiny flow from the CLI,
then a run triggered through the REST API that the pool's worker picks up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.stack import Stack, load_stack, start_stack, stop_stack
from infra.postgres import PostgresMissing, bin_dir, password
from infra.process import alive
from tests.stack_helpers import own_env as _own_env
from tests.stack_helpers import wait_flow_run as _wait

pytestmark = [pytest.mark.slow, pytest.mark.integration]

POOL = "recsqueeze-e2e"
RECSQUEEZE = str(Path(sys.executable).with_name("recsqueeze"))
REQUEST = {
    "model_name": "pg-ranker",
    "dataset": {"builtin": "tiny"},
    "train": {"epochs": 1, "batch_size": 512},
    "resources": {"timing_seconds": 3},
    "require_useful_baseline": False,
    "candidates": [{"id": "int8-all", "plan": [
        {"kind": "quantize", "linear": "int8_weight_only", "embeddings": "rowwise_int8"}]}],
}


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        bin_dir()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    state = Path(tmp_path_factory.mktemp("prod"))
    # env: what the worker (and its flow runs) inherit
    stack = start_stack(state, head_ip="127.0.0.32", worker_ips=("127.0.0.33",),
                        db="postgres", work_pool=POOL, env=_own_env())
    try:
        yield stack
    finally:
        current = load_stack(Path(stack.state_dir)) or stack  # the pids after a restart
        stop_stack(current)
        left = [p for s in (stack, current) for p in s.pids() if alive(p)]
        assert not left, left  # PostgreSQL and the worker too


def _sql(stack: Stack, query: str) -> str:
    assert stack.postgres is not None
    done = subprocess.run(
        [str(bin_dir() / "psql"), "-h", stack.postgres.host, "-p", str(stack.postgres.port),
         "-U", "prefect", "-d", "prefect", "-Atc", query],
        env={"PGPASSWORD": password(Path(stack.state_dir)), "PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_tiny_flow_runs_on_prefect_over_postgresql(prod, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(REQUEST))
    done = subprocess.run([RECSQUEEZE, "run", "--request", str(request), "--json", "--quiet",
                           "--state-dir", prod.state_dir], env=_own_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["promoted"], report
    # the runs are PostgreSQL's rows: Prefect wrote no SQLite database
    assert int(_sql(prod, "select count(*) from flow_run")) >= 1
    assert int(_sql(prod, "select count(*) from task_run")) >= 3
    assert not list(Path(prod.state_dir, "prefect").glob("*.db"))


def test_a_rest_triggered_run_goes_through_the_work_pool_worker(prod):
    api = httpx.Client(base_url=prod.prefect.api_url, timeout=30)
    deployment = api.get("/deployments/name/compress/on-demand").json()
    assert deployment["work_pool_name"] == POOL
    pool = api.get(f"/work_pools/{POOL}").json()
    assert pool["type"] == "process"
    # what the deployment carries to the worker: this checkout and where the services are,
    # nothing secret (the API serves job variables to anyone who can read the deployment)
    job = deployment["job_variables"]
    assert Path(job["working_dir"]).resolve() == Path(__file__).resolve().parents[2]
    assert not [k for k in job["env"] if "KEY" in k or "SECRET" in k], job["env"]
    assert deployment["global_concurrency_limit"]["limit"] == 1  # as served ones
    created = api.post(f"/deployments/{deployment['id']}/create_flow_run",
                       json={"parameters": {"request": REQUEST | {"model_name": "pool-ranker"}}})
    assert created.status_code == 201, created.text
    run = _wait(api, created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["work_pool_name"] == POOL
    workers = api.post(f"/work_pools/{POOL}/workers/filter", json={}).json()
    assert [w for w in workers if w["status"] == "ONLINE"], workers
    api.close()


def test_no_password_lands_in_a_log_or_the_stack_file(prod):
    secret = password(Path(prod.state_dir))
    state = Path(prod.state_dir)
    for name in ("prefect.log", "postgres.log", "deployments.log", "register.log",
                 "stack.json"):
        path = state / name
        assert path.exists(), name
        assert secret not in path.read_text(errors="replace"), name
    assert oct((state / "postgres.password").stat().st_mode & 0o777) == "0o600"


def test_a_killed_postgresql_is_restarted_on_its_port_and_prefect_reads_it_again(prod):
    import signal

    assert prod.postgres is not None
    os.kill(prod.postgres.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(prod.postgres.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = subprocess.run([RECSQUEEZE, "status", "--state-dir", prod.state_dir],
                            env=_own_env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "postgres" in status.stdout, status.stdout
    up = subprocess.run([RECSQUEEZE, "up", "--state-dir", prod.state_dir], env=_own_env(),
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0 and "restarted postgres on the same ports" in up.stderr, up.stderr
    healed = load_stack(Path(prod.state_dir))
    assert healed is not None and healed.postgres is not None
    assert healed.postgres.port == prod.postgres.port and alive(healed.postgres.pid)
    with httpx.Client(base_url=prod.prefect.api_url, timeout=30) as api:
        deadline = time.monotonic() + 60  # the server's pool reconnects on its next query
        while time.monotonic() < deadline:
            got = api.get("/deployments/name/compress/on-demand")
            if got.status_code == 200:
                break
            time.sleep(1)
        assert got.status_code == 200, got.text
