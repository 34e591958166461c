"""Stage configs: one frozen config per stage kind (DESIGN §4), the `StageConfig` union on
`kind`, and a `Candidate` = a plan of stages."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tasks.quant.schemes import EMBEDDING, EMBEDDING_SCHEMES, LINEAR, LINEAR_SCHEMES
from tasks.types.base import ArtifactRef, Frozen
from tasks.types.model import CustomSpec, DlrmSpec, ModelSpec, SasrecSpec, TwoTowerSpec

# the names of the quantization scheme registry (tasks.quant.schemes): one entry there is a
# new dtype of the config, the UI form, calibration and mixed precision
LinearQuant = Literal[LINEAR_SCHEMES]  # type: ignore[valid-type]
EmbeddingQuant = Literal[EMBEDDING_SCHEMES]  # type: ignore[valid-type]


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

    @model_validator(mode="after")
    def _measured(self) -> MixedPrecision:
        bad = [c for c in self.embedding_choices if not EMBEDDING[c].measured] + \
            [c for c in self.linear_choices if not LINEAR[c].measured]
        if bad:
            ok = [n for n, s in (*EMBEDDING.items(), *LINEAR.items()) if s.measured]
            raise ValueError(f"quantize.mixed_precision: {bad} have no calibrated sensitivity "
                             f"to choose by; choose among {sorted(set(ok))}")
        return self


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
            scale and offset, packed 1 / 2 / 4 values per byte), ``fp16`` / ``bf16``, ``none``;
            or tiered, ``tiered_<head>_<tail>`` (``tiered_int8_int2``, ``tiered_int4_int2``,
            ``tiered_int8_int4``): the ``head_share`` most looked-up rows at the first dtype,
            the long tail at the second.
        head_share: tiered tables: the share of each table's rows kept at the head dtype,
            the rows looked up most often on the train split (ties: the larger row norm).
        row_range: per-row range of sub-byte tables: ``mse`` (clip that minimises the row's
            squared error) or ``minmax`` (what torch's one-shot prepack does).
        activation_range: static int8 only: which calibrated range to use.
        mixed_precision: when set, ``linear``/``embeddings`` are ignored and each layer gets
            the cheapest dtype the sensitivity table allows within the run's budget.
        finetune_epochs: quantization-aware fine-tuning (tasks.quant.qat) before the
            conversion: the model computes with fake-quantized tables and weights and learns
            the input model's outputs on the train split; 0 = one-shot.

    Example: ``QuantizeConfig(linear="int4_weight_only", group_size=32, embeddings="rowwise_int4")``
    """

    kind: Literal["quantize"] = "quantize"
    linear: LinearQuant = Field("dynamic_int8", description="Linear layers")
    group_size: int | None = Field(None, gt=0, description="weight-only group width")
    embeddings: EmbeddingQuant = Field("rowwise_int8", description="embedding tables")
    row_range: Literal["minmax", "mse"] = Field("mse", description="per-row range (sub-byte)")
    head_share: float = Field(
        0.2, gt=0, lt=1, description="tiered tables: share of rows (the most looked-up on the "
        "train split) kept at the head dtype")
    activation_range: Literal["minmax", "percentile", "mse", "entropy"] = Field(
        "mse", description="static int8 activation clipping range")
    mixed_precision: MixedPrecision | None = Field(None, description="per-layer dtypes")
    layers: dict[str, str] = Field(
        default_factory=dict, description="module path -> dtype for that one table or layer, "
        "overriding linear / embeddings (e.g. {'embeddings.3': 'rowwise_int2'}); a recipe "
        "search sets per-table precision this way")
    finetune_epochs: int = Field(
        0, ge=0, le=20, description="quantization-aware fine-tuning epochs before converting "
        "(fake quantization, straight-through estimator, fitting the input model's outputs); "
        "0 = one-shot")
    finetune_lr: float = Field(5e-4, gt=0, description="quantization-aware fine-tuning rate")

    @field_validator("linear", mode="before")
    @classmethod
    def _no_int2_linear(cls, v: object) -> object:
        # a bit width only tables have (int2): say so, rather than list every choice
        table_only = {e.bits for e in EMBEDDING.values()} - {q.bits for q in LINEAR.values()}
        bits = next((b for b in table_only if f"int{b}" in str(v)), None)
        if isinstance(v, str) and v not in LINEAR and bits is not None:
            raise ValueError(f"quantize.linear: int{bits} is for embedding tables only (got "
                             f"{v!r}); use int4_weight_only or an int8 mode for Linear layers")
        return v

    @field_validator("layers")
    @classmethod
    def _known_dtypes(cls, layers: dict[str, str]) -> dict[str, str]:
        bad = {k: v for k, v in layers.items() if v not in LINEAR and v not in EMBEDDING}
        if bad:
            raise ValueError(f"quantize.layers: unknown dtype(s) {bad}; a table takes one of "
                             f"{list(EMBEDDING)}, a Linear layer one of {list(LINEAR)}")
        return layers

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.mixed_precision is not None and self.layers:
            raise ValueError("quantize: set mixed_precision or layers, not both (mixed "
                             "precision chooses every layer's dtype itself)")
        if self.mixed_precision is None and self.linear == "none" and \
                self.embeddings == "none" and not self.layers:
            raise ValueError("quantize: linear and embeddings are both 'none'; set one of them")
        if self.group_size is not None and not LINEAR[self.linear].group_wise:
            raise ValueError(f"quantize.group_size applies to int8/int4_weight_only only "
                             f"(linear is {self.linear!r}); remove it or change linear")
        return self

    def needs_calibration(self) -> bool:
        return self.mixed_precision is not None or LINEAR[self.linear].needs_ranges

    def label(self) -> str:
        qat = f",qat{self.finetune_epochs}" if self.finetune_epochs else ""
        if self.mixed_precision is not None:
            return f"quantize(mixed@{self.mixed_precision.budget_fraction:g}{qat})"
        lin = self.linear + (f"/g{self.group_size}" if self.group_size else "") + (
            f"/{self.activation_range}" if LINEAR[self.linear].needs_ranges else "")
        emb = self.embeddings + ("/minmax" if self.row_range == "minmax" and
                                 EMBEDDING[self.embeddings].row_range else "")
        if self.layers:
            counts: dict[str, int] = {}
            for v in self.layers.values():
                counts[v] = counts.get(v, 0) + 1
            emb += "[" + ",".join(f"{n}x{v.removeprefix('rowwise_')}"
                                  for v, n in sorted(counts.items())) + "]"
        if any(EMBEDDING[v].head_bits for v in (self.embeddings, *self.layers.values())
               if v in EMBEDDING):
            emb += f"@head{self.head_share:g}"
        return "quantize(" + "+".join(p for p in (lin, emb) if not p.startswith("none")) + qat + ")"


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

    Example: ``DistillConfig(student=DlrmSpec(embedding_dim=16, bottom_mlp=(64, 16)))``
    """

    kind: Literal["distill"] = "distill"
    student: ModelSpec = Field(
        default_factory=lambda: DlrmSpec(embedding_dim=16, bottom_mlp=(64, 16), top_mlp=(128, 64)),
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
        if isinstance(s, SasrecSpec):
            arch = f"d{s.embedding_dim},{s.layers}L{s.heads}H,ffn{s.ffn_dim}"
        elif isinstance(s, TwoTowerSpec):
            arch = f"d{s.embedding_dim},towers{'x'.join(map(str, s.tower_mlp))}"
        elif isinstance(s, CustomSpec):
            arch = f"{s.class_path},d{s.embedding_dim}"
        else:
            arch = f"d{s.embedding_dim},top{'x'.join(map(str, s.top_mlp))}"
        return f"distill({arch}{extra})"


class NASTrialConfig(Frozen):
    """One NAS trial: train the architecture `student` for a bounded number of steps by
    distillation from the input model (soft labels at `temperature`), as distill does.

    The search space is the DLRM ranker's, so the student is a `DlrmSpec`.

    Example: ``NASTrialConfig(student=DlrmSpec(embedding_dim=16, top_mlp=(64,)), steps=300)``
    """

    kind: Literal["nas_trial"] = "nas_trial"
    student: DlrmSpec = Field(description="the sampled architecture")
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
