"""The recipe search as a subflow of compress (its own run in the UI, under the compress run;
its trials are tasks on the same Ray cluster): tasks.recipe on the run's graph and executor,
with a progress artifact, a table of every trial and the search's Pareto plot. Its front
joins the candidates the gate judges."""

from __future__ import annotations

import base64

from prefect import flow
from prefect.artifacts import (
    create_image_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context

from tasks.execute import Executed, Executor
from tasks.plan import Graph
from tasks.recipe import run_search
from tasks.search_report import search_png, trial_rows


def recipe_subflow(graph: Graph, executor: Executor, executed: Executed) -> None:
    """Run the search in a `recipe-search` subflow on a copy of this run's task runner."""
    search = graph.request.search
    assert search is not None
    runner = get_run_context().task_runner.duplicate()  # type: ignore[union-attr]

    @flow(name="recipe-search", task_runner=runner)
    def recipe_search() -> None:
        progress = create_progress_artifact(
            progress=0.0, key="search-progress",
            description=f"recipe search ({', '.join(search.objectives)}): trials done of "
                        f"{search.trials}")
        report = run_search(
            graph, executor, executed,
            lambda pct: progress is not None and update_progress_artifact(progress, pct))
        if report.trials:
            create_table_artifact(key="search-trials", table=trial_rows(report),
                                  description="every recipe-search trial (valid split)")
        png = search_png(report)
        if png is not None:
            create_image_artifact(
                image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                key="search-pareto", description="recipe search: size vs valid-split loss")
        executed.search = report

    recipe_search()
