"""The promotion rule's numbers: per-metric loss budgets and constraints (see
`tasks.gate.decide`), and the metric names a budget may use."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.types.base import Frozen

METRIC_NAME = re.compile(r"^(main|auc|logloss|(ndcg|recall|hr)@([1-9][0-9]{0,3}))"
                         r"(\[([^=\[\]]+)=([^\[\]]+)\])?$")


def budget_target(name: str, main: str) -> str:
    """The measured metric a budget key names: 'main' is the model's main metric `main`
    (auc, recall@50, ndcg@10); 'main[item_popularity=tail]' that metric on one segment."""
    return main + name[4:] if name.startswith("main") else name


DEFAULT_KS = (10, 50)
"""The K of @K metrics every evaluation measures (besides those a budget names)."""


def budget_ks(names: object) -> tuple[int, ...]:
    """The K of every @K metric among `names` (evaluations measure these too)."""
    found = (METRIC_NAME.match(str(n)) for n in names)  # type: ignore[attr-defined]
    return tuple(sorted({int(m.group(3)) for m in found if m and m.group(3)}))


class MetricBudget(Frozen):
    max_drop: float = Field(description="largest tolerated loss (absolute, or a fraction)")
    relative: bool = Field(False, description="max_drop is a fraction of the baseline value")

    @field_validator("max_drop")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"max_drop must be >= 0 (got {v}); it is the largest tolerated loss")
        return v

    @model_validator(mode="after")
    def _fraction(self) -> MetricBudget:
        if self.relative and self.max_drop >= 1:
            raise ValueError(f"max_drop is a fraction of the baseline's value when relative is "
                             f"true and must be < 1 (got {self.max_drop}); e.g. 0.001 = 0.1%")
        return self


class Budget(Frozen):
    """What a candidate must satisfy to be promoted (see `tasks.gate.decide`)."""

    metrics: dict[str, MetricBudget] = Field(
        default_factory=lambda: {"main": MetricBudget(max_drop=0.001, relative=True)},
        description="per-metric loss budgets, judged on the upper confidence bound of the "
        "loss: 'main' (the model's main metric: auc, recall@50 or ndcg@10), auc (paired "
        "DeLong), logloss (a rise), ndcg@K, recall@K, hr@K (paired bootstrap); append "
        "[COLUMN=VALUE] to budget one segment, e.g. 'auc[item_popularity=tail]'",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="one-sided confidence level")
    strict_resolution: bool = Field(
        False, description="refuse the run (instead of warning) when a budget is below the "
        "smallest loss the test split can resolve at this confidence")
    max_size_bytes: int | None = Field(None, gt=0, description="size constraint")
    min_size_ratio: float | None = Field(None, gt=0, description="baseline bytes / candidate")
    max_p99_ms: float | None = Field(None, gt=0, description="p99 latency constraint (ms)")
    min_latency_ratio: float | None = Field(
        None, gt=0, description="the candidate must be this many times faster than the "
        "baseline at latency_batch_size (baseline p99 / candidate p99), judged on the lower "
        "end of the ratio's 95% interval")
    latency_batch_size: int = Field(512, description="batch size of the latency constraint")
    objective: Literal["smallest", "fastest", "best_quality"] = Field(
        "smallest", description="how to pick among passing candidates; with a constraint it "
        "makes both hold: smallest + min_latency_ratio k = the smallest of those at least k "
        "times faster, fastest + min_size_ratio k = the fastest of those at least k times "
        "smaller (docs/search.md)"
    )

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, metrics: dict[str, MetricBudget]) -> dict[str, MetricBudget]:
        bad = [name for name in metrics if not METRIC_NAME.match(name)]
        if bad:
            raise ValueError(
                f"budget.metrics: unknown metric name(s) {bad}; use main, auc, logloss, "
                "ndcg@K, recall@K or hr@K, optionally with a segment: 'auc[COLUMN=VALUE]'")
        return metrics
