"""Live progress of a compress run, read from the Prefect API (never from S3).

The executor (flows.execute) names every task run `<task>-<key8>`, the head of its plan node's
content key, so the CLI finds each run's node (its op, its label, the candidates whose chain
holds it) in its own copy of the request's plan (`plan_nodes`). Each task's first log line
names its Ray node, and a candidate's evaluation logs its size and loss bound. `Watcher` polls
the API for the task runs of the run's flow run (found by the name the CLI gave it) and of its
subflow runs (NAS, the recipe search), and their logs; `Progress` folds them into one line per
candidate and an overall count of plan nodes finished. `show` draws them with rich: a live
table and bar on a terminal, one plain line per change elsewhere (CI logs).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.progress import Progress as Bar
from rich.table import Table

from tasks.run import EVALUATED, STARTED

SHARED = "baseline"  # the line of the nodes every candidate needs (data, baseline, calibration)
SEARCH = "search"  # trials of a recipe search or NAS before any is a candidate
_DONE = ("Completed", "Cached")  # state names (`_state_name`) of a task that ended well
_FAILED = ("Failed", "Crashed")
_FINAL = (*_DONE, *_FAILED, "Cancelled")
GATE = "gate"  # the tasks after the candidates: latency timing, the champion, promotion
_RESULT = re.compile(EVALUATED + r": (?P<cand>\S+), size (?P<size>[\d.]+)x, (?P<metric>\S+) "
                     r"(?P<delta>[-+][\d.]+), relative loss bound (?P<bound>-?[\d.]+)")


# the plan op of each task (the nodes' ops; the rest, timing and promotion, are the gate's)
TASK_OPS = {"prepare-dataset": "dataset", "train-baseline": "baseline",
            "evaluate-baseline": "evaluate_baseline", "calibrate": "calibrate",
            "teacher-outputs": "teacher", "run-stage": "stage",
            "evaluate-candidate": "evaluate", "validate-candidate": "validate"}


@dataclass(frozen=True)
class PlanNode:
    op: str
    label: str
    candidates: tuple[str, ...]


def plan_nodes(graph: Any) -> dict[str, PlanNode]:
    """The graph's nodes by the head of their key (what a task run's name ends with)."""
    owners: dict[str, list[str]] = {}
    for cid, c in graph.candidates.items():
        for key in (*c.chain, c.evaluation):
            owners.setdefault(key, []).append(cid)
    return {key[:8]: PlanNode(node.op, node.label, tuple(owners.get(key, ())))
            for key, node in graph.nodes.items()}


@dataclass
class TaskView:
    """What the API says of one task run, with its plan node where the plan has it."""

    id: str
    name: str
    state: str  # the state's name: Pending, Running, Completed, Cached, Failed, ...
    message: str = ""
    start: datetime | None = None
    op: str = ""
    label: str = ""
    candidates: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        """The plan node's label, else the run's name (timing, promotion)."""
        return self.label or self.name


def task_view(run: Any, nodes: dict[str, PlanNode]) -> TaskView:
    task, _, suffix = run.name.rpartition("-")
    node = nodes.get(suffix)
    return TaskView(id=str(run.id), name=run.name, state=_state_name(run),
                    message=(run.state.message or "") if run.state else "", start=run.start_time,
                    op=node.op if node else TASK_OPS.get(task, ""),
                    label=node.label if node else "",
                    candidates=node.candidates if node else ())


@dataclass
class Line:
    """One candidate's progress."""

    name: str
    status: str = "pending"  # pending | running | waiting | done | failed | skipped
    stage: str = ""
    node: str = ""
    since: datetime | None = None
    result: str = ""

    def text(self, now: datetime) -> str:
        if self.status == "running":
            secs = (now - self.since).total_seconds() if self.since else 0.0
            return f"{self.name}: running {self.stage} on {self.node or '?'} ({secs:.0f}s)"
        if self.status in ("done", "failed", "skipped"):
            return f"{self.name}: {self.status}" + (f" on {self.node}" if self.node else "") \
                + (f" - {self.result}" if self.result else "")
        return f"{self.name}: {self.status}" + (f" (next after {self.stage})" if self.stage else "")


@dataclass
class Progress:
    """The run's candidates (the plan's, then any a search adds) and what its task runs say."""

    candidates: list[str]
    planned: int  # plan nodes known before the run (a search adds more as it goes)
    budget: float | None = None  # the main metric's budget, relative (a result's verdict)
    relative: bool = True
    started: float = field(default_factory=time.monotonic)
    nodes: dict[str, str] = field(default_factory=dict)  # task run id -> Ray node
    results: dict[str, str] = field(default_factory=dict)  # candidate -> its result line
    tasks: list[TaskView] = field(default_factory=list)

    def update(self, tasks: list[TaskView], logs: Iterable[tuple[str, str]]) -> None:
        """Fold in the task runs now and the log lines (task run id, message) read since."""
        self.tasks = tasks
        for task_id, message in logs:
            if message.startswith(STARTED):
                self.nodes[task_id] = message[len(STARTED):].strip()
            elif (m := _RESULT.search(message)) is not None:
                self.results[m["cand"]] = self._verdict(m)

    def _verdict(self, m: re.Match[str]) -> str:
        size, bound = float(m["size"]), float(m["bound"])
        verdict = ""
        if self.budget is not None and self.relative:
            verdict = ", within budget" if bound <= self.budget else ", over budget"
        return f"size {size:.2f}x, {m['metric']} {m['delta']}, loss bound {bound:.3%}{verdict}"

    def finished(self) -> int:
        return sum(t.state in (*_DONE, *_FAILED) for t in self.tasks)

    def total(self) -> int:
        return max(self.planned, len(self.tasks))

    def lines(self) -> list[Line]:
        groups: dict[str, list[TaskView]] = {cid: [] for cid in self.candidates}
        shared, search, gate = [], [], []
        for t in self.tasks:
            if t.candidates:
                for cid in t.candidates:
                    groups.setdefault(cid, []).append(t)
            elif t.op in ("dataset", "baseline", "evaluate_baseline", "calibrate", "teacher"):
                shared.append(t)
            elif t.op:
                search.append(t)
            else:  # not a plan node: timing, the champion's evaluation, promotion
                gate.append(t)
        out = [self._line(SHARED, shared, final="evaluate_baseline")]
        out += [self._line(cid, ts, final="evaluate") for cid, ts in groups.items()]
        if search:
            line = self._line(SEARCH, search, final="")
            done = sum(t.state in _DONE for t in search if t.op == "validate")
            line.result = f"{done} validation(s) of trials finished"
            if line.status != "running":
                line.status = "done" if all(t.state in (*_DONE, "Failed")
                                            for t in search) else line.status
            out.append(line)
        if gate:
            line = self._line(GATE, gate, final="")
            if line.status == "waiting":
                line.status, line.result = "done", ", ".join(t.stage for t in gate)
                line.stage = ""
            out.append(line)
        return out

    def _line(self, name: str, tasks: list[TaskView], final: str) -> Line:
        line = Line(name)
        failed = [t for t in tasks if t.state in _FAILED]
        running = [t for t in tasks if t.state in ("Running", "Retrying")]
        finished = [t for t in tasks if t.state in _DONE]
        if failed:
            t = failed[0]
            line.status = "skipped" if "StageSkipped" in t.message else "failed"
            line.result = f"{t.stage}: {t.message.split(': ', 1)[-1][:160]}".strip()
        elif any(t.op == final for t in finished) and final:
            line.status = "done"
            ran = [t for t in finished if t.id in self.nodes]  # where its last step ran
            line.node = self.nodes[ran[-1].id] if ran else ""
            line.result = self.results.get(name, "cached" if any(
                t.state == "Cached" for t in finished if t.op == final) else "")
        elif running:
            t = min(running, key=lambda t: t.start or datetime.now(timezone.utc))
            line.status, line.stage, line.node, line.since = "running", t.stage, \
                self.nodes.get(t.id, ""), t.start
        elif finished:
            line.status, line.stage = "waiting", finished[-1].stage
        return line

    def eta(self) -> str:
        done, total = self.finished(), self.total()
        if not done or done >= total:
            return ""
        left = (time.monotonic() - self.started) * (total - done) / done
        return f"~{left / 60:.0f} min left" if left >= 90 else f"~{left:.0f}s left"


def _state_name(task_run: Any) -> str:
    """The state's name, with the names of a final type folded into that type's (a task whose
    transaction rolled back ends `RolledBack`, of type COMPLETED)."""
    name = task_run.state_name or "Pending"
    kind = getattr(task_run.state_type, "value", None)
    if name != "Cached" and kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        return kind.capitalize()
    return name


class Watcher:
    """Polls the Prefect server at `api_url` for the task runs and logs of the flow run named
    `run_name` and its subflow runs (a client of that URL: never Prefect's temporary server,
    whatever the settings of this thread say)."""

    def __init__(self, run_name: str, api_url: str, nodes: dict[str, PlanNode]) -> None:
        self.run_name, self.api_url, self.nodes = run_name, api_url, nodes
        self.seen_logs: set[str] = set()
        self.started: set[str] = set()  # task runs whose node line was read
        self.evaluated: set[str] = set()  # evaluations whose result line was read
        self.ended: dict[str, float] = {}  # task run -> when it was first seen ended
        self.owed = 0  # task runs whose node or result line is still to come

    def _settled(self, task_id: str, evaluation: bool, now: float, grace: float = 20.0) -> bool:
        owed = task_id in self.started and (not evaluation or task_id in self.evaluated)
        return owed or now - self.ended.get(task_id, now) > grace

    def _client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def poll(self) -> tuple[list[TaskView], list[tuple[str, str]]]:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterName,
            FlowRunFilterParentFlowRunId,
            LogFilter,
            LogFilterTaskRunId,
            TaskRunFilter,
            TaskRunFilterFlowRunId,
        )

        with self._client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[self.run_name])), limit=10)
            ids = [r.id for r in runs]
            parents = list(ids)
            while parents:  # subflow runs (NAS, the recipe search), and theirs
                children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)), limit=200)
                parents = [c.id for c in children if c.id not in ids]
                ids += parents
            if not ids:
                return [], []
            raw: list[Any] = []
            while True:  # every task run, 200 at a time
                page = client.read_task_runs(task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=ids)), limit=200, offset=len(raw))
                raw += page
                if len(page) < 200:
                    break
            tasks = [task_view(t, self.nodes) for t in raw]
            # each task run's logs until the lines it owes are read (its node; an evaluation's
            # result too), or a while after it ended (logs reach the server in batches)
            now = time.monotonic()
            for t in tasks:
                if t.state in _FINAL:
                    self.ended.setdefault(t.id, now)
            want = [UUID(t.id) for t in tasks if not self._settled(t.id, t.op == "evaluate", now)]
            found: list[Any] = []
            for i in range(0, len(want), 50):
                flt = LogFilter(task_run_id=LogFilterTaskRunId(any_=want[i:i + 50]))
                offset = 0
                while True:  # the server gives at most 200 a page
                    page = client.read_logs(log_filter=flt, limit=200, offset=offset)
                    found += page
                    offset += len(page)
                    if len(page) < 200:
                        break
            logs: list[tuple[str, str]] = []
            for log in found:
                key = str(log.id)
                if key not in self.seen_logs and log.task_run_id is not None:
                    self.seen_logs.add(key)
                    owner = str(log.task_run_id)
                    if log.message.startswith(STARTED):
                        self.started.add(owner)
                    elif EVALUATED + ":" in log.message:
                        self.evaluated.add(owner)
                    else:
                        continue
                    logs.append((owner, log.message))
        self.owed = sum(not self._settled(t.id, t.op == "evaluate", time.monotonic())
                        for t in tasks)
        return tasks, logs


def show(progress: Progress, watcher: Watcher, console: Console, stop: threading.Event,
         every: float = 2.0) -> None:
    """Draw `progress` until `stop` is set: live on a terminal, plain lines otherwise."""
    failures: list[str] = []

    def refresh() -> None:
        try:
            progress.update(*watcher.poll())
        except Exception as exc:  # noqa: BLE001 (the API may blink; the run goes on)
            if not failures:  # said once: the run goes on, and so do the retries
                console.print(f"progress: cannot read the Prefect API at {watcher.api_url} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); retrying",
                              soft_wrap=True, highlight=False)
            failures.append(str(exc))

    def settle() -> None:  # after the run: states and logs reach the API a bit later
        for _ in range(15):
            refresh()
            if progress.finished() >= progress.total() and watcher.owed == 0:
                return
            time.sleep(1.0)

    if not console.is_terminal:
        printed: dict[str, str] = {}
        while True:
            finished = stop.wait(every)
            if finished:
                settle()
            else:
                refresh()
            now = datetime.now(timezone.utc)
            for line in progress.lines():
                text = line.text(now)
                state = f"{line.status}|{line.stage}|{line.node}|{line.result}"
                if printed.get(line.name) != state:
                    printed[line.name] = state
                    console.print(f"[{progress.finished()}/{progress.total()}] {text}",
                                  soft_wrap=True, highlight=False)
            if finished:
                return
    bar = Bar(TextColumn("plan nodes"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[eta]}"), console=console)
    overall = bar.add_task("run", total=progress.total(), eta="")

    def render() -> Group:
        table = Table(show_header=False, box=None, pad_edge=False)
        now = datetime.now(timezone.utc)
        for line in progress.lines():
            colour = {"done": "green", "failed": "red", "skipped": "yellow",
                      "running": "cyan"}.get(line.status, "dim")
            table.add_row(f"[{colour}]{line.text(now)}[/{colour}]")
        bar.update(overall, completed=progress.finished(), total=progress.total(),
                   eta=progress.eta())
        return Group(table, bar)

    with Live(render(), console=console, refresh_per_second=2, transient=True) as live:
        while not stop.wait(every):
            refresh()
            live.update(render())
        settle()
    for line in progress.lines():
        console.print(line.text(datetime.now(timezone.utc)), soft_wrap=True, highlight=False)
