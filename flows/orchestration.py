"""What the orchestration costs: `recsqueeze bench --suite orchestration`.

The same request (fixed candidates, no search, nothing served from a cache) runs

- (a) in one bare process: every plan node in plan order through the same task functions
  (`LocalExecutor`, an in-memory store), each node timed;
- (b), (c), (d) as the Prefect flow on a fresh local stack whose Ray cluster has 1, 2 and 3
  worker nodes of one CPU each (S3 and Prefect on loopback as in `make demo`), launched the
  documented way (`recsqueeze run --request F --json`).

The flow's wall time is its flow run's start to end as the Prefect server recorded them. Each
task run is matched to its plan node by its name (`<task>-<key8>`, flows.execute.run_name);
its running time beyond the same node's time in the bare process is the per-task overhead,
split by what the task itself logged (tasks.iostats: its completion hook's `io seconds` line):

- `s3_s`: S3 reads and writes (the bare run keeps blobs in memory: all of it is overhead);
- `serde_s`: model (de)serialization (safetensors); the bare run does the same, so this is
  not overhead but shows what a model costs to pass between nodes;
- `other_s`: the rest of the overhead: Prefect's task-run state calls and hooks, Ray's
  start of a worker process and its imports (the first task on each node pays them: the
  row also splits the overhead into that first task's and the later ones'), and moving
  arguments and results through Ray;

and, for the whole run, `unused_node_s`: nodes x wall time minus the summed running time of
all task runs: node time spent in no task (the driver's own work: planning, the gate, the
report; task submission and Ray scheduling; and the idle time the plan's dependencies leave,
e.g. every node but one while the baseline trains).

`outside_tasks` splits the wall time no task ran through: the driver's start (to the first
task), its end (from the last task: the gate, the report), and the time in between when no
node ran any task (results travelling back and the next submission, on the critical path).

Ratios (DESIGN §3: side by side, one run of the command): overhead = (b) / (a); parallel
efficiency at n nodes = (b) / (n x wall(n)). Beside it, `plan_bound_efficiency`: the same
ratio for the bare node times scheduled on n nodes with no orchestration cost
(`plan_bound`, a lower bound on that wall time): the most the plan allows (the dataset, the
baseline's training and its evaluation run one after the other before any candidate, and the
candidates are timed side by side on one node). (b) carries the flow's own overhead, so
`bare_efficiency`, bare / (n x wall(n)), is the ratio to hold against that bound.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.local import _inherited as _env  # the environment without RECSQUEEZE_*
from flows.stack import load_stack, start_stack, stop_stack
from tasks import iostats
from tasks.determinism import fixed_threads
from tasks.execute import LocalExecutor, run_plan
from tasks.plan import Graph, plan
from tasks.run import STARTED
from tasks.types import CompressionRequest

RECSQUEEZE = str(Path(sys.executable).with_name("recsqueeze"))


def orchestration_request(size: str = "tiny") -> CompressionRequest:
    """Six candidates of every stage kind (a calibration too), on the built-in data; a few
    epochs of training each on `tiny` (one on `small`), so that stages take seconds there and
    a minute or more here (the per-task overhead is what it is either way; its share is
    not)."""
    epochs, tune = (4, 2) if size == "tiny" else (1, 1)
    return CompressionRequest.model_validate({
        "model_name": "orchestration-bench", "dataset": {"builtin": size},
        "train": {"epochs": epochs, "batch_size": 512, "patience": epochs},
        "reuse_results": False, "search": None,
        "promote": False, "require_useful_baseline": False,
        "resources": {"timing_seconds": 2},
        "candidates": [
            {"id": "int8", "plan": [{"kind": "quantize"}]},
            {"id": "int4-rows", "plan": [{"kind": "quantize", "linear": "int8_weight_only",
                                          "embeddings": "rowwise_int4"}]},
            {"id": "mixed", "plan": [{"kind": "quantize", "mixed_precision": {}}]},
            {"id": "pruned", "plan": [{"kind": "prune", "method": "structured",
                                       "sparsity": 0.5, "finetune_epochs": tune}]},
            {"id": "tt", "plan": [{"kind": "factorize", "target": "tt_embeddings", "rank": 8,
                                   "finetune_epochs": tune}]},
            {"id": "student", "plan": [{"kind": "distill", "epochs": epochs, "student": {
                "family": "dlrm", "embedding_dim": 8, "bottom_mlp": [32, 8],
                "top_mlp": [32]}}]},
        ]})


class TimedExecutor(LocalExecutor):
    """`LocalExecutor` that records each node's seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def run(self, graph: Graph, keys: Any) -> dict[str, Any]:
        for key in self._needed(graph, list(keys)):
            start = time.perf_counter()
            super().run(graph, [key])  # its parents are done: this runs the node alone
            self.seconds[key] = time.perf_counter() - start
        return self.outputs


def bare_run(request: CompressionRequest) -> tuple[float, dict[str, float], Graph]:
    """The plan in this process, on one intra-op thread: what a one-CPU Ray node gives a task
    (Ray sets OMP_NUM_THREADS=1 there), so that a node's time is compared with a CPU's. The
    stages that fix their thread count fix it either way; the others (the calibration's
    per-layer quantization, for one) would otherwise use every core here."""
    graph = plan(request)
    executor = TimedExecutor()
    start = time.perf_counter()
    with fixed_threads(1):
        run_plan(graph, executor)
    return time.perf_counter() - start, executor.seconds, graph


def _t(value: str | None) -> float:
    assert value is not None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def flow_run(request: CompressionRequest, state: Path, workers: int, base_ip: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    """The request as the flow, on a fresh stack of `workers` one-CPU Ray nodes: the flow
    run's wall time and each task run's timestamps, from the Prefect API."""
    import httpx

    head = f"127.0.0.{base_ip}"
    nodes = tuple(f"127.0.0.{base_ip + 1 + i}" for i in range(workers))
    # head_cpus=0: the head runs no task, so n worker nodes are n CPUs (with a CPU of its
    # own the head was one more node, and "1 node" ran two tasks at a time)
    stack = start_stack(state, head_ip=head, worker_ips=nodes, cpus_per_node=1,
                        serve_deployments=False, head_cpus=0, env=_env())
    try:
        path = state / "request.json"
        path.write_text(request.model_dump_json())
        log(f"orchestration: the flow on {workers} worker node(s) ...")
        done = subprocess.run([RECSQUEEZE, "run", "--request", str(path), "--json", "--quiet",
                               "--state-dir", str(state)], env=_env(), capture_output=True,
                              text=True, timeout=3600, stdin=subprocess.DEVNULL)
        if done.returncode:
            raise RuntimeError(f"the flow on {workers} node(s) failed:\n{done.stderr[-3000:]}")
        run_id = json.loads(done.stdout)["run_id"]
        with httpx.Client(base_url=stack.prefect.api_url, timeout=60) as api:
            run = api.get(f"/flow_runs/{run_id}").json()
            ids = [run_id]
            parents = [run_id]
            while parents:
                children = api.post("/flow_runs/filter", json={"flow_runs": {
                    "parent_flow_run_id": {"any_": parents}}, "limit": 200}).json()
                parents = [c["id"] for c in children if c["id"] not in ids]
                ids += parents
            tasks: list[dict[str, Any]] = []
            while True:
                page = api.post("/task_runs/filter", json={
                    "flow_runs": {"id": {"any_": ids}}, "limit": 200,
                    "offset": len(tasks)}).json()
                tasks += page
                if len(page) < 200:
                    break
            io: dict[str, dict[str, Any]] = {}
            node_of: dict[str, str] = {}
            time.sleep(3)  # logs reach the server in batches
            for i in range(0, len(tasks), 50):
                want = [t["id"] for t in tasks[i:i + 50]]
                offset = 0
                while True:
                    page = api.post("/logs/filter", json={
                        "logs": {"task_run_id": {"any_": want}}, "limit": 200,
                        "offset": offset}).json()
                    offset += len(page)
                    for entry in page:
                        counts = iostats.parse(entry["message"])
                        if counts is not None:
                            io[entry["task_run_id"]] = counts
                        elif entry["message"].startswith(STARTED):
                            node_of[entry["task_run_id"]] = entry["message"].split()[-1]
                    if len(page) < 200:
                        break
        return {"wall_s": _t(run["end_time"]) - _t(run["start_time"]), "tasks": tasks,
                "io": io, "node_of": node_of, "start": _t(run["start_time"]),
                "end": _t(run["end_time"])}
    finally:
        current = load_stack(state) or stack
        stop_stack(current)


def _split(flow: dict[str, Any], bare_s: dict[str, float],
           ops: dict[str, str] | None = None) -> dict[str, Any]:
    """Per task run: running time beyond the bare node's, and what of it the task logged;
    `by_op`: the same running time beyond the bare node's, per kind of node (`ops`: key ->
    op), so the overhead is placed on the tasks that pay it."""
    by8 = {k[:8]: s for k, s in bare_s.items()}
    op8 = {k[:8]: op for k, op in (ops or {}).items()}
    out: dict[str, list[float]] = {"extra": [], "s3": [], "serde": [], "other": [],
                                   "first_on_node": [], "later": []}
    by_op: dict[str, list[float]] = {}
    unmatched, running_s, s3_bytes = [], 0.0, 0
    seen_nodes: set[str] = set()
    for t in sorted(flow["tasks"], key=lambda t: t.get("start_time") or ""):
        if not t.get("start_time") or not t.get("end_time"):
            continue
        key8 = t["name"].rsplit("-", 1)[-1]
        running = _t(t["end_time"]) - _t(t["start_time"])
        running_s += running
        if key8 not in by8:
            unmatched.append(t["name"])
            continue
        extra = running - by8[key8]
        io = flow["io"].get(t["id"], {})
        s3 = sum(io.get(k, {}).get("s", 0.0) for k in ("s3_get", "s3_put"))
        s3_bytes += sum(int(io.get(k, {}).get("bytes", 0)) for k in ("s3_get", "s3_put"))
        out["extra"].append(extra)
        by_op.setdefault(op8.get(key8, "?"), []).append(extra)
        out["s3"].append(s3)
        out["serde"].append(sum(io.get(k, {}).get("s", 0.0)
                                for k in ("serialize", "deserialize")))
        out["other"].append(extra - s3)
        node = flow["node_of"].get(t["id"])  # the first task on a node starts its worker
        first = node is not None and node not in seen_nodes
        seen_nodes.update([node] if node else [])
        out["first_on_node" if first else "later"].append(extra)
    return out | {"by_op": by_op, "unmatched": unmatched, "task_s": running_s, "s3_bytes": s3_bytes,
                  "logged": len(flow["io"])}


def _timeline(flow: dict[str, Any]) -> dict[str, Any]:
    """Where the flow's wall time went outside its tasks: the driver's start (flow run start to
    the first task's start: connecting to Ray, planning, submitting), its end (the last task's
    end to the flow run's end: the gate, the report, the artifacts), the time between when no
    task ran on any node (results travelling back, the driver's next submission: on the
    critical path), and on each node the gap between one task's end and its next one's start."""
    spans = sorted((_t(t["start_time"]), _t(t["end_time"]), flow["node_of"].get(t["id"]),
                    t["name"]) for t in flow["tasks"] if t.get("start_time") and t.get("end_time"))
    if not spans:
        return {"driver_start_s": None, "driver_end_s": None, "no_task_running_s": None,
                "node_gaps_s": _stats([])}
    idle, reach = 0.0, spans[0][0]
    for start, end, _, _ in spans:  # the union of the task runs' intervals
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    gaps: list[tuple[float, str]] = []
    last_end: dict[str, float] = {}
    for start, end, node, name in spans:
        if node is None:
            continue
        if node in last_end:
            gaps.append((max(0.0, start - last_end[node]), name))
        last_end[node] = max(end, last_end.get(node, end))
    return {"driver_start_s": spans[0][0] - flow["start"],
            "driver_end_s": flow["end"] - reach,
            "no_task_running_s": idle, "node_gaps_s": _stats([g for g, _ in gaps]),
            # the longest waits on a node, named by the task that ended them
            "longest_gaps_before": [[name, round(g, 3)] for g, name in sorted(gaps)[::-1][:5]]}


def plan_bound(graph: Graph, bare_s: dict[str, float], serial_s: float, n: int,
               barriers: Sequence[str] | None = None) -> float:
    """A lower bound on the wall time of the plan on `n` one-CPU nodes with no orchestration
    cost at all, from each node's bare seconds. `run_plan` waits for the dataset, then the
    baseline, then its evaluation (the preflight: is the baseline worth compressing?) before
    it submits the rest (`barriers`, default those three): each phase adds its own bound,
    and within a phase no schedule finishes before its longest chain of parents, nor before
    the work that cannot start until time t (every node whose chain of parents takes t or
    more) is done by n nodes from t on. Plus what the bare run did outside the nodes
    (`serial_s`: timing the candidates, the gate, the report). Bare wall / (n x this) is thus
    the most parallel efficiency the plan allows."""
    if barriers is None:
        barriers = (graph.dataset, graph.baseline, graph.baseline_evaluation)
    done: set[str] = set()
    wall = serial_s
    for barrier in [*barriers, None]:
        wanted: set[str] = set()
        stack = [barrier] if barrier is not None else [k for k in graph.nodes if k not in done]
        while stack:  # the barrier and what it needs, that an earlier phase did not run
            key = stack.pop()
            if key not in wanted and key not in done:
                wanted.add(key)
                stack.extend(graph.nodes[key].parents)
        wall += _phase_bound(graph, {k: t for k, t in bare_s.items() if k in wanted}, n)
        done |= wanted
    return wall


def _phase_bound(graph: Graph, bare_s: dict[str, float], n: int) -> float:
    earliest: dict[str, float] = {}  # a node's start: its slowest chain of parents in the phase
    for key, node in graph.nodes.items():  # plan order: parents first
        earliest[key] = max((earliest[p] + bare_s.get(p, 0.0) for p in node.parents
                             if p in earliest), default=0.0)
    timed = {k: t for k, t in earliest.items() if k in bare_s}
    if not timed:
        return 0.0
    chain = max(t + bare_s[k] for k, t in timed.items())
    after = max(t + sum(bare_s[k] for k, u in timed.items() if u >= t) / n
                for t in set(timed.values()))
    return max(chain, after)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p95": None, "sum": 0.0, "n": 0}
    ordered = sorted(values)
    return {"median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "sum": sum(ordered), "n": len(ordered)}


def run_orchestration(size: str = "tiny", node_counts: tuple[int, ...] = (1, 2, 3),
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of `recsqueeze bench --suite orchestration` (see the module docstring)."""
    request = orchestration_request(size)
    log("orchestration: the bare process ...")
    bare_wall, bare_s, graph = bare_run(request)
    per_op: dict[str, float] = {}
    for key, seconds in bare_s.items():
        per_op[graph.nodes[key].op] = per_op.get(graph.nodes[key].op, 0.0) + seconds
    serial_s = bare_wall - sum(bare_s.values())
    rows: list[dict[str, Any]] = [{
        "suite": "orchestration", "size": size, "config": "bare", "nodes": 0,
        "wall_s": bare_wall, "tasks": len(bare_s), "seconds_by_op": per_op,
        "outside_nodes_s": serial_s,
        # each node's bare seconds: the plan bound can be recomputed from the file
        "node_s": {key: {"op": graph.nodes[key].op, "s": seconds}
                   for key, seconds in bare_s.items()}}]
    ops = {key: node.op for key, node in graph.nodes.items()}
    one = None
    with tempfile.TemporaryDirectory(prefix="recsqueeze-orch-") as tmp:
        for i, n in enumerate(node_counts):
            flow = flow_run(request, Path(tmp) / f"nodes{n}", n, 40 + 10 * i, log)
            split = _split(flow, bare_s, ops)
            wall = flow["wall_s"]
            row: dict[str, Any] = {
                "suite": "orchestration", "size": size, "config": f"flow-{n}-nodes",
                "nodes": n, "wall_s": wall, "tasks": len(flow["tasks"]),
                "unmatched_tasks": split["unmatched"],
                "overhead_per_task_s": _stats(split["extra"]),
                # the first task on each node pays its Ray worker's start and imports
                "overhead_first_task_on_node_s": _stats(split["first_on_node"]),
                "overhead_later_tasks_s": _stats(split["later"]),
                "overhead_by_op_s": {op: _stats(v) for op, v in sorted(split["by_op"].items())},
                "where": {"s3_s": _stats(split["s3"]), "other_s": _stats(split["other"]),
                          "serde_s (in the bare run too)": _stats(split["serde"])},
                "s3_bytes": split["s3_bytes"], "tasks_with_io_line": split["logged"],
                "task_running_s": split["task_s"],
                "unused_node_s": n * wall - split["task_s"],
                "outside_tasks": _timeline(flow),
                "bare_wall_s": bare_wall,
                "plan_bound_wall_s": plan_bound(graph, bare_s, serial_s, n),
            }
            if one is None:
                one = wall
                row["overhead_ratio"] = wall / bare_wall
                row["overhead_fraction"] = wall / bare_wall - 1
            else:
                row["speedup_vs_1_node"] = one / wall
                row["parallel_efficiency"] = one / (n * wall)
                # what the plan's dependencies allow at best (no orchestration cost at all)
                row["plan_bound_efficiency"] = bare_wall / (n * row["plan_bound_wall_s"])
                row["bare_efficiency"] = bare_wall / (n * wall)  # to hold against the bound
            rows.append(row)
            log(f"orchestration: {n} node(s): {wall:.1f}s"
                f" (bare {bare_wall:.1f}s)")
    return rows
