"""What a registry version holds besides its weights (tasks.registry writes one file each)."""

from __future__ import annotations

from pydantic import Field

from tasks.types.base import ArtifactRef, Measured
from tasks.types.data import DatasetSpec
from tasks.types.request import CompressionRequest
from tasks.types.results import LatencyRatio, Metrics, PairedDelta
from tasks.types.stages import Candidate, StageConfig


class VersionSpec(Measured):
    """spec.json: what the version is (its plan) and the data its tables were sized for."""

    candidate: Candidate
    dataset_spec: DatasetSpec


class VersionMetrics(Measured):
    """metrics.json: what the gate measured, and the baseline it was compared with."""

    metrics: Metrics
    deltas: tuple[PairedDelta, ...]
    baseline: Metrics
    latency_ratio: tuple[LatencyRatio, ...] = Field(
        (), description="baseline p99 / this p99 per batch size, timed side by side (95% CI)")


class Lineage(Measured):
    """lineage.json: where the version came from, down to each model of its chain."""

    run_id: str
    code_git_sha: str
    code_digest: str = Field(description="sha256 of the recsqueeze sources (tasks.cache)")
    dataset: dict[str, str] = Field(description="uri and sha256 of the dataset")
    request: CompressionRequest
    plan: tuple[StageConfig, ...]
    seeds: dict[str, int]
    parent: ArtifactRef = Field(description="the baseline the plan started from")
    ray_node: str
    wall_s: float
    chain: tuple[dict[str, object], ...] = Field(
        description="every model from the baseline to this one: where, how long, on what")
    metrics: Metrics
    deltas: tuple[PairedDelta, ...]


class VersionRecord(Measured):
    """Everything a registry version holds besides its weights, one file each."""

    spec: VersionSpec
    metrics: VersionMetrics
    lineage: Lineage
    card: str = Field(description="card.md: the model card")
    plot: bytes = Field(description="pareto.png: size vs quality of the run's candidates")

    def files(self) -> dict[str, object]:
        return {"spec.json": self.spec.model_dump(mode="json"),
                "metrics.json": self.metrics.model_dump(mode="json"),
                "lineage.json": self.lineage.model_dump(mode="json"),
                "card.md": self.card, "pareto.png": self.plot}
