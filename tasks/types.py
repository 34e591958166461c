"""Frozen value types that cross process boundaries (DESIGN §3).

Imports nothing heavy: Ray workers and the Prefect UI form load this module. Every field has a
description (Prefect renders them in the run form) and every type round-trips through JSON.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Frozen(BaseModel):
    # allow_inf_nan=False: NaN and +-inf (which Python's json reads from "NaN" / "Infinity")
    # are refused in every float field, at any depth of the request
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Measured(BaseModel):
    """A measurement (metrics, intervals, reports): NaN is a value here (an undefined interval
    is reported as such and never passes the gate)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --- storage -------------------------------------------------------------------------------
class ArtifactRef(Frozen):
    """A content-addressed blob in the artifact store; the only handle on weights."""

    uri: str = Field(description="s3://bucket/key of the blob")
    sha256: str = Field(description="hex sha256 of the bytes, verified on every read")
    size_bytes: int = Field(ge=0, description="exact size of the stored bytes")
    kind: Literal["model", "table", "json", "predictions"] = Field(description="what it holds")


# --- data ----------------------------------------------------------------------------------
MAX_CARDINALITY = 50_000_000
"""Ids per categorical column: a table of 50M rows x 64 dims is 12.8 GB of float32, more than a
worker of the local stack holds; a larger id space must be hashed or bucketed first."""


class CategoricalColumn(Frozen):
    name: str = Field(description="column name; int64 ids in [0, cardinality)")
    cardinality: int = Field(
        gt=0, le=MAX_CARDINALITY,
        description=f"number of distinct ids (embedding table rows), at most {MAX_CARDINALITY:,}")


class DatasetSpec(Frozen):
    """Role of each column of a dataset (DESIGN §7); stored as spec.json beside the Parquet."""

    name: str = Field(description="dataset name (an S3 path segment)")
    label: str = Field("click", description="binary label column (0/1)")
    categorical: tuple[CategoricalColumn, ...] = Field(description="id columns -> embeddings")
    dense: tuple[str, ...] = Field(description="float columns fed to the bottom MLP")
    user_id: str | None = Field(None, description="user id column, if any")
    item_id: str | None = Field(None, description="item id column, if any")
    query_id: str | None = Field(
        None, description="query/session id column: rows sharing it form one ranked list "
        "(NDCG@10 of the ranker, listwise distillation); int64, need not be categorical")
    timestamp: str | None = Field(None, description="event time column")
    history: str | None = Field(
        None, description="list<int64> column: the user's previously clicked item ids (in "
        "item_id's id space), oldest first; the sequential recommender's input")
    item_features: tuple[str, ...] = Field(
        (), description="categorical columns that describe the item (besides item_id): the "
        "two-tower model's item tower reads them, the query/user tower reads the others")
    segments: tuple[str, ...] = Field(
        (), description="segment columns (e.g. head/tail item, new user): every quality "
        "metric is also reported per value, and budgets may name one: 'auc[COLUMN=VALUE]'")
    bayes_auc: float | None = Field(
        None, description="AUC of the true click probability on the test split (generator only)"
    )


class DatasetRef(Frozen):
    uri: str = Field(description="s3://bucket/datasets/NAME/SHA/ (holds {train,valid,test}.parquet)")
    sha256: str = Field(description="sha256 over the split files (in split order) and the spec")
    spec: DatasetSpec = Field(description="column roles")
    splits: dict[str, str] = Field(description="sha256 of each split file")
    rows: dict[str, int] = Field(description="rows per split")


class DatasetRequest(Frozen):
    """Which data to compress against: the built-in generator or a dataset already in S3."""

    builtin: Literal["tiny", "small"] | None = Field(
        "tiny", description="generate the built-in e-commerce click log of this size"
    )
    uri: str | None = Field(
        None, description="s3:// prefix of an existing dataset (spec.json + split Parquet files)"
    )
    seed: int = Field(0, ge=0, description="generator seed (built-in data only)")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetRequest:
        if self.uri is not None and "builtin" not in self.model_fields_set:
            object.__setattr__(self, "builtin", None)  # a uri alone replaces the default
        if (self.builtin is None) == (self.uri is None):
            raise ValueError(
                "dataset: set exactly one of dataset.builtin ('tiny'|'small') or dataset.uri "
                f"(got builtin={self.builtin!r}, uri={self.uri!r})"
            )
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError(f"dataset.uri must start with s3:// (got {self.uri!r})")
        return self


# --- models --------------------------------------------------------------------------------
class TableSpec(Frozen):
    name: str = Field(description="categorical column the table embeds")
    rows: int = Field(gt=0, description="number of embedding rows")


Family = Literal["dlrm", "two_tower", "sasrec", "custom"]
Task = Literal["ranking", "retrieval", "next_item"]
TASK_OF: dict[str, Task] = {"dlrm": "ranking", "two_tower": "retrieval", "sasrec": "next_item"}


class ModelSpec(Frozen):
    """Enough to rebuild the module: family + hyperparameters (+ tables once resolved).

    Families and what their forward(dense, sparse) takes and returns (see tasks/models):
    ``dlrm`` ranks (every categorical id + dense features -> one click logit per row);
    ``two_tower`` retrieves (the query/user side ids -> a score for every catalogue item,
    from the item-embedding index the item tower fills); ``sasrec`` recommends the next item
    (the user's history of item ids -> a score for every catalogue item); ``custom`` is a
    user's class (`class_path`) taking the inputs of its `task`.
    """

    family: Family = Field("dlrm", description="model family")
    embedding_dim: int = Field(64, gt=0, le=1024, description="embedding width of every table")
    bottom_mlp: tuple[int, ...] = Field((128, 64), description="dlrm: bottom MLP widths (last "
                                                               "= dim)")
    top_mlp: tuple[int, ...] = Field((256, 128), description="dlrm: top MLP hidden widths")
    tables: tuple[TableSpec, ...] = Field((), description="filled from the dataset spec")
    num_dense: int = Field(0, ge=0, description="filled from the dataset spec")
    table_dims: dict[str, int] = Field(
        default_factory=dict, description="per-table width (table name -> dim); a table of "
        "another width than embedding_dim is projected to it by a Linear")
    interaction: Literal["dot", "cat"] = Field(
        "dot", description="dlrm: feature interaction: pairwise dot products, or concatenation")
    tower_mlp: tuple[int, ...] = Field(
        (128,), description="two_tower: hidden widths of each tower's MLP (output = "
                            "embedding_dim)")
    temperature: float = Field(0.05, gt=0, le=10, description="two_tower: softmax temperature "
                                                              "of the in-batch loss")
    layers: int = Field(2, ge=1, le=24, description="sasrec: transformer blocks")
    heads: int = Field(2, ge=1, le=64, description="sasrec: attention heads per block")
    ffn_dim: int = Field(128, ge=1, description="sasrec: feed-forward hidden width")
    max_history: int = Field(20, ge=1, le=512, description="sasrec: most recent history items "
                                                           "read")
    dropout: float = Field(0.1, ge=0, lt=1, description="sasrec: dropout while training")
    item_table: str | None = Field(None, description="filled from the dataset spec (item_id)")
    item_feature_tables: tuple[str, ...] = Field(
        (), description="filled from the dataset spec (item_features)")
    task: Task | None = Field(
        None, description="custom only: which inputs the class takes (ranking | retrieval | "
                          "next_item); the built-in families imply theirs")
    class_path: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="custom only: 'package.module:Class' of an installed, importable model "
                    "class (never loaded from the artifact store)")
    options: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="custom only: hyperparameters passed to the class")

    @model_validator(mode="after")
    def _family_fields(self) -> ModelSpec:
        if self.family == "custom":
            if self.class_path is None or self.task is None:
                raise ValueError("model: family 'custom' needs class_path ('package.module:"
                                 "Class') and task (ranking | retrieval | next_item)")
            from tasks.models import user_class

            user_class(self.class_path)  # refused here, before any work, if it cannot be built
        elif self.class_path is not None:
            raise ValueError(f"model.class_path is for family 'custom' only (family is "
                             f"{self.family!r}); remove it or set family to 'custom'")
        if self.family == "sasrec" and self.embedding_dim % self.heads:
            raise ValueError(f"model.heads ({self.heads}) must divide embedding_dim "
                             f"({self.embedding_dim})")
        return self

    def task_kind(self) -> Task:
        return self.task if self.family == "custom" else TASK_OF[self.family]  # type: ignore[return-value]

    @field_validator("table_dims")
    @classmethod
    def _dims(cls, dims: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in dims.items() if not 0 < v <= 1024}
        if bad:
            raise ValueError(f"model.table_dims must be in (0, 1024] (got {bad})")
        return dims

    @field_validator("bottom_mlp", "top_mlp")
    @classmethod
    def _positive(cls, widths: tuple[int, ...]) -> tuple[int, ...]:
        if any(w <= 0 for w in widths):
            raise ValueError(f"MLP widths must be > 0 (got {widths})")
        return widths


class TrainConfig(Frozen):
    epochs: int = Field(
        3, ge=1, le=100, description="most passes over the train split (early stopping on "
        "valid: stops after `patience` epochs without improvement, keeps the best epoch)")
    patience: int = Field(
        2, ge=1, le=100, description="epochs without a better validation loss before training "
        "stops (the best epoch's weights are kept)")
    batch_size: int = Field(2048, ge=8, description="rows per step")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="L2 on dense layers")
    seed: int = Field(0, ge=0, description="torch seed (init and shuffling)")


# --- stages --------------------------------------------------------------------------------
LinearQuant = Literal[
    "none", "dynamic_int8", "static_int8", "int8_weight_only", "int4_weight_only", "fp16", "bf16"]
EmbeddingQuant = Literal["none", "rowwise_int8", "rowwise_int4", "rowwise_int2", "fp16", "bf16"]


class MixedPrecision(Frozen):
    """Per-layer / per-table dtypes chosen from the calibrate stage's sensitivity table."""

    budget_fraction: float = Field(
        0.5, gt=0, le=1, description="share of the run's AUC budget the summed sensitivities "
        "may use (the rest is margin for the test-split confidence interval)")
    embedding_choices: tuple[EmbeddingQuant, ...] = Field(
        ("none", "rowwise_int8", "rowwise_int4", "rowwise_int2"),
        description="dtypes a table may get")
    linear_choices: tuple[LinearQuant, ...] = Field(
        ("none", "dynamic_int8"), description="dtypes a Linear layer may get")


class QuantizeConfig(Frozen):
    """Post-training quantization of Linear layers and embedding tables.

    Args:
        linear: ``dynamic_int8`` (int8 weights, activations quantized per batch),
            ``static_int8`` (activation ranges fixed by calibration), ``int8_weight_only`` /
            ``int4_weight_only`` (fp32 activations, per-channel or group-wise weights),
            ``fp16`` / ``bf16``, or ``none``.
        group_size: weight-only only: one scale per this many input columns (None =
            per output channel). Must divide every layer's width.
        embeddings: row-wise ``rowwise_int8`` / ``rowwise_int4`` / ``rowwise_int2`` (per-row
            scale and offset, packed 1 / 2 / 4 values per byte), ``fp16`` / ``bf16``, ``none``.
        row_range: per-row range of sub-byte tables: ``mse`` (clip that minimises the row's
            squared error) or ``minmax`` (what torch's one-shot prepack does).
        activation_range: static int8 only: which calibrated range to use.
        mixed_precision: when set, ``linear``/``embeddings`` are ignored and each layer gets
            the cheapest dtype the sensitivity table allows within the run's budget.

    Example: ``QuantizeConfig(linear="int4_weight_only", group_size=32, embeddings="rowwise_int4")``
    """

    kind: Literal["quantize"] = "quantize"
    linear: LinearQuant = Field("dynamic_int8", description="Linear layers")
    group_size: int | None = Field(None, gt=0, description="weight-only group width")
    embeddings: EmbeddingQuant = Field("rowwise_int8", description="embedding tables")
    row_range: Literal["minmax", "mse"] = Field("mse", description="per-row range (sub-byte)")
    activation_range: Literal["minmax", "percentile", "mse", "entropy"] = Field(
        "mse", description="static int8 activation clipping range")
    mixed_precision: MixedPrecision | None = Field(None, description="per-layer dtypes")

    @field_validator("linear", mode="before")
    @classmethod
    def _no_int2_linear(cls, v: object) -> object:
        if isinstance(v, str) and "int2" in v:
            raise ValueError(f"quantize.linear: int2 is for embedding tables only (got {v!r}); "
                             "use int4_weight_only or an int8 mode for Linear layers")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.mixed_precision is None and self.linear == "none" and self.embeddings == "none":
            raise ValueError("quantize: linear and embeddings are both 'none'; set one of them")
        if self.group_size is not None and not self.linear.endswith("weight_only"):
            raise ValueError(f"quantize.group_size applies to int8/int4_weight_only only "
                             f"(linear is {self.linear!r}); remove it or change linear")
        return self

    def needs_calibration(self) -> bool:
        return self.mixed_precision is not None or self.linear == "static_int8"

    def label(self) -> str:
        if self.mixed_precision is not None:
            return f"quantize(mixed@{self.mixed_precision.budget_fraction:g})"
        lin = self.linear + (f"/g{self.group_size}" if self.group_size else "") + (
            f"/{self.activation_range}" if self.linear == "static_int8" else "")
        emb = self.embeddings + ("/minmax" if self.row_range == "minmax" and
                                 self.embeddings in ("rowwise_int4", "rowwise_int2") else "")
        return "quantize(" + "+".join(p for p in (lin, emb) if not p.startswith("none")) + ")"


class CalibrateConfig(Frozen):
    """What the calibrate stage measures (once per model + calibration data)."""

    kind: Literal["calibrate"] = "calibrate"
    rows: int = Field(20_000, ge=100, description="calibration rows (valid split) for ranges")
    sensitivity_rows: int = Field(
        100_000, ge=1000, description="rows used to measure each layer's AUC sensitivity")
    bins: int = Field(2048, ge=64, description="histogram bins per activation")


class CalibrationRefs(Frozen):
    activations: ArtifactRef = Field(description="Parquet: per-activation ranges + histogram")
    sensitivity: ArtifactRef = Field(description="Parquet: AUC change per layer and dtype")


class FineTuned(Frozen):
    """Fine-tuning after a structural stage (fields shared by prune and factorize)."""

    finetune_epochs: int = Field(1, ge=0, le=20, description="fine-tuning epochs afterwards")
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    finetune_target: Literal["teacher", "labels"] = Field(
        "teacher", description="fit the uncompressed model's probabilities, or the clicks")
    finetune_scope: Literal["dense", "all"] = Field(
        "all", description="dense = leave embedding tables frozen while fine-tuning")

    def needs_calibration(self) -> bool:
        return False


class PruneConfig(FineTuned):
    """Pruning, then (optionally) fine-tuning on the train split.

    Args:
        method: ``structured`` removes whole hidden neurons of the MLPs and feed-forward
            blocks (rows of one Linear, columns of the next: fewer FLOPs) and whole attention
            heads (their q/k/v rows and o columns); ``magnitude`` zeroes the smallest weights of the
            Linear layers and stores them sparsely (CSR); ``embedding_rows`` keeps the most
            frequent (or largest-norm) rows of every table and maps the rest to one shared
            fallback row; ``semi_structured`` keeps 2 of every 4 weights of each Linear (2:4,
            NVIDIA sparse tensor cores; needs a CUDA worker, skipped on CPU).
            Hybrid pruning is a chain: ``[structured, magnitude]``.
        sparsity: fraction removed, in (0, 1) (0.5 for semi_structured).
        steps: prune -> fine-tune cycles (structured, magnitude): the sparsity rises over the
            cycles on the cubic schedule s_k = s * (1 - (1 - k/steps)^3) (Zhu & Gupta, 2017),
            with finetune_epochs of fine-tuning after each; 1 = one shot.
        scope: magnitude only: one global threshold or one per layer.
        criterion: embedding_rows only: ``frequency`` (train split) or ``norm``.
        finetune_epochs: epochs of fine-tuning after pruning (0 = none).

    Example: ``PruneConfig(method="structured", sparsity=0.5, finetune_epochs=1)``
    """

    kind: Literal["prune"] = "prune"
    method: Literal["structured", "magnitude", "embedding_rows", "semi_structured"] = Field(
        "structured", description="what to remove")
    sparsity: float = Field(0.5, description="fraction removed, in (0, 1)")
    scope: Literal["global", "layer"] = Field("global", description="magnitude threshold scope")
    criterion: Literal["frequency", "norm"] = Field("frequency", description="row importance")
    steps: int = Field(1, ge=1, le=20, description="prune -> fine-tune cycles (gradual)")

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"prune.sparsity must be in (0, 1) (got {v}); it is the fraction "
                             "removed")
        return v

    @model_validator(mode="after")
    def _method_fits(self) -> PruneConfig:
        if self.method == "semi_structured" and self.sparsity != 0.5:
            raise ValueError(f"prune.sparsity must be 0.5 for semi_structured (2 of every 4 "
                             f"weights kept; got {self.sparsity})")
        if self.steps > 1 and self.method in ("embedding_rows", "semi_structured"):
            raise ValueError(f"prune.steps > 1 works with structured and magnitude pruning; "
                             f"{self.method} is one-shot (set steps to 1)")
        return self

    def label(self) -> str:
        steps = f",{self.steps}steps" if self.steps > 1 else ""
        method = "2:4" if self.method == "semi_structured" else self.method
        return f"prune({method}@{self.sparsity:g}{steps})"


class FactorizeConfig(FineTuned):
    """Low-rank factorization, then (optionally) fine-tuning.

    Args:
        target: ``linear`` = truncated SVD of every Linear layer (W ~= U V);
            ``embeddings`` = every table E ~= A B (A: rows x rank, B: rank x dim);
            ``tt_embeddings`` = every table as tensor-train cores (TT-Rec), found by TT-SVD.
        rank: fixed rank (for TT: the cap on every TT-rank); or None and ``param_budget`` = the
            largest rank keeping at most this share of each layer's parameters; or neither and
            ``energy`` = the smallest rank holding this share of the squared singular values.
        tt_cores: number of TT cores (tt_embeddings only).
        energy: in (0, 1], used when rank is None.
        finetune_epochs: epochs of fine-tuning afterwards (0 = none).

    Example: ``FactorizeConfig(target="embeddings", rank=8)``
    """

    kind: Literal["factorize"] = "factorize"
    target: Literal["linear", "embeddings", "tt_embeddings"] = Field(
        "embeddings", description="what to factor")
    rank: int | None = Field(None, description="fixed rank (>= 1), or None to use energy")
    energy: float = Field(0.9, gt=0, le=1, description="kept share of squared singular values")
    param_budget: float | None = Field(
        None, gt=0, lt=1, description="most kept share of each layer's parameters (sets the rank)")
    tt_cores: int = Field(3, ge=2, le=4, description="TT cores per table (tt_embeddings)")

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"factorize.rank must be >= 1 (got {v}); or leave it empty and "
                             "set energy")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> FactorizeConfig:
        if self.rank is not None and self.param_budget is not None:
            raise ValueError("factorize: set rank or param_budget, not both (rank "
                             f"{self.rank}, param_budget {self.param_budget})")
        return self

    def label(self) -> str:
        target = "tt" if self.target == "tt_embeddings" else self.target
        rule = self.rank if self.rank else (f"p{self.param_budget:g}" if self.param_budget
                                            else f"e{self.energy:g}")
        return f"factorize({target}@{rule})"


class DistillConfig(Frozen):
    """Train a smaller student of the same family to imitate a teacher.

    The loss per batch is
    ``alpha * soft + (1 - alpha) * hard + hint_weight * hint + listwise_weight * listwise``:
    soft = T² · BCE(sigmoid(s/T), sigmoid(t/T)) on the teacher's logits t (T = temperature;
    at T = 1, BCE on the teacher's click probabilities), hard = BCE on the clicks, hint = MSE
    between a learned projection of the student's last hidden layer and the teacher's, listwise
    = cross entropy between the teacher's and the student's softmax over the rows of each query
    group in the batch (needs the dataset's query_id column). See tasks/losses.py.

    Args:
        student: the student's hyperparameters (tables come from the teacher's data).
        teacher: ``input`` = the model this stage receives (the baseline when distill comes
            first), or a registry model ``NAME@production`` / ``NAME@previous`` / ``NAME@v3``.
        temperature, alpha, hint_weight, listwise_weight: the loss above.
        epochs, lr, batch_size: student training (early stopping on valid).
        require_smaller: refuse a student with as many parameters as the teacher or more.

    Example: ``DistillConfig(student=ModelSpec(embedding_dim=16, bottom_mlp=(64, 16)))``
    """

    kind: Literal["distill"] = "distill"
    student: ModelSpec = Field(
        default_factory=lambda: ModelSpec(embedding_dim=16, bottom_mlp=(64, 16), top_mlp=(128, 64)),
        description="student architecture")
    teacher: str = Field(
        "input", pattern=r"^(input|[a-z0-9][a-z0-9_\-]*@(production|previous|v[1-9][0-9]*))$",
        description="input, or a registry model NAME@ALIAS / NAME@vN")
    temperature: float = Field(1.0, gt=0, le=100, description="softening of both sides (T)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) term")
    hint_weight: float = Field(0.0, ge=0, description="weight of the hidden-layer hint term")
    listwise_weight: float = Field(0.0, ge=0, description="weight of the listwise ranking term")
    epochs: int = Field(2, ge=1, le=50, description="most student epochs (early stopping)")
    lr: float = Field(2e-3, gt=0, description="student learning rate")
    batch_size: int = Field(2048, ge=8, description="student rows per step")
    require_smaller: bool = Field(True, description="refuse a student that is not smaller")
    max_steps: int | None = Field(None, ge=1, description="stop after this many batches")

    def needs_calibration(self) -> bool:
        return False

    def label(self) -> str:
        s = self.student
        extra = "".join([f",T{self.temperature:g}" if self.temperature != 1 else "",
                         ",hint" if self.hint_weight else "",
                         ",listwise" if self.listwise_weight else "",
                         f",{self.teacher}" if self.teacher != "input" else ""])
        if s.family == "sasrec":
            arch = f"d{s.embedding_dim},{s.layers}L{s.heads}H,ffn{s.ffn_dim}"
        elif s.family == "two_tower":
            arch = f"d{s.embedding_dim},towers{'x'.join(map(str, s.tower_mlp))}"
        elif s.family == "custom":
            arch = f"{s.class_path},d{s.embedding_dim}"
        else:
            arch = f"d{s.embedding_dim},top{'x'.join(map(str, s.top_mlp))}"
        return f"distill({arch}{extra})"


class NASTrialConfig(Frozen):
    """One NAS trial: train the architecture `student` for a bounded number of steps by
    distillation from the input model (soft labels at `temperature`), as distill does.

    Example: ``NASTrialConfig(student=ModelSpec(embedding_dim=16, top_mlp=(64,)), steps=300)``
    """

    kind: Literal["nas_trial"] = "nas_trial"
    student: ModelSpec = Field(description="the sampled architecture")
    steps: int = Field(300, ge=10, le=100_000, description="training steps (batches) budget")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    batch_size: int = Field(2048, ge=8, description="rows per step")
    temperature: float = Field(1.0, gt=0, le=100, description="distillation temperature")

    def needs_calibration(self) -> bool:
        return False

    def label(self) -> str:
        s = self.student
        dims = ",".join(f"{k}{v}" for k, v in sorted(s.table_dims.items()))
        return (f"nas(d{s.embedding_dim}{'[' + dims + ']' if dims else ''},"
                f"bot{s.bottom_mlp[0]},top{'x'.join(map(str, s.top_mlp))},{s.interaction})")


StageConfig = Annotated[
    QuantizeConfig | PruneConfig | FactorizeConfig | DistillConfig | NASTrialConfig,
    Field(discriminator="kind"),
]


class Candidate(Frozen):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$", description="unique candidate id")
    parent: str = Field("baseline", description="model the plan starts from")
    plan: tuple[StageConfig, ...] = Field(min_length=1, description="stages, applied in order")

    def label(self) -> str:
        return " -> ".join(stage.label() for stage in self.plan)


# --- metrics and gate ----------------------------------------------------------------------
class Estimate(Measured):
    value: float
    ci_low: float
    ci_high: float


class Latency(Measured):
    batch_size: int
    p50_ms: float
    p99_ms: float


MAIN_METRIC: dict[str, str] = {"ranking": "auc", "retrieval": "recall@50",
                               "next_item": "ndcg@10"}


class LatencyRatio(Measured):
    """Baseline p99 / candidate p99 at one batch size (> 1 = faster), timed side by side."""

    batch_size: int
    value: float = Field(description="the ratio of the pooled p99s")
    ci_low: float = Field(description="lower end of its 95% interval (bootstrap over rounds)")
    ci_high: float = Field(description="upper end of its 95% interval")
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


METRIC_NAME = re.compile(r"^(main|auc|logloss|(ndcg|recall|hr)@([1-9][0-9]{0,3}))"
                         r"(\[([^=\[\]]+)=([^\[\]]+)\])?$")


def budget_target(name: str, main: str) -> str:
    """The measured metric a budget key names: 'main' is the model's main metric `main`
    (auc, recall@50, ndcg@10); 'main[item_popularity=tail]' that metric on one segment."""
    return main + name[4:] if name.startswith("main") else name


def budget_ks(names: object) -> tuple[int, ...]:
    """The K of every @K metric among `names` (evaluations measure these too)."""
    found = (METRIC_NAME.match(str(n)) for n in names)  # type: ignore[attr-defined]
    return tuple(sorted({int(m.group(3)) for m in found if m and m.group(3)}))


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

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, metrics: dict[str, MetricBudget]) -> dict[str, MetricBudget]:
        bad = [name for name in metrics if not METRIC_NAME.match(name)]
        if bad:
            raise ValueError(
                f"budget.metrics: unknown metric name(s) {bad}; use main, auc, logloss, "
                "ndcg@K, recall@K or hr@K, optionally with a segment: 'auc[COLUMN=VALUE]'")
        return metrics
    max_size_bytes: int | None = Field(None, gt=0, description="size constraint")
    min_size_ratio: float | None = Field(None, gt=0, description="baseline bytes / candidate")
    max_p99_ms: float | None = Field(None, gt=0, description="p99 latency constraint (ms)")
    min_latency_ratio: float | None = Field(
        None, gt=0, description="the candidate must be this many times faster than the "
        "baseline at latency_batch_size (baseline p99 / candidate p99), judged on the lower "
        "end of the ratio's 95% interval")
    latency_batch_size: int = Field(512, description="batch size of the latency constraint")
    objective: Literal["smallest", "fastest", "best_quality"] = Field(
        "smallest", description="how to pick among passing candidates"
    )


class Resources(Frozen):
    cpus_per_stage: float = Field(1.0, gt=0, description="Ray num_cpus of each stage task")
    gpus_per_stage: float = Field(
        1.0, ge=0, description="Ray num_gpus per stage, used only if the cluster has GPUs"
    )
    timing_seconds: float = Field(
        90.0, gt=0, le=3600,
        description="Most seconds the side-by-side latency timing of all candidates may take "
                    "(longer = narrower latency-ratio intervals)")


RANK_FAMILIES_MAX_DROP = 0.01
"""Default relative budget of two_tower and sasrec: on `small` their main metrics (Recall@50,
NDCG@10 over ~35,000 clicked test rows) resolve about 0.6% (docs/baseline_checks.py); 0.1%
would need over a million test rows."""


def default_budget(family: str = "dlrm") -> Budget:
    """The family's default budget: its main metric may drop 0.1% relative (ranker, custom)
    or 1% (retrieval and next-item models)."""
    if family in ("two_tower", "sasrec"):
        return Budget(metrics={"main": MetricBudget(max_drop=RANK_FAMILIES_MAX_DROP,
                                                    relative=True)})
    return Budget()


def default_candidates(family: str = "dlrm") -> tuple[Candidate, ...]:
    """One or two plans per stage kind for the model family: quantization, pruning,
    distillation, factorization (for the ranker, the tensor-train chain is the smallest passing
    candidate in docs/benchmarks.md). A user's own model gets the stages that need no
    knowledge of its architecture: quantization of its Linear layers and tables."""
    tt = FactorizeConfig(target="tt_embeddings", rank=32, finetune_epochs=3, finetune_lr=3e-3)
    int8 = QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8")
    if family == "two_tower":
        student = ModelSpec(family="two_tower", embedding_dim=32, tower_mlp=(64,))
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="int8_weight_only",
                                                          embeddings="rowwise_int4"),)),
            Candidate(id="pruned-int8", plan=(PruneConfig(method="structured"), int8)),
            Candidate(id="lowrank-emb", plan=(FactorizeConfig(target="embeddings", rank=16),)),
            Candidate(id="student-half", plan=(DistillConfig(student=student),)),
            Candidate(id="tt-int8", plan=(tt, int8)),
        )
    if family == "sasrec":
        student = ModelSpec(family="sasrec", layers=1, heads=1)
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="dyn-int8", plan=(QuantizeConfig(embeddings="none"),)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="int8_weight_only",
                                                          embeddings="rowwise_int4"),)),
            Candidate(id="pruned-heads-ffn", plan=(PruneConfig(method="structured"),)),
            Candidate(id="lowrank-attn-ffn", plan=(FactorizeConfig(target="linear", rank=16),)),
            Candidate(id="student-1layer", plan=(DistillConfig(student=student),)),
        )
    if family == "custom":
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="none",
                                                          embeddings="rowwise_int4"),)),
        )
    half = ModelSpec(embedding_dim=32, bottom_mlp=(128, 32), top_mlp=(128, 64))
    return (
        Candidate(id="int8-all", plan=(QuantizeConfig(),)),
        Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),
        Candidate(id="int4-emb", plan=(QuantizeConfig(embeddings="rowwise_int4"),)),
        Candidate(id="mixed", plan=(QuantizeConfig(mixed_precision=MixedPrecision()),)),
        Candidate(id="pruned-int8", plan=(PruneConfig(method="structured", sparsity=0.5),
                                          QuantizeConfig())),
        Candidate(id="student-half", plan=(DistillConfig(student=half),)),
        Candidate(id="tt-int8", plan=(tt, QuantizeConfig(linear="int8_weight_only"))),
    )


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


class CompressionRequest(Frozen):
    """One compression run: the flow parameter, rendered by Prefect as the run form."""

    model_name: str = Field(
        "ctr-ranker", pattern=r"^[a-z0-9][a-z0-9\-]{0,62}$", description="registry model name"
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="baseline architecture")
    dataset: DatasetRequest = Field(default_factory=DatasetRequest, description="data source")
    train: TrainConfig = Field(default_factory=TrainConfig, description="baseline training")
    candidates: tuple[Candidate, ...] = Field(
        default_factory=default_candidates, min_length=1, description="compression plans to try"
    )
    nas: NASRequest | None = Field(None, description="also search architectures (NAS)")
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
        if "candidates" not in self.model_fields_set:  # the family's own default plans
            object.__setattr__(self, "candidates", default_candidates(self.model.family))
        if "budget" not in self.model_fields_set:  # and its own default budget
            object.__setattr__(self, "budget", default_budget(self.model.family))
        task = self.model.task_kind()
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

    @field_validator("candidates")
    @classmethod
    def _unique_ids(cls, cands: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        ids = [c.id for c in cands]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"candidates: ids must be unique (duplicated: {dupes})")
        return cands


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
