"""Executing the plan graph: the procedure both executors share, and the in-process executor.

`run_plan` is the one procedure: data -> baseline -> its evaluation -> the checks before any
compression -> every candidate (a search may add more) -> latency side by side. It asks an
`Executor` to run nodes; `node_call` says which task function a node is and with what
arguments. Two executors exist, with the same result (`Executed`):
- `flows.execute.PrefectExecutor`: every node a Prefect task on the Ray cluster, results
  cached in S3 by content;
- `LocalExecutor` (here): every node in this process, through the same task functions, against
  a `MemoryStore` (or any store) - for `recsqueeze bench`, notebooks and unit tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.artifacts import BlobStore, MemoryStore
from tasks.defaults import default_candidates
from tasks.gate import preflight, resolution_warnings
from tasks.models import resolve
from tasks.plan import Graph, Node
from tasks.run import (
    calibrate_model,
    evaluate_baseline,
    evaluate_candidate,
    prepare_dataset,
    run_stage,
    teacher_outputs,
    time_candidates,
    train_baseline,
    validate_candidate,
)
from tasks.runtime import Built, Evaluated, using_store
from tasks.stages.context import NotApplicable, StageSkipped
from tasks.types import (
    METRIC_NAME,
    CandidateResult,
    CompressionRequest,
    DatasetRef,
    DatasetSpec,
    SearchReport,
)

TASKS = {"dataset": prepare_dataset, "baseline": train_baseline,
         "evaluate_baseline": evaluate_baseline, "calibrate": calibrate_model,
         "teacher": teacher_outputs, "stage": run_stage, "evaluate": evaluate_candidate,
         "validate": validate_candidate}


def node_call(graph: Graph, node: Node, get: Callable[[str], Any]) -> tuple[Any, dict[str, Any]]:
    """The task function of `node` and its arguments; `get(key)` gives a parent's output (a
    value, or a future the executor resolves)."""
    r = graph.request
    inputs = {name: get(key) for name, key in node.inputs.items()}
    args: dict[str, Any] = {
        "dataset": lambda: {"request": r.dataset},
        "baseline": lambda: {"spec": r.model, "dataset": inputs["dataset"], "cfg": r.train,
                             "imported": graph.imported},
        "evaluate_baseline": lambda: {**inputs, "ks": graph.ks, "budget": r.budget},
        "calibrate": lambda: {**inputs, "cfg": r.calibrate},
        "teacher": lambda: inputs,
        "stage": lambda: {"parent": inputs["parent"], "cfg": node.value,
                          "dataset": inputs["dataset"], "seed": r.train.seed,
                          "calibration": inputs.get("calibration"), "budget": r.budget,
                          "teacher": inputs.get("teacher")},
        "evaluate": lambda: {"candidate": node.value, "built": inputs["built"],
                             "dataset": inputs["dataset"], "baseline_model": inputs["baseline"],
                             "baseline": inputs["baseline_evaluation"],
                             "confidence": r.budget.confidence, "ks": graph.ks, "timed": False},
        "validate": lambda: {**inputs, **{k: v for k, v in json.loads(node.config).items()
                                          if k != "value"}},
    }[node.op]()
    return TASKS[node.op], args


class Executor(Protocol):
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]

    def run(self, graph: Graph, keys: Sequence[str]) -> dict[str, Any]:
        """Run `keys` and every node they need that has not run; their outputs (a value, or
        the exception that ended it or a node before it)."""

    def time(self, graph: Graph, baseline: Built, results: list[CandidateResult],
             dataset: DatasetRef) -> list[CandidateResult]:
        """Every result's latency, timed side by side with the baseline's."""


@dataclass
class Executed:
    """What running a plan gave: the data, the baseline, and every candidate's outcome."""

    graph: Graph
    dataset: DatasetRef
    baseline: Built
    evaluation: Evaluated
    warnings: tuple[str, ...] = ()
    stop: str | None = None  # why the run ended before compression
    results: list[CandidateResult] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # candidate -> its error
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot run
    models: dict[str, list[Built]] = field(default_factory=dict)  # candidate -> its chain
    search: SearchReport | None = None  # the recipe search, if one ran


def _value(out: dict[str, Any], key: str) -> Any:
    if isinstance(out[key], BaseException):
        raise out[key]
    return out[key]


def check_fits(request: CompressionRequest, data: DatasetSpec) -> None:
    """Fail before any training when the request asks for what this dataset cannot give."""
    resolve(request.model, data)  # the family's columns (item_id, history) exist
    for name in request.budget.metrics:
        match = METRIC_NAME.match(name)
        assert match is not None  # the type validated the names
        column = match.group(5)
        if column is not None and column not in data.segments:
            raise ValueError(f"budget.metrics[{name!r}]: {column!r} is not a segment column of "
                             f"dataset {data.name} (segments: {list(data.segments)}); name one "
                             "of them or add it to the dataset spec's segments")
        if match.group(1).startswith("ndcg") and request.model.problem_kind() == "ranking" \
                and data.query_id is None:
            raise ValueError(f"budget.metrics[{name!r}]: NDCG of a ranker is computed per "
                             f"query/session, and dataset {data.name} sets no query_id column")


def outcome(graph: Graph, out: dict[str, Any], cid: str,
            ) -> tuple[CandidateResult | BaseException, list[Built]]:
    """Candidate `cid`'s result, or the first error of its chain (the nodes after a failed
    one never run), and the models its chain built."""
    planned = graph.candidates[cid]
    chain = [out[k] for k in planned.chain]
    cause = next((o for o in chain if isinstance(o, BaseException)), None)
    return (out[planned.evaluation] if cause is None else cause,
            [b for b in chain if isinstance(b, Built)])


def wanted(graph: Graph, ids: Sequence[str]) -> list[str]:
    """The keys whose outputs `outcome` reads for the candidates `ids`."""
    return [k for c in ids for k in (*graph.candidates[c].chain, graph.candidates[c].evaluation)]


def collect(graph: Graph, out: dict[str, Any], ids: Sequence[str], executed: Executed,
            log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
    """Sort the candidates `ids` into results, failures and skips: a default candidate the
    user never chose that cannot apply to this model is skipped, as is a stage that cannot
    run on these workers (StageSkipped)."""
    r = graph.request
    defaults = r.candidates == default_candidates(r.model.family)  # (the UI form sends them)
    for cid in ids:
        result, executed.models[cid] = outcome(graph, out, cid)
        if not isinstance(result, BaseException):
            executed.results.append(result)
        elif isinstance(result, StageSkipped) or (defaults and isinstance(result, NotApplicable)):
            executed.skipped[cid] = str(result)
            log.warning("candidate %s skipped: %s", cid, result)
        else:
            executed.failures[cid] = f"{type(result).__name__}: {result}"
            log.error("candidate %s failed: %s", cid, result)


Search = Callable[[Graph, Executor, Executed], None]


def searches(request: CompressionRequest, nas: Search, recipe: Search) -> Search | None:
    """The searches a request asks for (NAS, then the recipe search), as one `Search`."""
    chosen = [s for s, on in ((nas, request.nas is not None), (recipe, request.search is not None))
              if on]
    if not chosen:
        return None

    def run(graph: Graph, executor: Executor, executed: Executed) -> None:
        for search in chosen:
            search(graph, executor, executed)
    return run


def run_plan(graph: Graph, executor: Executor, search: Search | None = None) -> Executed:
    """The request's graph, run by `executor`: see the module docstring. `search` (NAS, the
    recipe search: `tasks.recipe.searches`) adds candidates to the graph, runs them, and
    leaves its picks in `executed.results`."""
    r, log = graph.request, executor.log
    out = executor.run(graph, [graph.dataset])
    dataset = _value(out, graph.dataset)
    check_fits(r, dataset.spec)
    out = executor.run(graph, [graph.baseline])
    baseline = _value(out, graph.baseline)  # a failed baseline raises its own error
    out = executor.run(graph, [graph.baseline_evaluation])
    evaluation = _value(out, graph.baseline_evaluation)
    # before any compression: a baseline worth compressing, budgets the test split resolves
    warnings = resolution_warnings(evaluation.resolution, r.budget.confidence)
    for warning in warnings:
        log.warning(warning)
    executed = Executed(graph, dataset, baseline, evaluation, warnings)
    executed.stop = preflight(evaluation.trivial, evaluation.resolution, r.budget,
                              r.require_useful_baseline, evaluation.metrics)
    if executed.stop is not None:
        log.error("stopped before compression: %s", executed.stop)
        return executed
    ids = list(graph.candidates)
    out = executor.run(graph, wanted(graph, ids))
    collect(graph, out, ids, executed, log)
    if search is not None:
        search(graph, executor, executed)
    if executed.results:  # latency: every candidate side by side with the baseline
        executed.results = executor.time(graph, baseline, executed.results, dataset)
    return executed


class LocalExecutor:
    """Every node in this process, in plan order, through the same task functions as the
    flow's (their `.fn`), against `store` (default: a fresh `MemoryStore`). Nothing cached
    across runs: a bench always measures."""

    def __init__(self, store: BlobStore | None = None,
                 log: logging.Logger | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.log = log or logging.getLogger("recsqueeze")
        self.outputs: dict[str, Any] = {}

    def run(self, graph: Graph, keys: Sequence[str]) -> dict[str, Any]:
        with using_store(self.store):
            for key in self._needed(graph, keys):
                node = graph.nodes[key]
                failed = next((self.outputs[p] for p in node.parents
                               if isinstance(self.outputs[p], BaseException)), None)
                if failed is not None:
                    self.outputs[key] = failed
                    continue
                fn, args = node_call(graph, node, self.outputs.__getitem__)
                try:
                    self.outputs[key] = fn.fn(**args)
                except Exception as exc:  # noqa: BLE001 (a node's failure is its outcome)
                    self.outputs[key] = exc
        return self.outputs

    def _needed(self, graph: Graph, keys: Sequence[str]) -> list[str]:
        want: set[str] = set()
        stack = [k for k in keys if k not in self.outputs]
        while stack:
            key = stack.pop()
            if key in want or key in self.outputs:
                continue
            want.add(key)
            stack.extend(graph.nodes[key].parents)
        return [k for k in graph.nodes if k in want]  # plan order: parents first

    def time(self, graph: Graph, baseline: Built, results: list[CandidateResult],
             dataset: DatasetRef) -> list[CandidateResult]:
        with using_store(self.store):
            return time_candidates.fn(baseline, results, dataset,
                                      graph.request.resources.timing_seconds,
                                      graph.request.resources.serving_device)


def fingerprint(executed: Executed) -> dict[str, object]:
    """What must not depend on where, how or by which executor a plan ran: the sha256 of
    every model it built and every candidate's measured quality and size."""
    return {
        "baseline": executed.baseline.model.sha256,
        "baseline_metrics": executed.evaluation.metrics.model_dump(mode="json",
                                                                   exclude={"latency"}),
        "candidates": {r.candidate.id: {
            "models": [b.model.sha256 for b in executed.models[r.candidate.id]],
            "size_bytes": r.metrics.size_bytes,
            "quality": {k: v.model_dump(mode="json") for k, v in r.metrics.quality.items()},
            "deltas": [d.model_dump(mode="json") for d in r.deltas]} for r in executed.results},
        "skipped": sorted(executed.skipped), "failures": executed.failures}
