"""Architecture search on the plan graph: each generation's trials are candidates added to
the same graph (a `nas_trial` stage, then the evaluation every candidate gets) and run by
whichever executor runs the plan; the strategy (tasks.nas) is told each trial's fitness."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tasks.execute import Executed, Executor, outcome, wanted
from tasks.models import resolve
from tasks.nas import Search, fitness
from tasks.plan import Graph
from tasks.types import Candidate, CandidateResult, NASTrialConfig


def search_architectures(graph: Graph, executor: Executor, executed: Executed,
                         progress: Callable[[float], None] = lambda _: None,
                         ) -> list[CandidateResult]:
    """Generations of up to `nas.parallelism` trials until the trial or wall-clock budget
    is spent; every evaluated trial (the caller keeps the Pareto front). `progress` is told
    the share of trials done, in percent."""
    nas, log = graph.request.nas, executor.log
    assert nas is not None
    search = Search(nas, resolve(graph.request.model, executed.dataset.spec).tables)
    trials: list[CandidateResult] = []
    done, generation, start = 0, 0, time.monotonic()
    while done < nas.trials and time.monotonic() - start < nas.max_wall_s:
        specs = search.propose(min(nas.parallelism, nas.trials - done))
        if not specs:
            log.info("NAS: the space has no untried architecture left")
            break
        generation += 1
        ids = [graph.add_candidate(Candidate(
            id=f"nas-{done + i + 1}", plan=(NASTrialConfig(student=spec, steps=nas.steps),))
        ).candidate.id for i, spec in enumerate(specs)]
        out = executor.run(graph, wanted(graph, ids))  # a generation runs in parallel
        for spec, cid in zip(specs, ids):
            result, executed.models[cid] = outcome(graph, out, cid)
            if isinstance(result, BaseException):
                log.error("NAS trial %s failed: %s", cid, result)
                search.tell(spec, -math.inf)
                continue
            trials.append(result)
            search.tell(spec, fitness(result, executed.evaluation.metrics.size_bytes))
        done += len(specs)
        log.info("NAS generation %d: %d/%d trials, %.0fs", generation, done, nas.trials,
                 time.monotonic() - start)
        progress(100.0 * done / nas.trials)
    return trials
