"""The Prefect-on-Ray executor of the plan graph (tasks.plan, tasks.execute).

Every node is a Prefect task on the Ray cluster, submitted in plan order with its resources
at the call site (`remote_options`), placed softly on the worker its placement hint names,
and cached in S3 under its content key (tasks.cache). Submitting returns at once; `run`
waits only for the keys asked for, so independent nodes run in parallel on the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect_ray.context import remote_options

from cluster.resources import (
    cluster_gpus,
    exclusive_options,
    gpu_node,
    stage_options,
    worker_nodes,
)
from infra.settings import Settings
from tasks.cache import cached, result_storage
from tasks.execute import node_call
from tasks.plan import Graph
from tasks.run import log_io, log_node, time_candidates
from tasks.runtime import Built
from tasks.types import CandidateResult, DatasetRef


def run_name(task_name: str, key: str) -> Callable[[], str]:
    """A task run's name: Prefect's `<task>-<suffix>` with the head of its node's content key
    as the suffix, so `flows.progress` finds the node in its copy of the plan. (No tags: a
    tagged task asks the API for tag concurrency slots before it runs.)"""
    return lambda: f"{task_name}-{key[:8]}"


class PrefectExecutor:
    """Runs a graph's nodes as Prefect tasks of the current flow run (on its task runner)."""

    def __init__(self, refresh: bool) -> None:
        self.refresh = refresh  # recompute and overwrite cached results
        self.storage = result_storage(Settings())
        self.log = get_run_logger()
        self.gpus = cluster_gpus()
        self.workers: list[Any] = worker_nodes() or [None]
        self.futures: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}  # node key -> its result, or what ended it
        self.progress_id: UUID | None = None

    def submit(self, graph: Graph, keys: Sequence[str]) -> list[str]:
        """Submit `keys` and the nodes they need that are not submitted yet, parents first;
        every key they need, in plan order."""
        want: set[str] = set()
        stack = list(keys)
        while stack:
            key = stack.pop()
            if key not in want:
                want.add(key)
                stack.extend(graph.nodes[key].parents)
        needed = [k for k in graph.nodes if k in want]
        for key in (k for k in needed if k not in self.futures):
            node = graph.nodes[key]
            fn, args = node_call(graph, node, self.futures.__getitem__)
            worker = None if node.placement is None else \
                self.workers[node.placement % len(self.workers)]
            task_ = cached(fn, self.storage, self.refresh, key).with_options(
                task_run_name=run_name(fn.name, key), on_running=[log_node],
                on_completion=[log_io])
            with remote_options(**stage_options(node.cpus, node.gpus, self.gpus, worker)):
                self.futures[key] = task_.submit(**args)
        return needed

    def run(self, graph: Graph, keys: Sequence[str]) -> dict[str, Any]:
        for key in self.submit(graph, keys):
            if key in self.outputs:
                continue
            # a task after a failed one never runs (it stays Pending): it ends with the failure
            failed = next((self.outputs[p] for p in graph.nodes[key].parents
                           if isinstance(self.outputs[p], BaseException)), None)
            self.outputs[key] = failed if failed is not None else \
                self.futures[key].result(raise_on_failure=False)
            self._progress(graph)
        return {k: self.outputs[k] for k in keys}

    def _progress(self, graph: Graph) -> None:
        """The run's progress artifact (the UI's bar): plan nodes finished / planned."""
        done = 100.0 * len(self.outputs) / max(len(graph.nodes), 1)
        about = f"{len(self.outputs)} of {len(graph.nodes)} plan nodes finished"
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(done, key="compress-progress",
                                                        description=about)
        else:
            update_progress_artifact(self.progress_id, done, description=about)

    def time(self, graph: Graph, baseline: Built, results: list[CandidateResult],
             dataset: DatasetRef) -> list[CandidateResult]:
        """In one task that holds every CPU of its node, started once every other task is done
        (nothing else on its cores); each ratio gets a 95% interval."""
        resources = graph.request.resources
        # on a GPU node, holding one of its GPUs, when the candidates are served on GPUs
        gpu = resources.serving_device != "cpu" and self.gpus > 0
        node = gpu_node() if gpu else self.workers[0]
        with remote_options(**exclusive_options(node, gpus=1.0 if gpu else 0.0)):
            return time_candidates.submit(  # type: ignore[no-any-return]
                baseline, results, dataset, resources.timing_seconds,
                resources.serving_device).result()
