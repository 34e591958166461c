"""A recipe search: one space over compression chains, searched under the run's budget
(tasks.recipe). Each trial is a chain of stages (student -> prune -> TT -> quantize) that the
plan graph runs like any candidate; trials are chosen on the valid split, and the chosen front
is judged by the gate on the test split like every candidate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.quant.schemes import EMBEDDING, LINEAR
from tasks.types.base import Frozen, Measured
from tasks.types.stages import Candidate, EmbeddingQuant, LinearQuant

Objective = Literal["size", "p99", "quality"]


class SearchSpace(Frozen):
    """What a trial may choose; a one-element tuple fixes that choice."""

    student_dims: tuple[int, ...] = Field(
        (0, 8, 16, 32), description="embedding width of a distilled student (0: keep the input "
        "model's architecture, no student)")
    student_widths: tuple[float, ...] = Field(
        (0.25, 0.5, 1.0), description="student hidden widths as a share of the input model's")
    student_epochs: int = Field(2, ge=1, le=50, description="student training epochs (most)")
    student_temperatures: tuple[float, ...] = Field(
        (1.0, 2.0), description="distillation temperatures (T) a student may train at")
    prune: tuple[float, ...] = Field(
        (0.0,), description="structured sparsity of the hidden layers (0: none)")
    tt_ranks: tuple[int, ...] = Field(
        (0,), description="tensor-train rank of every table (0: tables stay dense)")
    table_precision: tuple[EmbeddingQuant, ...] = Field(
        ("rowwise_int8", "rowwise_int4", "rowwise_int2"), description="dtypes a table may get")
    head_shares: tuple[float, ...] = Field(
        (0.1, 0.2), description="tiered table dtypes (tiered_*): shares of the rows, the most "
        "looked-up, kept at the head dtype")
    per_table: bool = Field(
        True, description="each large table chooses its own dtype (else one for all tables)")
    small_table_precision: tuple[EmbeddingQuant, ...] = Field(
        ("rowwise_int8",), description="dtypes the small tables (fewer than large_table_rows "
        "rows, a few hundred bytes each) may share: few bytes to save, much signal to lose")
    large_table_rows: int = Field(
        1000, ge=1, description="tables with this many rows or more choose their own dtype; "
        "the others share one")
    linear_precision: tuple[LinearQuant, ...] = Field(
        ("none", "int8_weight_only", "dynamic_int8"), description="dtypes the Linear layers may get")
    qat_epochs: tuple[int, ...] = Field(
        (0, 1), description="quantization-aware fine-tuning epochs (0: one-shot)")

    @field_validator("student_dims", "student_widths", "student_temperatures", "prune",
                     "head_shares",
                     "tt_ranks", "table_precision", "small_table_precision", "linear_precision",
                     "qat_epochs")
    @classmethod
    def _not_empty(cls, v: tuple[object, ...]) -> tuple[object, ...]:
        if not v:
            raise ValueError("search.space: every choice needs at least one value (a "
                             "one-element tuple fixes it)")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        if any(d < 0 for d in self.student_dims):
            raise ValueError(f"search.space.student_dims must be >= 0 (got {self.student_dims})")
        if any(not 0 < w <= 1 for w in self.student_widths):
            raise ValueError(f"search.space.student_widths are shares in (0, 1] (got "
                             f"{self.student_widths})")
        if any(not 0 < h < 1 for h in self.head_shares):
            raise ValueError(f"search.space.head_shares: shares in (0, 1) (got "
                             f"{self.head_shares})")
        if any(not 0 <= p < 1 for p in self.prune):
            raise ValueError(f"search.space.prune: sparsities in [0, 1) (got {self.prune})")
        if any(r < 0 for r in self.tt_ranks) or any(e < 0 for e in self.qat_epochs):
            raise ValueError("search.space: tt_ranks and qat_epochs must be >= 0")
        assert all(t in EMBEDDING for t in (*self.table_precision, *self.small_table_precision))
        assert all(t in LINEAR for t in self.linear_precision)
        return self


class RecipeSearch(Frozen):
    """A search over compression chains inside the compress flow, with Optuna (ask/tell; TPE
    for one objective, NSGA-II for several; seeded). Trials run as plans on the cluster (a
    prefix two trials share - one student, one factorization - is built once); each is scored
    on the valid split, and the chosen front joins the candidates the gate judges on test."""

    space: SearchSpace = Field(default_factory=SearchSpace, description="what a trial chooses")
    objectives: tuple[Objective, ...] = Field(
        ("size",), min_length=1, description="what to minimise: size (bytes), p99 (batch-512 "
        "latency vs the baseline, measured side by side), quality (valid-split loss of the main "
        "metric); one = TPE under the budget's constraints, several = NSGA-II")
    trials: int = Field(24, ge=1, le=2000, description="trial budget")
    parallelism: int = Field(4, ge=1, le=64, description="trials asked and run at once")
    max_wall_s: float = Field(3600, gt=0, description="wall-clock budget of the search")
    proxy_rows: int = Field(
        50_000, ge=500, description="valid rows of the early check after each stage of a "
        "trial (Optuna's ThresholdPruner stops a trial whose prefix already loses too much)")
    prune_at: float = Field(
        10.0, gt=0, description="stop a trial once a prefix loses this many times the budget "
        "(hopeless: far beyond what the sampling noise of proxy_rows explains)")
    margin: float = Field(
        0.6, gt=0, le=1, description="share of the budget a trial may lose on the valid split "
        "(the rest is left for the test split's confidence interval)")
    front: int = Field(4, ge=1, le=32, description="most trials of the front sent to the gate")
    latency_seconds: float = Field(
        4.0, gt=0, le=120, description="seconds each trial's side-by-side latency check may take")
    warm_start: bool = Field(
        True, description="enqueue a first trial built from the calibration sensitivity table "
        "(mixed precision of the input model)")
    seed: int = Field(0, ge=0, description="sampler seed")

    @field_validator("objectives")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"search.objectives: each at most once (got {list(v)})")
        return v


class Validated(Measured):
    """One trial's model on the valid split (or its first `rows`), paired with the baseline's
    predictions on the same rows: what the search scores trials by (never the test split)."""

    rows: int
    main: str
    value: float = Field(description="the main metric of the model")
    baseline_value: float = Field(description="the baseline's, on the same rows")
    relative_loss: float = Field(description="(baseline - model) / baseline")
    size_bytes: int
    baseline_bytes: int
    p99_ratio: float | None = Field(
        None, description="baseline p99 / model p99 at batch 512, timed side by side")
    wall_s: float = Field(0.0, description="seconds of this check")


class TrialRecord(Measured):
    """One trial of a recipe search, as the report lists it."""

    number: int
    plan: str
    state: Literal["complete", "pruned", "failed"] = "complete"
    validated: Validated | None = Field(None, description="its valid-split score")
    feasible: bool = Field(False, description="within the budget's share on the valid split")
    constraints: dict[str, float] = Field(
        default_factory=dict, description="each constraint's margin (feasible: all <= 0)")
    cpu_s: float = Field(0.0, description="CPU seconds of the stages it built")
    gpu_s: float = Field(0.0, description="wall seconds of its stages that ran on a GPU")
    candidate: Candidate | None = None
    why: str = ""


class SearchReport(Measured):
    """What a recipe search did: every trial, the front it sent to the gate, its cost."""

    objectives: tuple[str, ...]
    trials: tuple[TrialRecord, ...]
    front: tuple[str, ...] = Field(description="candidate ids of the front sent to the gate")
    wall_s: float
    cpu_s: float = Field(description="CPU seconds of every stage the trials built (shared "
                                     "prefixes counted once)")
    gpu_s: float
