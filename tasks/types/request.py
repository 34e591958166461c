"""One compression run as the user asks for it: `CompressionRequest`, the compress flow's
parameter, which Prefect renders as the run form (DESIGN §3, §5)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.defaults import default_budget, default_candidates, default_search
from tasks.types.base import Frozen
from tasks.types.budget import METRIC_NAME, Budget
from tasks.types.data import DatasetRequest
from tasks.types.model import MAIN_METRIC, DlrmSpec, ModelSpec, TrainConfig
from tasks.types.search import RecipeSearch
from tasks.types.stages import CalibrateConfig, Candidate


class Resources(Frozen):
    cpus_per_stage: float = Field(1.0, gt=0, description="Ray num_cpus of each stage task")
    gpus_per_stage: float = Field(
        1.0, ge=0, description="Ray num_gpus per stage, used only if the cluster has GPUs"
    )
    serving_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where candidates are timed: the device they would be served on "
        "(auto: a GPU when the Ray cluster has one, else one CPU thread); 2:4 sparsity and "
        "fp16/bf16 are judged on the GPU kernels only with a GPU")
    timing_seconds: float = Field(
        90.0, gt=0, le=3600,
        description="Most seconds the side-by-side latency timing of all candidates may take "
                    "(longer = narrower latency-ratio intervals)")


class NASSpace(Frozen):
    """What a NAS trial may choose (DLRM family)."""

    embedding_dims: tuple[int, ...] = Field((8, 16, 32), description="common embedding width")
    table_dims: tuple[int, ...] = Field(
        (4, 8, 16, 32), description="per-table width choices for the large tables (empty: all "
        "tables use the common width)")
    large_table_rows: int = Field(1000, ge=1, description="tables with this many rows or more "
                                                          "get their own width")
    top_widths: tuple[int, ...] = Field((32, 64, 128, 256), description="top MLP layer widths")
    top_depths: tuple[int, ...] = Field((1, 2, 3), description="top MLP depths")
    bottom_widths: tuple[int, ...] = Field((32, 64, 128), description="bottom MLP hidden width")
    interactions: tuple[Literal["dot", "cat"], ...] = Field(
        ("dot", "cat"), description="feature interactions")


class NASRequest(Frozen):
    """A neural architecture search run inside the compress flow; its Pareto front (AUC, size,
    p99) joins the candidates the gate judges."""

    space: NASSpace = Field(default_factory=NASSpace, description="the search space")
    strategy: Literal["random", "evolution"] = Field(
        "evolution", description="random search, or regularized evolution (Real et al., 2019)")
    trials: int = Field(12, ge=1, le=1000, description="trial budget")
    parallelism: int = Field(4, ge=1, le=64, description="trials per generation (in parallel)")
    max_wall_s: float = Field(3600, gt=0, description="wall-clock budget of the search")
    steps: int = Field(300, ge=10, description="training steps per trial")
    population: int = Field(8, ge=2, description="evolution: population size")
    tournament: int = Field(3, ge=1, description="evolution: tournament size")
    seed: int = Field(0, ge=0, description="search seed")


def _family_picker(schema: dict[str, Any]) -> None:
    # Prefect's run form renders `anyOf` as a choice of its members (one family's fields at
    # a time) and a `oneOf` as a raw JSON box; the members are exclusive either way (each
    # requires its own `family`, only dlrm's may be left out)
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")
    schema["default"] = DlrmSpec().model_dump(mode="json", exclude=set(DlrmSpec.FROM_DATASET))


class CompressionRequest(Frozen):
    """One compression run: the flow parameter, rendered by Prefect as the run form."""

    model_name: str = Field(
        "ctr-ranker", pattern=r"^[a-z0-9][a-z0-9\-]{0,62}$", description="registry model name"
    )
    model: ModelSpec = Field(
        default_factory=DlrmSpec, description="baseline architecture: pick its family, then "
        "set that family's hyperparameters", json_schema_extra=_family_picker)
    baseline: str | None = Field(
        None, pattern=r"^(\S+/objects/[0-9a-f]{64}|[a-z0-9][a-z0-9\-]{0,62}@(latest|production|"
        r"previous|v[1-9][0-9]*))$",
        description="compress a model you trained and imported (`recsqueeze model import`) "
        "instead of training one: the URI the import printed, NAME@latest (the newest import "
        "under NAME), or NAME@production / NAME@vN (the baseline that registry version was "
        "compressed from). `model` then comes from the import and `train` is not used for it")
    dataset: DatasetRequest = Field(default_factory=DatasetRequest, description="data source")
    train: TrainConfig = Field(default_factory=TrainConfig, description="baseline training")
    candidates: tuple[Candidate, ...] = Field(
        default_factory=default_candidates, min_length=1, description="compression plans to try"
    )
    nas: NASRequest | None = Field(None, description="also search architectures (NAS)")
    search: RecipeSearch | None = Field(
        None, description="also search compression chains across techniques (student, "
        "pruning, TT, per-table precision, QAT) under the budget; its front joins the "
        "candidates. A request that lists neither candidates nor search gets the family's "
        "default candidates and a small search (tasks.defaults.default_search); one that "
        "lists candidates gets exactly those (null: no search)")
    reuse_results: bool = Field(
        True, description="serve tasks whose inputs and code are unchanged from the S3 result "
                          "cache (an identical rerun is nearly free); false recomputes them and "
                          "refreshes the cache")
    budget: Budget = Field(
        default_factory=Budget, description="promotion rule (default: the main metric may "
        "drop 0.1% relative for dlrm and custom models, 1% for two_tower and sasrec, whose "
        "per-row rank metrics a test split resolves more coarsely)")
    calibrate: CalibrateConfig = Field(
        default_factory=CalibrateConfig, description="calibration (run once, if a plan needs it)")
    resources: Resources = Field(default_factory=Resources, description="Ray resources")
    promote: bool = Field(True, description="promote the chosen candidate to the registry")
    require_useful_baseline: bool = Field(
        True, description="stop before compression when the baseline's main metric (lower 95% "
        "bound) does not beat the best trivial predictor of its family (CTR prior, popularity)")

    @model_validator(mode="after")
    def _fits_the_model(self) -> CompressionRequest:
        if not {"search", "candidates"} & self.model_fields_set:  # the default: a search
            object.__setattr__(self, "search", default_search(self.model.family))
        if "candidates" not in self.model_fields_set:  # the family's own default plans
            object.__setattr__(self, "candidates", default_candidates(self.model.family))
        if "budget" not in self.model_fields_set:  # and its own default budget
            object.__setattr__(self, "budget", default_budget(self.model.family))
        task = self.model.problem_kind()
        allowed = {"ranking": ("main", "auc", "logloss", "ndcg"),
                   "retrieval": ("main", "recall", "ndcg"),
                   "next_item": ("main", "hr", "ndcg")}[task]
        for name in self.budget.metrics:
            match = METRIC_NAME.match(name)
            assert match is not None
            base = match.group(1).split("@")[0]
            if base not in allowed:
                raise ValueError(
                    f"budget.metrics[{name!r}]: a {self.model.family} model ({task}) is not "
                    f"measured on {base}; budget one of {list(allowed)} (main = "
                    f"{MAIN_METRIC[task]})")
        if self.nas is not None and self.model.family != "dlrm":
            raise ValueError(f"nas: the search space is the DLRM ranker's; model.family is "
                             f"{self.model.family!r} (remove nas or use family 'dlrm')")
        return self

    def with_baseline(self, spec: ModelSpec) -> CompressionRequest:
        """This request compressing an imported model of `spec` (resolved or not): `model`
        becomes its spec, and the family's defaults (candidates, budget, search) follow it
        where the request did not set them."""
        from tasks.types.model import parse_model_spec

        member = type(spec)
        mine = spec.model_dump(mode="json", exclude=set(member.FROM_DATASET))
        if "model" in self.model_fields_set and self.model.model_dump(mode="json") != mine:
            raise ValueError(
                f"model: the request sets model (family {self.model.family!r}) and its baseline "
                f"{self.baseline} is an imported {spec.family!r} model with its own spec; "
                "remove model from the request (an imported baseline brings its spec)")
        data = {k: v for k, v in self.model_dump(mode="json").items()
                if k in self.model_fields_set}
        return CompressionRequest.model_validate({**data, "model": parse_model_spec(mine)})

    @field_validator("candidates")
    @classmethod
    def _unique_ids(cls, cands: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        ids = [c.id for c in cands]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"candidates: ids must be unique (duplicated: {dupes})")
        return cands
