"""What runs measured and decided: metrics with intervals, latencies, paired deltas against
the baseline, the baseline checks, candidate results, the leaderboard and the gate report.
Measurements may hold NaN (`Measured`): an undefined interval is reported, never passed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.types.base import ArtifactRef, Frozen, Measured
from tasks.types.data import DatasetRef
from tasks.types.search import SearchReport
from tasks.types.stages import Candidate


class Estimate(Measured):
    value: float
    ci_low: float
    ci_high: float


# what a latency recorded before the device was named was timed on
_CPU = "cpu"


class Latency(Measured):
    batch_size: int
    p50_ms: float
    p99_ms: float
    device: str = Field(_CPU, description="what it was timed on, e.g. 'cuda: NVIDIA H200' or "
                                          "'cpu: 1 thread of <CPU model>'")


class LatencyRatio(Measured):
    """Baseline p99 / candidate p99 at one batch size (> 1 = faster), timed side by side."""

    batch_size: int
    value: float = Field(description="the ratio of the pooled p99s")
    ci_low: float = Field(description="lower end of its 95% interval (bootstrap over rounds)")
    ci_high: float = Field(description="upper end of its 95% interval")
    device: str = Field(_CPU, description="what both were timed on (the serving device)")
    rounds: int = Field(description="interleaved timing rounds it took")


class Metrics(Measured):
    """What one evaluation measured on the test split (sizes and latencies measured, too)."""

    main: str = Field("auc", description="the task's main quality metric (a key of quality)")
    quality: dict[str, Estimate] = Field(
        description="every quality metric with a 95% interval: auc (DeLong), ndcg@K, "
        "recall@K, hr@K (normal interval of the per-row mean), and the same per segment "
        "value, e.g. 'auc[item_popularity=tail]'")
    logloss: float | None = Field(None, description="ranking only: mean binary cross-entropy")
    rows: int = Field(description="evaluated rows")
    size_bytes: int = Field(description="bytes of the serialized model artifact")
    params: int = Field(description="stored weight elements (parameters + buffers)")
    latency: tuple[Latency, ...] = Field(description="CPU forward latency per batch size")

    def value(self, metric: str | None = None) -> float:
        return self.quality[metric or self.main].value

    def p99_ms(self, batch_size: int) -> float | None:
        return next((lat.p99_ms for lat in self.latency if lat.batch_size == batch_size), None)


class PairedDelta(Measured):
    """Candidate vs baseline on the same rows; loss = baseline - candidate (higher-is-better)."""

    metric: str
    delta: float = Field(description="candidate - baseline (negative = a loss)")
    loss_ci_high: float = Field(description="upper confidence bound of the loss")
    baseline: float = Field(description="baseline value, for relative budgets")


class TrivialBaseline(Measured):
    """A predictor that needs no model, against the baseline on the same test rows."""

    name: str = Field(description="global_ctr, item_ctr (ranking) or popularity")
    metric: str = Field(description="the main metric both are measured on")
    value: float = Field(description="the trivial predictor's value of `metric`")
    margin: float = Field(description="baseline - trivial (positive: the baseline is better)")
    margin_low: float = Field(description="one-sided lower confidence bound of the margin, "
                                          "paired; > 0 means the baseline beats it")


class Resolution(Measured):
    """The smallest loss of one budgeted metric this test split resolves (see
    tasks.baselines), against what the budget allows."""

    metric: str = Field(description="the budget key")
    measured: str = Field(description="the metric it names (main -> auc, recall@50, ...)")
    budget: float = Field(description="the budget as an absolute loss")
    resolution: float = Field(description="smallest resolvable loss, absolute")
    relative_resolution: float = Field(description="resolution / the baseline's value")
    rows: int = Field(description="test rows measured")
    resolvable: bool = Field(description="resolution <= budget")
    rows_needed: int | None = Field(description="test rows the budget would need (when not "
                                                "resolvable)")


class CandidateResult(Measured):
    candidate: Candidate
    model: ArtifactRef
    metrics: Metrics
    deltas: tuple[PairedDelta, ...]
    baseline_latency: tuple[Latency, ...] = Field(
        (), description="the baseline's latency, timed side by side with this candidate's")
    latency_ratio: tuple[LatencyRatio, ...] = Field(
        (), description="baseline p99 / this p99 per batch size, with a 95% interval")
    node_ip: str = Field(description="Ray node that built the candidate")
    wall_s: float = Field(description="seconds spent building it")


class GateDecision(Measured):
    candidate_id: str
    passed: bool
    reasons: tuple[str, ...] = Field(description="every failed check, with the margin")


class LeaderboardRow(Measured):
    candidate: str
    plan: str
    size_bytes: int
    size_ratio: float
    metric: str = Field(description="the main quality metric the next three columns are of")
    quality: float
    delta: float
    loss_ci_high: float
    logloss_delta: float | None
    p99_ms_bs512: float | None
    latency_ratio: float | None
    latency_ratio_low: float | None = Field(None, description="95% interval of latency_ratio")
    latency_ratio_high: float | None = Field(None, description="95% interval of latency_ratio")
    latency_device: str | None = Field(None, description="what p99 and latency_ratio were "
                                                         "timed on (the serving device)")
    passed: bool
    reasons: tuple[str, ...]
    node_ip: str


class Promotion(Frozen):
    model_name: str
    version: int
    uri: str = Field(description="s3:// URI of the promoted model file")
    candidate_id: str


class GateReport(Measured):
    run_id: str
    model_name: str
    dataset: DatasetRef
    baseline: Metrics
    leaderboard: tuple[LeaderboardRow, ...]
    chosen: str | None = Field(description="candidate the objective picked among the passing")
    promoted: Promotion | None
    status: Literal["promoted", "not_promoted", "stopped"] = Field(
        description="stopped: the run ended before compression (see reason)")
    reason: str
    failures: dict[str, str] = Field(default_factory=dict, description="candidate -> error")
    skipped: dict[str, str] = Field(
        default_factory=dict, description="candidate -> why it cannot run on these workers")
    trivial: tuple[TrivialBaseline, ...] = Field(
        (), description="the baseline against its family's trivial predictors")
    resolution: tuple[Resolution, ...] = Field(
        (), description="per budgeted metric: the smallest loss the test split resolves")
    warnings: tuple[str, ...] = Field((), description="what the user should know (budgets "
                                                      "below resolution)")
    search: SearchReport | None = Field(None, description="the recipe search, if one ran")
