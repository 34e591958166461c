"""The NAS search, a subflow of compress: generations of `nas_trial` stage tasks fan out
on Ray (up to `parallelism` at once), each trial evaluated like any candidate; the search stops
at its trial budget or its wall-clock budget, and its Pareto front goes to the gate."""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect_ray.context import remote_options

from cluster.resources import stage_options
from infra.settings import Settings
from tasks.nas import Search, fitness
from tasks.run import Built, Evaluated, cached, evaluate_candidate, result_storage, run_stage
from tasks.types import (
    Candidate,
    CandidateResult,
    CompressionRequest,
    DatasetRef,
    NASTrialConfig,
    TableSpec,
)


@flow(name="nas", validate_parameters=False)
def nas_search(request: CompressionRequest, tables: tuple[TableSpec, ...], baseline: Built,
               dataset: DatasetRef, base_eval: Evaluated, nodes: list[Any],
               gpus: float, ks: tuple[int, ...]) -> list[tuple[CandidateResult, Built]]:
    """The search as a Prefect subflow (its own run in the UI, under the compress run; tasks on
    the same Ray cluster). Returns every evaluated trial with the model it built; the caller
    keeps the Pareto front. Every trial is measured at the run's `ks` (the budget's @K)."""
    nas = request.nas
    assert nas is not None
    log = get_run_logger()
    res = request.resources
    storage = result_storage(Settings())
    stage_task, eval_cand = (cached(t, storage, refresh=not request.reuse_results)
                             for t in (run_stage, evaluate_candidate))
    search = Search(nas, tables)
    progress = create_progress_artifact(
        progress=0.0, key="nas-progress",
        description=f"NAS ({nas.strategy}): trials done of {nas.trials}")
    results: list[tuple[CandidateResult, Built]] = []
    done, generation, start = 0, 0, time.monotonic()
    while done < nas.trials and time.monotonic() - start < nas.max_wall_s:
        specs = search.propose(min(nas.parallelism, nas.trials - done))
        if not specs:
            log.info("NAS: the space has no untried architecture left")
            break
        generation += 1
        pending = []
        for i, spec in enumerate(specs):
            cfg = NASTrialConfig(student=spec, steps=nas.steps)
            cand = Candidate(id=f"nas-{done + i + 1}", plan=(cfg,))
            node = nodes[(done + i) % len(nodes)]
            with remote_options(**stage_options(res.cpus_per_stage, res.gpus_per_stage, gpus,
                                                node)):
                built = stage_task.submit(baseline, cfg, dataset, request.train.seed)
            with remote_options(**stage_options(res.cpus_per_stage, 0, 0, node)):
                pending.append((spec, cand, built, eval_cand.submit(
                    cand, built, dataset, baseline, base_eval, request.budget.confidence, ks)))
        for spec, cand, built, fut in pending:  # a generation runs in parallel; await it all
            cause = built.result(raise_on_failure=False)
            out = cause if isinstance(cause, BaseException) else fut.result(
                raise_on_failure=False)
            if isinstance(out, BaseException):
                log.error("NAS trial %s failed: %s", cand.id, out)
                search.tell(spec, -math.inf)
                continue
            results.append((out, cause))
            search.tell(spec, fitness(out, base_eval.metrics.size_bytes))
        done += len(specs)
        log.info("NAS generation %d: %d/%d trials, %.0fs", generation, done, nas.trials,
                 time.monotonic() - start)
        if progress is not None:
            update_progress_artifact(progress, progress=100.0 * done / nas.trials)
    return results
