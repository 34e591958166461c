"""Frozen value types that cross process boundaries (DESIGN §3), split by concern:

- `base`: Frozen (inputs), Measured (measurements), ArtifactRef
- `data`: DatasetSpec, DatasetRef, DatasetRequest, CategoricalColumn
- `model`: the ModelSpec union on `family` (DlrmSpec, TwoTowerSpec, SasrecSpec, CustomSpec),
  parse_model_spec, TableSpec, TrainConfig, Family, ProblemKind, MAIN_METRIC
- `stages`: one config per stage kind, the StageConfig union on `kind`, Candidate
- `budget`: Budget, MetricBudget and the metric names a budget may use
- `results`: Metrics, Estimate, Latency, PairedDelta, CandidateResult, GateReport, ...
- `search`: RecipeSearch, SearchSpace (a recipe search's space), Validated (a trial's score)
- `request`: CompressionRequest (the flow parameter), Resources, NASRequest, NASSpace

Imports nothing heavy: Ray workers and the Prefect UI form load these modules. Every field has
a description (Prefect renders them in the run form) and every type round-trips through JSON.

`tasks.types.request` is loaded on first use of one of its names: it fills a request's default
candidates from `tasks.defaults`, which imports the modules above, so this package must be
importable without it (`import tasks.defaults` first would otherwise come back here half-made).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tasks.types.base import ArtifactRef, Frozen, Measured
from tasks.types.budget import DEFAULT_KS, METRIC_NAME, Budget, MetricBudget, budget_ks, budget_target
from tasks.types.data import (
    MAX_CARDINALITY,
    MAX_MULTI_HOT,
    CategoricalColumn,
    DatasetRef,
    DatasetRequest,
    DatasetSpec,
)
from tasks.types.model import (
    DEFAULT_HISTORY,
    FAMILY_SPECS,
    MAIN_METRIC,
    MODEL_SPECS,
    CustomSpec,
    DlrmSpec,
    Family,
    ModelSpec,
    ModelSpecBase,
    ProblemKind,
    SasrecSpec,
    TableSpec,
    TrainConfig,
    TwoTowerSpec,
    parse_model_spec,
)
from tasks.types.results import (
    CandidateResult,
    Estimate,
    GateDecision,
    GateReport,
    Latency,
    LatencyRatio,
    LeaderboardRow,
    Metrics,
    PairedDelta,
    Promotion,
    Resolution,
    TrivialBaseline,
)
from tasks.types.search import RecipeSearch, SearchReport, SearchSpace, TrialRecord, Validated
from tasks.types.stages import (
    CalibrateConfig,
    CalibrationRefs,
    Candidate,
    DistillConfig,
    EmbeddingQuant,
    FactorizeConfig,
    FineTuned,
    LinearQuant,
    MixedPrecision,
    NASTrialConfig,
    PruneConfig,
    QuantizeConfig,
    StageConfig,
)

if TYPE_CHECKING:
    from tasks.types.request import CompressionRequest, NASRequest, NASSpace, Resources

_FROM_REQUEST = ("CompressionRequest", "NASRequest", "NASSpace", "Resources")


def __getattr__(name: str) -> Any:
    if name in _FROM_REQUEST:
        return getattr(importlib.import_module("tasks.types.request"), name)
    raise AttributeError(f"module 'tasks.types' has no attribute {name!r}")


__all__ = [
    "MAIN_METRIC", "MAX_CARDINALITY", "MAX_MULTI_HOT", "METRIC_NAME", "DEFAULT_HISTORY", "FAMILY_SPECS",
    "MODEL_SPECS", "ArtifactRef", "Budget", "CalibrateConfig", "CalibrationRefs", "Candidate",
    "CandidateResult", "CategoricalColumn", "CompressionRequest", "CustomSpec", "DatasetRef",
    "DatasetRequest", "DatasetSpec", "DistillConfig", "DlrmSpec", "EmbeddingQuant", "Estimate",
    "FactorizeConfig", "Family", "FineTuned", "Frozen", "GateDecision", "GateReport", "Latency",
    "LatencyRatio", "LeaderboardRow", "LinearQuant", "Measured", "MetricBudget", "Metrics",
    "MixedPrecision", "ModelSpec", "ModelSpecBase", "NASRequest", "NASSpace", "NASTrialConfig",
    "PairedDelta", "ProblemKind", "Promotion", "PruneConfig", "QuantizeConfig", "RecipeSearch",
    "Resolution", "SearchReport", "SearchSpace", "TrialRecord", "Validated",
    "Resources", "SasrecSpec", "StageConfig", "TableSpec", "TrainConfig", "TrivialBaseline",
    "TwoTowerSpec", "DEFAULT_KS", "budget_ks", "budget_target", "parse_model_spec",
]
