"""What a registry version holds besides its weights (tasks.registry writes one file each)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.types.base import ArtifactRef, Frozen, Measured
from tasks.types.data import DatasetSpec
from tasks.types.model import ModelSpec
from tasks.types.request import CompressionRequest
from tasks.types.results import LatencyRatio, Metrics, PairedDelta
from tasks.types.stages import Candidate, StageConfig


class ImportRecord(Frozen):
    """imports/NAME/SHA256.json: a trained model brought in by `recsqueeze model import`,
    verified (strict load, finite outputs on the dataset's rows) and stored as a recsqueeze
    model; a run names it as its baseline instead of training one. Sealed (HMAC under the
    signing key), like a registry version."""

    model_name: str = Field(description="the name it was imported under")
    model: ArtifactRef = Field(description="the stored model (objects/SHA256, safetensors)")
    spec: ModelSpec = Field(description="its spec, resolved on the dataset")
    source_sha256: str = Field(description="sha256 of the weights file as it was given")
    source_format: Literal["safetensors", "state_dict"] = Field(
        description="safetensors, or a torch state_dict read with weights_only=True")
    source_dtypes: tuple[str, ...] = Field(
        description="the floating dtypes of the file's tensors (fp16/bf16 are widened to the "
                    "model's float32 parameters)")
    dataset: dict[str, str] = Field(description="uri and sha256 of the dataset it was checked on")
    imported_at: str = Field(description="when it was first imported (UTC, ISO 8601)")
    seal: str = Field("", description="HMAC-SHA256 of the record under the signing key")


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
    baseline_source: ImportRecord | None = Field(
        None, description="the imported model the run compressed (None: the run trained its "
                          "baseline from the request's spec)")


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
