"""The main flow: dataset -> baseline -> candidates on Ray -> evaluate -> gate -> promote.

Reads top to bottom as the procedure it runs. Every stage application is one Prefect task on
the Ray cluster, with its resources at the call site; shared plan prefixes run once.
"""

from __future__ import annotations

import base64
import subprocess
from itertools import accumulate
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import get_run_context
from prefect_ray.context import remote_options

from cluster.resources import (
    check_fits_cluster,
    cluster_gpus,
    exclusive_options,
    stage_options,
    worker_nodes,
)
from cluster.runner import ray_task_runner
from flows.nas import nas_search
from flows.report import leaderboard, markdown, model_card, pareto_png
from infra.settings import Settings
from tasks.artifacts import AliasMoved, ArtifactStore, Registry
from tasks.defaults import default_candidates
from tasks.gate import decide, preflight, resolution_warnings
from tasks.models import resolve
from tasks.nas import pareto
from tasks.objectives import DEFAULT_KS
from tasks.run import (
    Built,
    cached,
    calibrate_model,
    evaluate_baseline,
    evaluate_candidate,
    evaluate_champion,
    prepare_dataset,
    promote,
    result_storage,
    run_stage,
    time_candidates,
    train_baseline,
)
from tasks.stages.context import NotApplicable, StageSkipped
from tasks.types import (
    METRIC_NAME,
    CandidateResult,
    CompressionRequest,
    DatasetSpec,
    GateReport,
    budget_ks,
)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class Resolved:
    """A value where a future is expected (a subflow returns values, not futures)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, raise_on_failure: bool = True) -> Any:
        return self.value


def _first_error(futures: list[Any]) -> BaseException | None:
    for fut in futures:
        out = fut.result(raise_on_failure=False)
        if isinstance(out, BaseException):
            return out
    return None


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
        if match.group(1).startswith("ndcg") and request.model.task_kind() == "ranking" \
                and data.query_id is None:
            raise ValueError(f"budget.metrics[{name!r}]: NDCG of a ranker is computed per "
                             f"query/session, and dataset {data.name} sets no query_id column")


def cluster_runner() -> Any:
    """The Ray cluster the settings name (RECSQUEEZE_RAY_ADDRESS), if any: deployed runs
    (subprocesses of `flows.deployments`) run their tasks there. Without one, Prefect's
    default; `flows.driver.run_compress` always passes its own runner."""
    settings = Settings()
    if not settings.ray_address:
        return None
    return ray_task_runner(settings.ray_address, settings.ray_node_ip, settings.public_env())


@flow(name="compress", validate_parameters=True, task_runner=cluster_runner())
def compress(request: CompressionRequest) -> GateReport:
    log = get_run_logger()
    run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    settings = Settings()
    store = ArtifactStore(settings)
    registry = Registry(store)
    store.put_json(f"runs/{run_id}/request.json", request.model_dump(mode="json"))
    # every task but `promote` is cached in S3 by its inputs and code (see tasks.run.cached)
    storage = result_storage(settings)
    # (the champion is never served from cache: its bytes are verified on every run)
    prepare, train_base, eval_base, calibrate_, stage_task, eval_cand = (
        cached(t, storage, refresh=not request.reuse_results)
        for t in (prepare_dataset, train_baseline, evaluate_baseline, calibrate_model, run_stage,
                  evaluate_candidate))
    res = request.resources
    check_fits_cluster(res.cpus_per_stage, res.gpus_per_stage)
    gpus = cluster_gpus()
    opts = stage_options(res.cpus_per_stage, res.gpus_per_stage, gpus)
    cpu_opts = stage_options(res.cpus_per_stage, 0, 0)
    nodes = worker_nodes() or [None]

    # 1. data and baseline
    with remote_options(**cpu_opts):
        dataset = prepare.submit(request.dataset).result()
    check_fits(request, dataset.spec)
    ks = tuple(sorted({*DEFAULT_KS, *budget_ks(request.budget.metrics)}))
    with remote_options(**opts):
        baseline = train_base.submit(request.model, dataset, request.train)
    baseline.result()  # a failed baseline raises its own error, not its evaluation's "not ready"
    with remote_options(**cpu_opts):
        base_eval = eval_base.submit(baseline, dataset, ks, request.budget)
    base_evaluated = base_eval.result()

    # 1b. before any compression: a baseline worth compressing, budgets the test split resolves
    warnings = resolution_warnings(base_evaluated.resolution, request.budget.confidence)
    for warning in warnings:
        log.warning(warning)
    stop = preflight(base_evaluated.trivial, base_evaluated.resolution, request.budget,
                     request.require_useful_baseline, base_evaluated.metrics)
    if stop is not None:
        log.error("stopped before compression: %s", stop)
        report = GateReport(
            run_id=run_id, model_name=request.model_name, dataset=dataset,
            baseline=base_evaluated.metrics, leaderboard=(), chosen=None, promoted=None,
            status="stopped", reason=stop, trivial=base_evaluated.trivial,
            resolution=base_evaluated.resolution, warnings=warnings)
        publish(store, report)
        return report

    # 2. calibrate once (if any plan needs it), then every candidate's stages, chained; a
    #    prefix shared by several plans runs once
    calibration = None
    if any(stage.needs_calibration() for cand in request.candidates for stage in cand.plan):
        with remote_options(**cpu_opts):
            calibration = calibrate_.submit(baseline, dataset, request.calibrate)
    builds: dict[tuple[str, ...], Any] = {}
    chains: dict[str, list[Any]] = {}  # each candidate's upstream futures, in order
    evaluations = []
    for i, cand in enumerate(request.candidates):
        node = nodes[i % len(nodes)]  # deal candidates round-robin over the nodes
        parent, prefix = baseline, ()
        for stage in cand.plan:
            prefix = (*prefix, stage.model_dump_json())
            if prefix not in builds:
                placed = stage_options(res.cpus_per_stage, res.gpus_per_stage, gpus, node)
                with remote_options(**placed):
                    builds[prefix] = stage_task.submit(
                        parent, stage, dataset, request.train.seed,
                        calibration if stage.needs_calibration() else None, request.budget)
            parent = builds[prefix]
        chain = [builds[p] for p in accumulate((s.model_dump_json(),) for s in cand.plan)]
        needs_calibration = any(s.needs_calibration() for s in cand.plan)
        chains[cand.id] = [calibration, *chain] if needs_calibration else chain
        with remote_options(**stage_options(res.cpus_per_stage, 0, 0, node)):
            evaluations.append(eval_cand.submit(
                cand, parent, dataset, baseline, base_eval, request.budget.confidence, ks,
                timed=False))

    # 3. the production champion, measured on the same rows (or its problem, which blocks
    #    promotion); promotion later is a compare-and-swap on this version
    champion = None
    version = registry.alias(request.model_name)
    if version is not None:
        with remote_options(**cpu_opts):
            champion = evaluate_champion.submit(request.model_name, version, dataset,
                                                base_evaluated,
                                                resolve(request.model, dataset.spec)).result()
        if champion.problem:
            log.error("%s", champion.problem)
    defaults = request.candidates == default_candidates(request.model.family)

    results: list[CandidateResult] = []
    failures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for cand, fut in zip(request.candidates, evaluations):
        chain = chains[cand.id]
        cause = _first_error(chain)  # tasks after a failed one never run: ask in order
        out = fut.result(raise_on_failure=False) if cause is None else cause
        if not isinstance(out, BaseException):
            results.append(out)
            continue
        cause = out
        # a default candidate the user never chose that cannot apply to this model is skipped
        if isinstance(cause, StageSkipped) or (defaults and isinstance(cause, NotApplicable)):
            skipped[cand.id] = str(cause)
            log.warning("candidate %s skipped: %s", cand.id, cause)
        else:
            failures[cand.id] = f"{type(cause).__name__}: {cause}"
            log.error("candidate %s failed: %s", cand.id, cause)

    # 3b. architecture search: its Pareto front (quality, size, p99) joins the candidates
    if request.nas is not None:
        # the subflow's own runner, a copy of this run's: the same Ray cluster (prefect-ray
        # joins the connection this process already has, and leaves it open)
        runner = get_run_context().task_runner.duplicate()  # type: ignore[union-attr]
        tables = resolve(request.model, dataset.spec).tables
        built_trials = nas_search.with_options(task_runner=runner)(
            request, tables, baseline.result(), dataset, base_evaluated, nodes, gpus, ks)
        trials = [r for r, _ in built_trials]
        for r, b in built_trials:
            chains[r.candidate.id] = [Resolved(b)]
        front = pareto(trials)
        log.info("NAS: %d trials, Pareto front %s", len(trials), [r.candidate.id for r in front])
        if trials:
            create_table_artifact(key="nas-trials", table=[{
                "trial": r.candidate.id, "architecture": r.candidate.label(),
                "params": r.metrics.params, "size_bytes": r.metrics.size_bytes,
                r.metrics.main: r.metrics.value(), "p99_ms": r.metrics.p99_ms(512),
                "on_front": r in front} for r in trials], description="every NAS trial")
        results.extend(front)

    # 3c. latency: every candidate timed side by side with the baseline, in one task that
    #     holds all CPUs of its node once every other task is done (nothing else on its
    #     cores); each ratio gets a 95% interval, and latency constraints judge its low end
    if results:
        with remote_options(**exclusive_options(nodes[0])):
            results = time_candidates.submit(baseline, results, dataset,
                                             res.timing_seconds).result()

    # 4. gate, then promote at most one
    verdict = decide(base_evaluated.metrics, champion, results, request.budget)
    rows = leaderboard(base_evaluated.metrics, results, verdict)
    report = GateReport(
        run_id=run_id, model_name=request.model_name, dataset=dataset,
        baseline=base_evaluated.metrics, leaderboard=rows, chosen=verdict.chosen, promoted=None,
        status="not_promoted", reason=verdict.reason, failures=failures,
        skipped=skipped, trivial=base_evaluated.trivial, resolution=base_evaluated.resolution,
        warnings=warnings,
    )
    if verdict.promote and request.promote and verdict.chosen is not None:
        chosen = next(r for r in results if r.candidate.id == verdict.chosen)
        row = next(r for r in rows if r.candidate == verdict.chosen)
        files = {
            "spec.json": {"candidate": chosen.candidate.model_dump(mode="json"),
                          "dataset_spec": dataset.spec.model_dump(mode="json")},
            "metrics.json": {"metrics": chosen.metrics.model_dump(mode="json"),
                             "deltas": [d.model_dump(mode="json") for d in chosen.deltas],
                             "baseline": base_evaluated.metrics.model_dump(mode="json")},
            "lineage.json": {
                "run_id": run_id, "code_git_sha": code_version(),
                "dataset": {"uri": dataset.uri, "sha256": dataset.sha256},
                "request": request.model_dump(mode="json"),
                "plan": [s.model_dump(mode="json") for s in chosen.candidate.plan],
                "seeds": {"train": request.train.seed, "data": request.dataset.seed},
                "parent": baseline.result().model.model_dump(mode="json"),
                "ray_node": chosen.node_ip, "wall_s": chosen.wall_s,
                # every model from the baseline to this one: where, how long, on what
                "chain": [baseline.result().lineage(), *(
                    b.lineage() for b in (f.result() for f in chains[chosen.candidate.id])
                    if isinstance(b, Built))],
                "metrics": chosen.metrics.model_dump(mode="json"),
                "deltas": [d.model_dump(mode="json") for d in chosen.deltas],
            },
            "card.md": model_card(report, row),
            "pareto.png": pareto_png(report),
        }
        state = promote(request.model_name, chosen, files, run_id, version, return_state=True)
        promotion = state.result(raise_on_failure=False)
        if isinstance(promotion, AliasMoved):  # another run promoted since we measured
            log.error("not promoted: %s", promotion)
            report = report.model_copy(update={"reason": str(promotion)})
        elif isinstance(promotion, BaseException):
            raise promotion
        else:
            report = report.model_copy(update={"promoted": promotion, "status": "promoted"})
    elif verdict.chosen and not request.promote:
        report = report.model_copy(update={"reason": "promotion disabled by the request"})

    # 5. publish
    publish(store, report)
    log.info("%s: %s", report.status, report.promoted.uri if report.promoted else report.reason)
    return report


def publish(store: ArtifactStore, report: GateReport) -> None:
    """Leaderboard (Parquet + JSON) and markdown report in S3, and as Prefect artifacts."""
    rows = [row.model_dump(mode="json") for row in report.leaderboard]
    base = f"runs/{report.run_id}"
    if rows:
        table = pa.Table.from_pylist([{**r, "reasons": "; ".join(r["reasons"])} for r in rows])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        store.s3.put_object(Bucket=store.bucket, Key=f"{base}/leaderboard.parquet",
                            Body=sink.getvalue().to_pybytes())
    store.put_json(f"{base}/report.json", report.model_dump(mode="json"))
    text = markdown(report)
    if rows:
        png = pareto_png(report)
        store.s3.put_object(Bucket=store.bucket, Key=f"{base}/pareto.png", Body=png,
                            ContentType="image/png")
        # no presigned link anywhere persistent (it carries the access key id and a
        # signature): the UI gets the image itself, the report a link relative to its folder
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                              key="pareto", description=f"{report.model_name}: size vs "
                                                        f"{report.baseline.main}")
        text += (f"\n![size vs {report.baseline.main}, Pareto front](pareto.png)\n\n"
                 f"(`s3://{store.bucket}/{base}/pareto.png`)\n")
    store.put_text(f"{base}/report.md", text)
    if rows:
        create_table_artifact(key="leaderboard", table=rows,
                              description=f"{report.model_name}: candidates vs baseline")
    create_markdown_artifact(key="compression-report", markdown=text,
                             description=f"{report.model_name}: {report.status}")
