"""Datasets: the role of each column (spec.json), a stored dataset, and where a run's data comes
from (DESIGN §7)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from tasks.types.base import Frozen

MAX_CARDINALITY = 50_000_000
"""Ids per categorical column: a table of 50M rows x 64 dims is 12.8 GB of float32, more than a
worker of the local stack holds; a larger id space must be hashed or bucketed first."""


MAX_MULTI_HOT = 1024
"""Ids a multi-hot column gives the model per row: 1024 int64 slots are 8 KiB a row, 16 MiB in a
batch of 2048 rows, before the pooled lookup reads them."""


class CategoricalColumn(Frozen):
    """One id column: an embedding table of `cardinality` rows.

    Example: ``CategoricalColumn(name="recent_categories", cardinality=60, multi_hot=8)``: a
    list<int64> column; the model pools (nn.EmbeddingBag) the last 8 ids of each row.
    """

    name: str = Field(description="column name; int64 ids in [0, cardinality) (a list of them "
                      "per row if multi_hot is set)")
    cardinality: int = Field(
        gt=0, le=MAX_CARDINALITY,
        description=f"number of distinct ids (embedding table rows), at most {MAX_CARDINALITY:,}")
    multi_hot: int | None = Field(
        None, ge=1, le=MAX_MULTI_HOT,
        description="unset: one int64 id per row. N: a list<int64> column (a user's recent "
        "categories, a query's terms; in a CSV: ids separated by spaces) whose rows hold any "
        "number of ids, possibly none; the model pools the last N of each row (most recent "
        "last, as in history)")

    @field_validator("multi_hot", mode="before")
    @classmethod
    def _a_count_not_a_flag(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read true as 1
            raise ValueError(f"multi_hot is how many ids of a row the model reads, e.g. 8, not a "
                             f"flag (got {str(value).lower()})")
        return value

    @model_serializer(mode="wrap")
    def _single_id_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a single-id column is written without multi_hot, so a spec's JSON, and the dataset
        # sha256 taken over it, are what they were before the field existed
        data = handler(self)
        if self.multi_hot is None:
            data.pop("multi_hot", None)
        return data  # type: ignore[no-any-return]


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

    builtin: Literal["tiny", "small", "small_ids"] | None = Field(
        "tiny", description="generate the built-in e-commerce click log of this size "
        "(small_ids: the rows of small over a few thousand ids per table)"
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
                "dataset: set exactly one of dataset.builtin ('tiny'|'small'|'small_ids') or "
                "dataset.uri "
                f"(got builtin={self.builtin!r}, uri={self.uri!r})"
            )
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError(f"dataset.uri must start with s3:// (got {self.uri!r})")
        return self
