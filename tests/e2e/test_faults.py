"""Faults on the real stack, as an operator meets them: a worker node killed, S3 paused, S3
and the Prefect server killed and brought back by `recsqueeze up`, a lost node brought back.

The suite runs on a stack of its own (127.0.0.22/.23: the session stack is never touched) and
drives it the documented way: `recsqueeze run` / `up` / `status` as subprocesses. Every run
recomputes (`reuse_results: false`), so a fault lands in the middle of real work; the fault
is injected once the baseline is in the store and the candidates' stages run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from flows.stack import load_stack, start_stack, stop_stack
from infra.s3server import credentials_path
from tasks.artifacts import ArtifactStore
from tasks.registry import Registry
from tests.stack_helpers import own_env as _env

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration]

RECSQUEEZE = str(Path(sys.executable).with_name("recsqueeze"))
REQUEST = {
    "dataset": {"builtin": "tiny"},
    "train": {"epochs": 2, "batch_size": 512},
    "reuse_results": False,
    "resources": {"timing_seconds": 5},
    "candidates": [
        {"id": "int8-all", "plan": [{"kind": "quantize", "linear": "int8_weight_only",
                                     "embeddings": "rowwise_int8"}]},
        {"id": "pruned", "plan": [{"kind": "prune", "method": "structured", "sparsity": 0.5}]},
    ],
}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state_dir = Path(tmp_path_factory.mktemp("faults"))
    start_stack(state_dir, head_ip="127.0.0.22", worker_ips=("127.0.0.23",),
                serve_deployments=False)
    try:
        yield state_dir
    finally:
        current = load_stack(state_dir)  # the pids after the restarts
        if current is not None:
            stop_stack(current)


def _cli(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RECSQUEEZE, *args, "--state-dir", str(state)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _store(state: Path) -> ArtifactStore:
    """This stack's store, with its own keys (not the session stack's, in os.environ)."""
    stack = load_stack(state)
    assert stack is not None
    keys = json.loads(credentials_path(state).read_text())
    return ArtifactStore(stack.settings().model_copy(update={
        "s3_access_key": SecretStr(keys["access_key"]),
        "s3_secret_key": SecretStr(keys["secret_key"]),
        "signing_key": SecretStr(keys["signing_key"])}))


class Run:
    """`recsqueeze run --json` of REQUEST under `name`, in the background."""

    def __init__(self, state: Path, name: str, tmp: Path) -> None:
        request = tmp / f"{name}.json"
        request.write_text(json.dumps(REQUEST | {"model_name": name}))
        self.stdout, self.stderr = tmp / f"{name}.out", tmp / f"{name}.err"
        self.started = time.monotonic()
        with open(self.stdout, "w") as out, open(self.stderr, "w") as errs:
            self.proc = subprocess.Popen(
                [RECSQUEEZE, "run", "--request", str(request), "--json", "--state-dir",
                 str(state)], env=_env(), stdout=out, stderr=errs)

    def wait_for_stages(self, api_url: str, timeout_s: float = 240) -> None:
        """Until a candidate's stage runs (asked of the Prefect API; runs here are one at a
        time, so a running `run-stage` task is this run's)."""
        import httpx

        query = {"task_runs": {"name": {"like_": "run-stage"},
                               "state": {"type": {"any_": ["RUNNING"]}}}, "limit": 1}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr.read_text()[-3000:]
            resp = httpx.post(f"{api_url}/task_runs/filter", json=query, timeout=10)
            if resp.status_code == 200 and resp.json():
                time.sleep(1.0)
                return
            time.sleep(0.5)
        raise TimeoutError("no candidate stage started")

    def finish(self, timeout_s: float = 400) -> tuple[int, dict | None, str, float]:
        code = self.proc.wait(timeout=timeout_s)
        text = self.stdout.read_text()
        report = json.loads(text) if code == 0 and text.strip() else None
        return code, report, self.stderr.read_text(), time.monotonic() - self.started


def _essence(report: dict) -> dict:
    """What a fault must not change: candidates, their bytes and quality, the verdicts and
    the promoted candidate (not timings, which depend on the node)."""
    rows = {r["candidate"]: (r["size_bytes"], r["quality"], r["passed"])
            for r in report["leaderboard"]}
    promoted = report["promoted"]
    return {"baseline": report["baseline"]["quality"], "rows": rows, "status": report["status"],
            "promoted": promoted and (promoted["candidate_id"], promoted["version"])}


def _registry_consistent(store: ArtifactStore, name: str) -> None:
    """Every listed version verifies and production points at one of them."""
    registry = Registry(store)
    versions = registry.versions(name)
    for version in versions:
        assert registry.verify(name, version) is None
    alias = registry.alias(name)
    assert alias is None or alias in versions


@pytest.fixture(scope="module")
def reference(state: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = Path(tmp_path_factory.mktemp("ref"))
    code, report, errs, wall = Run(state, "fault-ref", tmp).finish()
    assert code == 0, errs[-3000:]
    assert report is not None and report["promoted"] is not None
    print(f"\nFAULT reference run: completed, promoted, {wall:.0f}s")
    return _essence(report)


def _outcome(fault: str, outcome: str, wall: float) -> None:
    print(f"\nFAULT {fault}: {outcome}, {wall:.0f}s")  # the closing note's table


def test_a_worker_node_killed_mid_stage_changes_nothing(state, reference, tmp_path):
    stack = load_stack(state)
    worker = next(n for n in stack.ray.nodes if not n.head)
    run = Run(state, "fault-worker", tmp_path)
    run.wait_for_stages(stack.prefect.api_url)
    os.killpg(worker.pid, signal.SIGKILL)  # the node and every process of it
    code, report, errs, wall = run.finish()
    assert code == 0, errs[-3000:]
    assert _essence(report) == reference
    _registry_consistent(_store(state), "fault-worker")
    _outcome("worker node kill -9 mid-stage", "identical leaderboard and promotion", wall)


def test_up_brings_the_lost_worker_back_and_touches_nothing_else(state):
    before = load_stack(state)
    status = _cli(state, "status")
    assert status.returncode == 1 and "ray 127.0.0.23" in status.stdout
    assert "DOWN" in status.stdout and "`recsqueeze up` restarts only those" in status.stderr
    started = time.monotonic()
    up = _cli(state, "up")
    assert up.returncode == 0, up.stderr
    assert "restarted ray 127.0.0.23 on the same ports" in up.stderr
    after = load_stack(state)
    assert (after.s3.pid, after.prefect.pid) == (before.s3.pid, before.prefect.pid)
    heads = [(n.ip, n.pid) for n in (before.ray.nodes, after.ray.nodes)[0] if n.head]
    assert heads == [(n.ip, n.pid) for n in after.ray.nodes if n.head]
    worker = next(n for n in after.ray.nodes if not n.head)
    assert worker.args == next(n for n in before.ray.nodes if not n.head).args  # same ports
    assert _cli(state, "status").returncode == 0
    _outcome("lost worker node, `recsqueeze up`", "worker back on its ports, rest untouched",
             time.monotonic() - started)


def _kill_and_up(state: Path, pid: int, down_s: float, part: str) -> None:
    os.killpg(pid, signal.SIGKILL)
    time.sleep(down_s)
    up = _cli(state, "up")
    assert up.returncode == 0, up.stderr
    assert f"restarted {part}" in up.stderr


def _rerun_if_failed(state, name, tmp, code, report, errs):  # type: ignore[no-untyped-def]
    """A run a fault failed must have said why in one line, and a rerun must complete."""
    if code == 0:
        return report, "completed"
    assert "Traceback" not in errs, errs[-3000:]
    code, report, errs, _ = Run(state, name, tmp / "rerun").finish()
    assert code == 0, errs[-3000:]
    return report, "failed clearly, rerun completed"


def test_s3_paused_30s_then_killed_and_restarted_by_up_mid_run(state, reference, tmp_path):
    """Both S3 faults in one run (the suite's time): a 30 s pause, then a kill -9 and `up`."""
    stack = load_stack(state)
    run = Run(state, "fault-s3", tmp_path)
    run.wait_for_stages(stack.prefect.api_url)
    os.killpg(stack.s3.pid, signal.SIGSTOP)
    try:
        time.sleep(30)
    finally:
        os.killpg(stack.s3.pid, signal.SIGCONT)
    paused = time.monotonic() - run.started
    assert run.proc.poll() is None, "the run ended before the kill"
    _kill_and_up(state, stack.s3.pid, 3.0, "s3")
    assert load_stack(state).s3.endpoint == stack.s3.endpoint
    code, report, errs, wall = run.finish()
    (tmp_path / "rerun").mkdir()
    report, outcome = _rerun_if_failed(state, "fault-s3", tmp_path, code, report, errs)
    assert _essence(report) == reference, (report["failures"], errs[-3000:])
    _registry_consistent(_store(state), "fault-s3")
    _outcome("SeaweedFS SIGSTOP 30 s, then kill -9 and `recsqueeze up` 3 s later, mid-run",
             f"{outcome}, identical leaderboard and promotion (pause ended at {paused:.0f} s)",
             wall)


def test_prefect_killed_mid_run_and_restarted_by_up(state, reference, tmp_path):
    stack = load_stack(state)
    run = Run(state, "fault-prefect", tmp_path)
    run.wait_for_stages(stack.prefect.api_url)
    _kill_and_up(state, stack.prefect.pid, 10.0, "prefect")
    code, report, errs, wall = run.finish()
    flow_runs = _flow_runs(stack.prefect.api_url, "fault-prefect")
    assert flow_runs and all(s not in ("RUNNING", "PENDING") for s in flow_runs), flow_runs
    (tmp_path / "rerun").mkdir()
    report, outcome = _rerun_if_failed(state, "fault-prefect", tmp_path, code, report, errs)
    assert _essence(report) == reference
    _registry_consistent(_store(state), "fault-prefect")
    _outcome("Prefect server kill -9 mid-run, `recsqueeze up` 10 s later",
             f"{outcome}; flow run states {flow_runs}", wall)


def _flow_runs(api_url: str, model_name: str) -> list[str]:
    """States of the `compress` flow runs whose request names `model_name`."""
    import httpx

    resp = httpx.post(f"{api_url}/flow_runs/filter", json={"limit": 50}, timeout=30)
    resp.raise_for_status()
    return [r["state_type"] for r in resp.json()
            if r["parameters"].get("request", {}).get("model_name") == model_name]


def test_flow_runs_that_go_silent_are_crashed_by_an_automation(state):
    """A driver that dies (killed, or lost while the server was down) leaves its flow run
    RUNNING unless something marks it: the stack installs Prefect's zombie-run automation."""
    import httpx

    from infra.prefect_server import SILENCE, SILENT_RUNS

    api = load_stack(state).prefect.api_url
    found = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    mine = [a for a in found if a["name"] == SILENT_RUNS]
    assert len(mine) == 1  # once, although Prefect was restarted by `up`
    trigger, action = mine[0]["trigger"], mine[0]["actions"][0]
    assert trigger["posture"] == "Proactive" and trigger["within"] == SILENCE.total_seconds()
    assert "prefect.flow-run.heartbeat" in trigger["expect"]
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"
