"""NAS strategies: random search and regularized evolution over a DLRM space (pure logic; the
flow runs each trial as a `nas_trial` stage task on Ray)."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass

from tasks.types import CandidateResult, DlrmSpec, NASRequest, NASSpace, TableSpec


def sample(space: NASSpace, tables: tuple[TableSpec, ...], rng: random.Random) -> DlrmSpec:
    d = rng.choice(space.embedding_dims)
    depth = rng.choice(space.top_depths)
    return DlrmSpec(
        embedding_dim=d, bottom_mlp=(rng.choice(space.bottom_widths), d),
        top_mlp=tuple(sorted((rng.choice(space.top_widths) for _ in range(depth)), reverse=True)),
        table_dims={t.name: rng.choice(space.table_dims) for t in tables
                    if space.table_dims and t.rows >= space.large_table_rows},
        interaction=rng.choice(space.interactions))


def mutate(spec: DlrmSpec, space: NASSpace, tables: tuple[TableSpec, ...],
           rng: random.Random) -> DlrmSpec:
    """Change one gene of `spec` (resampled from the space)."""
    fresh = sample(space, tables, rng)
    gene = rng.choice(["embedding_dim", "bottom_mlp", "top_mlp", "table_dims", "interaction"])
    if gene == "embedding_dim":
        d = fresh.embedding_dim
        return spec.model_copy(update={"embedding_dim": d, "bottom_mlp": (spec.bottom_mlp[0], d)})
    if gene == "bottom_mlp":
        return spec.model_copy(update={"bottom_mlp": (fresh.bottom_mlp[0], spec.embedding_dim)})
    if gene == "table_dims" and spec.table_dims:
        name = rng.choice(sorted(spec.table_dims))
        return spec.model_copy(update={"table_dims": {
            **spec.table_dims, name: rng.choice(space.table_dims)}})
    return spec.model_copy(update={gene: getattr(fresh, gene)})


def fitness(result: CandidateResult, baseline_bytes: int) -> float:
    """One number for evolution: the main metric's delta (AUC) plus 0.001 per halving of the
    size (trades 0.1% AUC, the usual budget, for 2x smaller). Higher is better."""
    delta = next(d.delta for d in result.deltas if d.metric == result.metrics.main)
    return delta + 0.001 * math.log2(baseline_bytes / result.metrics.size_bytes)


@dataclass
class Search:
    """Proposes the specs of each generation; told the results of the last one."""

    request: NASRequest
    tables: tuple[TableSpec, ...]

    def __post_init__(self) -> None:
        self.rng = random.Random(self.request.seed)
        self.population: deque[tuple[DlrmSpec, float]] = deque(maxlen=self.request.population)
        self.seen: set[str] = set()

    def propose(self, k: int) -> list[DlrmSpec]:
        out: list[DlrmSpec] = []
        for _ in range(50 * k):
            if len(out) == k:
                break
            # regularized evolution (Real et al., 2019): `population` random members first,
            # then each child is a mutation of a tournament's winner and the oldest member dies
            warm = len(self.population) >= self.request.population
            if self.request.strategy == "evolution" and warm:
                contenders = self.rng.sample(list(self.population),
                                             min(self.request.tournament, len(self.population)))
                parent = max(contenders, key=lambda pf: pf[1])[0]
                spec = mutate(parent, self.request.space, self.tables, self.rng)
            else:
                spec = sample(self.request.space, self.tables, self.rng)
            key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)  # dict order aside
            if key not in self.seen:  # never train the same architecture twice
                self.seen.add(key)
                out.append(spec)
        return out

    def tell(self, spec: DlrmSpec, score: float) -> None:
        self.population.append((spec, score))  # oldest leaves first (regularized evolution)


def pareto(results: list[CandidateResult], batch_size: int = 512) -> list[CandidateResult]:
    """Results no other beats on quality, size and p99 at once (non-dominated)."""
    def key(r: CandidateResult) -> tuple[float, float, float]:
        return (-r.metrics.value(), float(r.metrics.size_bytes),
                r.metrics.p99_ms(batch_size) or math.inf)

    keys = [key(r) for r in results]
    return [r for r, k in zip(results, keys)
            if not any(o != k and all(a <= b for a, b in zip(o, k)) for o in keys)]
