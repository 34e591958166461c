"""Datasets: the role of each column (spec.json), a stored dataset, and where a run's data comes
from (DESIGN §7)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.types.base import Frozen

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
