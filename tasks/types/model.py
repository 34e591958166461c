"""What a model is: `ModelSpec`, a union discriminated by `family` (like `StageConfig` by
`kind`), so the Prefect form shows one family's fields; and the baseline's training loop.

Families and what their forward(dense, sparse) takes and returns (see tasks/models):
``dlrm`` ranks (every categorical id + dense features -> one click logit per row);
``two_tower`` retrieves (the query/user side ids -> a score for every catalogue item, from the
item-embedding index the item tower fills); ``sasrec`` recommends the next item (the user's
history of item ids -> a score for every catalogue item); ``custom`` is a user's class
(`class_path`) taking the inputs of its `task`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from tasks.types.base import Frozen
from tasks.userclass import user_class


class TableSpec(Frozen):
    name: str = Field(description="categorical column the table embeds")
    rows: int = Field(gt=0, description="number of embedding rows")
    multi_hot: int | None = Field(
        None, ge=1, description="the column's ids per row when it is multi-hot (the model pools "
        "them); unset: one id")

    @model_serializer(mode="wrap")
    def _single_id_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a one-id table is written as before the field existed: the spec a stored model
        # carries, and so its bytes and sha256, do not change
        data = handler(self)
        if self.multi_hot is None:
            data.pop("multi_hot", None)
        return data  # type: ignore[no-any-return]


Family = Literal["dlrm", "two_tower", "sasrec", "custom"]
ProblemKind = Literal["ranking", "retrieval", "next_item"]
MAIN_METRIC: dict[str, str] = {"ranking": "auc", "retrieval": "recall@50",
                               "next_item": "ndcg@10"}
DEFAULT_HISTORY = 20
"""History items a model reads when its family has no `max_history` (the arrays' width)."""


def _family_required(schema: dict[str, Any]) -> None:
    # in the JSON schema (Prefect form, REST validation) only dlrm may leave `family` out, so
    # exactly one member of the union matches any request
    schema["required"] = sorted({*schema.get("required", ()), "family"})


class ModelSpecBase(Frozen):
    """What every family has: the embedding width, and the data-dependent fields that
    `tasks.models.resolve` fills from the dataset spec (internal: not in the form)."""

    FROM_DATASET: ClassVar[tuple[str, ...]] = (
        "tables", "num_dense", "item_table", "item_feature_tables")

    family: Family = Field(description="model family")  # first in the form; set by each member
    embedding_dim: int = Field(64, gt=0, le=1024, description="embedding width of every table")
    tables: SkipJsonSchema[tuple[TableSpec, ...]] = Field(
        (), description="filled from the dataset spec")
    num_dense: SkipJsonSchema[int] = Field(0, ge=0, description="filled from the dataset spec")
    item_table: SkipJsonSchema[str | None] = Field(
        None, description="filled from the dataset spec (item_id)")
    item_feature_tables: SkipJsonSchema[tuple[str, ...]] = Field(
        (), description="filled from the dataset spec (item_features)")

    @model_validator(mode="before")
    @classmethod
    def _only_this_familys_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                owners = [name for name, member in FAMILY_SPECS.items()
                          if key in member.model_fields and key not in cls.model_fields]
                if owners:
                    either = " or ".join(map(repr, owners))
                    raise ValueError(
                        f"model.{key} is for family {either} only (family is "
                        f"{cls.model_fields['family'].default!r}); remove it or set family "
                        f"to {either}")
        return data

    @model_serializer(mode="wrap")
    def _without_unresolved(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a spec not yet resolved (a request's) is written without the dataset fields, so its
        # JSON is what the form and the REST schema accept; a resolved one keeps them
        data = handler(self)
        for name in self.FROM_DATASET:
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data  # type: ignore[no-any-return]

    def problem_kind(self) -> ProblemKind:
        """The problem kind: which inputs forward takes and which metrics judge it."""
        raise NotImplementedError

    def history_width(self) -> int:
        """History items per row the model reads (next_item inputs; see tasks.data)."""
        return DEFAULT_HISTORY


class DlrmSpec(ModelSpecBase):
    """DLRM ranker: every categorical id + dense features -> one click logit per row.

    Example: ``DlrmSpec(embedding_dim=32, bottom_mlp=(128, 32), top_mlp=(128, 64))``
    """

    model_config = ConfigDict(title="dlrm (ranking)")

    family: Literal["dlrm"] = Field("dlrm", description="model family: dlrm ranks rows")
    bottom_mlp: tuple[int, ...] = Field((128, 64), description="bottom MLP widths (last = dim)")
    top_mlp: tuple[int, ...] = Field((256, 128), description="top MLP hidden widths")
    table_dims: dict[str, int] = Field(
        default_factory=dict, description="per-table width (table name -> dim); a table of "
        "another width than embedding_dim is projected to it by a Linear")
    interaction: Literal["dot", "cat"] = Field(
        "dot", description="feature interaction: pairwise dot products, or concatenation")

    def problem_kind(self) -> ProblemKind:
        return "ranking"

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


class TwoTowerSpec(ModelSpecBase):
    """Two-tower retriever: the query/user side ids -> a score for every catalogue item.

    Example: ``TwoTowerSpec(embedding_dim=32, tower_mlp=(64,))``
    """

    model_config = ConfigDict(title="two_tower (retrieval)", json_schema_extra=_family_required)

    family: Literal["two_tower"] = Field(
        "two_tower", description="model family: two_tower retrieves catalogue items")
    tower_mlp: tuple[int, ...] = Field(
        (128,), description="hidden widths of each tower's MLP (output = embedding_dim)")
    temperature: float = Field(0.05, gt=0, le=10,
                               description="softmax temperature of the in-batch loss")

    def problem_kind(self) -> ProblemKind:
        return "retrieval"


class SasrecSpec(ModelSpecBase):
    """SASRec next-item recommender: the user's history of item ids -> a score per item.

    Example: ``SasrecSpec(layers=1, heads=1)``
    """

    model_config = ConfigDict(title="sasrec (next_item)", json_schema_extra=_family_required)

    family: Literal["sasrec"] = Field(
        "sasrec", description="model family: sasrec recommends the next item")
    layers: int = Field(2, ge=1, le=24, description="transformer blocks")
    heads: int = Field(2, ge=1, le=64, description="attention heads per block")
    ffn_dim: int = Field(128, ge=1, description="feed-forward hidden width")
    max_history: int = Field(DEFAULT_HISTORY, ge=1, le=512,
                             description="most recent history items read")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout while training")

    def problem_kind(self) -> ProblemKind:
        return "next_item"

    def history_width(self) -> int:
        return self.max_history

    @model_validator(mode="after")
    def _heads_divide(self) -> SasrecSpec:
        if self.embedding_dim % self.heads:
            raise ValueError(f"model.heads ({self.heads}) must divide embedding_dim "
                             f"({self.embedding_dim})")
        return self


class CustomSpec(ModelSpecBase):
    """A user's own installed model class, built as ``Class(spec)`` (docs/byo-model.md).

    Example: ``CustomSpec(class_path="shop.models:Ranker", task="ranking",
    options={"hidden": 64})``
    """

    model_config = ConfigDict(title="custom (your class)", json_schema_extra=_family_required)

    family: Literal["custom"] = Field("custom", description="model family: your own class")
    task: ProblemKind = Field(
        description="which inputs the class takes (ranking | retrieval | next_item)")
    class_path: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'package.module:Class' of an installed, importable model class (never "
                    "loaded from the artifact store)")
    options: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="hyperparameters passed to the class")
    max_history: int = Field(DEFAULT_HISTORY, ge=1, le=512,
                             description="next_item: most recent history items read")

    @model_validator(mode="before")
    @classmethod
    def _needs_class(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("class_path") is None or data.get("task") is None):
            raise ValueError("family 'custom' needs class_path ('package.module:Class') and "
                             "task (ranking | retrieval | next_item)")
        return data

    @model_validator(mode="after")
    def _importable(self) -> CustomSpec:
        user_class(self.class_path)  # refused here, before any work, if it cannot be built
        return self

    def problem_kind(self) -> ProblemKind:
        return self.task

    def history_width(self) -> int:
        return self.max_history


FAMILY_SPECS: dict[str, type[ModelSpecBase]] = {
    "dlrm": DlrmSpec, "two_tower": TwoTowerSpec, "sasrec": SasrecSpec, "custom": CustomSpec}
MODEL_SPECS = (DlrmSpec, TwoTowerSpec, SasrecSpec, CustomSpec)
"""The members of ModelSpec, for isinstance."""


def _family_tag(value: Any) -> str:
    # older requests and records omit `family`: the ranker was the only family then
    if isinstance(value, dict):
        return str(value.get("family", "dlrm"))
    return str(getattr(value, "family", "dlrm"))


ModelSpec = Annotated[
    Annotated[DlrmSpec, Tag("dlrm")] | Annotated[TwoTowerSpec, Tag("two_tower")]
    | Annotated[SasrecSpec, Tag("sasrec")] | Annotated[CustomSpec, Tag("custom")],
    Discriminator(
        _family_tag, custom_error_type="model_family",
        custom_error_message="model.family must be one of 'dlrm', 'two_tower', 'sasrec', "
                             "'custom' (left out: 'dlrm')"),
]
"""Enough to rebuild the module: family + hyperparameters (+ tables once resolved)."""

_ADAPTER: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


def parse_model_spec(obj: str | bytes | dict[str, Any] | ModelSpecBase) -> ModelSpec:
    """A stored model spec (JSON text or a dict) as its family's class.

    Lenient on purpose, unlike a request: before the union, a spec carried every family's
    fields (a ranker's record holds `layers`, `class_path`, ...), and models stored then must
    still load. Keys that are not fields of the record's family are dropped; what remains is
    validated as strictly as ever.
    """
    if isinstance(obj, MODEL_SPECS):
        return obj
    raw = json.loads(obj) if isinstance(obj, str | bytes) else obj
    if isinstance(raw, dict):
        member = FAMILY_SPECS.get(_family_tag(raw))
        if member is not None:
            raw = {k: v for k, v in raw.items() if k in member.model_fields}
    return _ADAPTER.validate_python(raw)


DEFAULT_EPOCHS = 3
"""Passes over the train split when a TrainConfig leaves `epochs` out (and min_steps allows)."""


class TrainConfig(Frozen):
    """How a model is trained. The defaults scale with the train split, so a few thousand rows
    and a million rows both get a useful model without tuning: `batch_size` left out is about
    rows/200 (a power of two in [64, 2048]), and `epochs` left out is 3, or more when a small
    split needs them for `min_steps` optimizer steps. Early stopping on the valid split ends
    training once it stops helping and keeps the best epoch.

    Example: ``TrainConfig(epochs=5, batch_size=512)`` (at most 5 passes of 512 rows a step).
    """

    epochs: int | None = Field(
        None, ge=1, le=100, description="passes over the train split, at most (left out: 3, "
        "or as many as `min_steps` needs, up to 100); early stopping on valid stops after "
        "`patience` epochs without improvement and keeps the best epoch")
    min_steps: int = Field(
        600, ge=0, le=1_000_000, description="when epochs is left out: the fewest optimizer "
        "steps training plans (a small train split gets more epochs; early stopping still "
        "applies)")
    patience: int = Field(
        2, ge=1, le=100, description="epochs without a better validation loss before training "
        "stops (the best epoch's weights are kept)")
    batch_size: int | None = Field(
        None, ge=8, description="rows per step; left out: about rows/200, a power of two in "
        "[64, 2048] (about 200 steps an epoch on small data, 2048 from 400k train rows)")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 on every parameter")
    embedding_l2: float = Field(
        0.0, ge=0, le=1.0, description="L2 on the embedding vectors a batch looks up: this "
        "times the sum of their squared norms over the batch's rows (a row's table entries are "
        "held back only when it is used)")
    seed: int = Field(0, ge=0, description="torch seed (init and shuffling)")

    def rows_per_step(self, rows: int) -> int:
        """`batch_size`, or the default for a train split of `rows` rows."""
        if self.batch_size is not None:
            return self.batch_size
        return max(64, min(2048, 1 << max(int(rows // 200).bit_length() - 1, 0)))

    def passes(self, rows: int) -> int:
        """Epochs at most: `epochs`, or 3 and as many more as `min_steps` steps need (<= 100)."""
        if self.epochs is not None:
            return self.epochs
        steps = -(-rows // self.rows_per_step(rows))
        return max(DEFAULT_EPOCHS, min(100, -(-self.min_steps // max(steps, 1))))
