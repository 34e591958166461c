"""The NAS search as a subflow of compress (its own run in the UI, under the compress run;
its trials are tasks on the same Ray cluster): tasks.search on the run's graph and executor,
with a progress artifact and a table of every trial. Its Pareto front joins the candidates."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context

from tasks.execute import Executed, Executor
from tasks.nas import pareto
from tasks.plan import Graph
from tasks.search import search_architectures


def nas_subflow(graph: Graph, executor: Executor, executed: Executed) -> None:
    """Run the search in a `nas` subflow on a copy of this run's task runner (prefect-ray
    joins the Ray connection this process already has), and add its front to the results."""
    nas = graph.request.nas
    assert nas is not None
    runner = get_run_context().task_runner.duplicate()  # type: ignore[union-attr]

    @flow(name="nas", task_runner=runner)
    def search() -> None:
        progress = create_progress_artifact(
            progress=0.0, key="nas-progress",
            description=f"NAS ({nas.strategy}): trials done of {nas.trials}")
        trials = search_architectures(
            graph, executor, executed,
            lambda pct: progress is not None and update_progress_artifact(progress, pct))
        front = pareto(trials)
        executor.log.info("NAS: %d trials, Pareto front %s", len(trials),
                          [r.candidate.id for r in front])
        if trials:
            create_table_artifact(key="nas-trials", table=[{
                "trial": r.candidate.id, "architecture": r.candidate.label(),
                "params": r.metrics.params, "size_bytes": r.metrics.size_bytes,
                r.metrics.main: r.metrics.value(), "p99_ms": r.metrics.p99_ms(512),
                "on_front": r in front} for r in trials], description="every NAS trial")
        executed.results.extend(front)

    search()
