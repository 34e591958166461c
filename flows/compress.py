"""The main flow, read as the recipe: plan -> execute -> gate -> promote -> publish.

The plan graph (tasks.plan) holds every computation; the Prefect-on-Ray executor
(flows.execute) runs each node as a task on the cluster, cached in S3 by content; the
procedure (tasks.execute.run_plan), the gate, the records and the report are shared with the
in-process executor that `recsqueeze bench` uses.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import get_run_context
from prefect_ray.context import remote_options

from cluster.resources import check_fits_cluster, stage_options
from cluster.runner import ray_task_runner
from flows.execute import PrefectExecutor
from flows.nas import nas_subflow
from flows.recipe import recipe_subflow
from infra.settings import Settings
from tasks.artifacts import ArtifactStore
from tasks.execute import Executed, run_plan, searches
from tasks.gate import Champion, decide
from tasks.modelimport import resolve_baseline
from tasks.models import resolve
from tasks.plan import plan
from tasks.records import gate_report, version_record, write_report
from tasks.registry import AliasMoved, Registry
from tasks.run import evaluate_champion, promote
from tasks.types import CompressionRequest, GateReport


def cluster_runner() -> Any:
    """The Ray cluster the settings name (RECSQUEEZE_RAY_ADDRESS), if any: deployed runs
    (subprocesses of `flows.deployments`) run their tasks there. Without one, Prefect's
    default; `flows.driver.run_compress` always passes its own runner."""
    settings = Settings()
    if not settings.ray_address:
        return None
    return ray_task_runner(settings.ray_address, settings.ray_node_ip, settings.worker_env())


@flow(name="compress", validate_parameters=True, task_runner=cluster_runner())
def compress(request: CompressionRequest) -> GateReport:
    log = get_run_logger()
    run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    store = ArtifactStore(Settings())
    store.put_json(f"runs/{run_id}/request.json", request.model_dump(mode="json"))
    request, imported = resolve_baseline(store, request)  # an imported model, if it names one
    check_fits_cluster(request.resources.cpus_per_stage, request.resources.gpus_per_stage,
                       request.resources.serving_device)

    # 1. plan and execute: data, baseline, its checks, every candidate, NAS, latency
    executor = PrefectExecutor(refresh=not request.reuse_results)
    graph = plan(request, workers=len(executor.workers), imported=imported)
    executed = run_plan(graph, executor, searches(request, nas_subflow, recipe_subflow))
    if executed.stop is not None:
        return publish(store, gate_report(run_id, executed, None))

    # 2. gate: the candidates against the baseline and the production champion, measured on
    #    the same rows (a champion that cannot be measured blocks promotion)
    version = Registry(store).alias(request.model_name)
    champion = measure_champion(executed, version)
    verdict = decide(executed.evaluation.metrics, champion, executed.results, request.budget)
    report = gate_report(run_id, executed, verdict)

    # 3. promote at most one: a compare-and-swap on the production version the gate measured
    if verdict.promote and request.promote and verdict.chosen is not None:
        report = promote_chosen(report, executed, verdict.chosen, version)
    elif verdict.chosen and not request.promote:
        report = report.model_copy(update={"reason": "promotion disabled by the request"})

    # 4. publish
    log.info("%s: %s", report.status, report.promoted.uri if report.promoted else report.reason)
    return publish(store, report)


def measure_champion(executed: Executed, version: int | None) -> Champion | None:
    """The production model on this run's test rows (never cached), or None without one."""
    if version is None:
        return None
    r = executed.graph.request
    with remote_options(**stage_options(r.resources.cpus_per_stage, 0, 0)):
        champion: Champion = evaluate_champion.submit(
            r.model_name, version, executed.dataset, executed.evaluation,
            resolve(r.model, executed.dataset.spec)).result()
    if champion.problem:
        get_run_logger().error("%s", champion.problem)
    return champion


def promote_chosen(report: GateReport, executed: Executed, candidate: str,
                   version: int | None) -> GateReport:
    """Publish `candidate` as a new registry version, moving production only if it is still
    `version`; the report says what happened."""
    chosen = next(r for r in executed.results if r.candidate.id == candidate)
    record = version_record(report, executed, candidate)
    state = promote(report.model_name, chosen, record, report.run_id, version, return_state=True)
    promotion = state.result(raise_on_failure=False)
    if isinstance(promotion, AliasMoved):  # another run promoted since we measured
        get_run_logger().error("not promoted: %s", promotion)
        return report.model_copy(update={"reason": str(promotion)})
    if isinstance(promotion, BaseException):
        raise promotion
    return report.model_copy(update={"promoted": promotion, "status": "promoted"})


def publish(store: ArtifactStore, report: GateReport) -> GateReport:
    """The run's files in S3 (tasks.records.write_report), and the same as Prefect artifacts:
    the UI gets the plot itself, never a presigned link."""
    text, png = write_report(store, report)
    rows = [row.model_dump(mode="json") for row in report.leaderboard]
    if png is not None:
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                              key="pareto", description=f"{report.model_name}: size vs "
                                                        f"{report.baseline.main}")
    if rows:
        create_table_artifact(key="leaderboard", table=rows,
                              description=f"{report.model_name}: candidates vs baseline")
    create_markdown_artifact(key="compression-report", markdown=text,
                             description=f"{report.model_name}: {report.status}")
    return report
