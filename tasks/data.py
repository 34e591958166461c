"""Datasets: a split laid out as model inputs (`Arrays`).

The built-in click log is made by `tasks.generator.generate`, a user's own by
`tasks.dataimport.import_dataset`; both are stored by `tasks.artifacts.BlobStore.put_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from tasks.types import DatasetSpec

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # shares of rows by time: train on the past, test on the future


PAD = -1  # history padding before the model maps it to its padding row


@dataclass(frozen=True)
class Arrays:
    """A split as model inputs, laid out for one task (see `to_arrays`).

    dense float32 [N, D] and sparse int64 [N, T] are the forward's two inputs; label is the
    click (float32, ranking) or the clicked item id (int64, retrieval / next_item). groups are
    the query/session ids of the rows (ranking lists), segments the segment columns' values,
    catalogue the item-feature ids of every item [n_items, F] (retrieval).
    """

    dense: np.ndarray
    sparse: np.ndarray
    label: np.ndarray
    groups: np.ndarray | None = None
    segments: dict[str, np.ndarray] = field(default_factory=dict)
    catalogue: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray | slice) -> Arrays:
        return replace(self, dense=self.dense[idx], sparse=self.sparse[idx],
                       label=self.label[idx],
                       groups=None if self.groups is None else self.groups[idx],
                       segments={k: v[idx] for k, v in self.segments.items()})

    def with_label(self, label: np.ndarray) -> Arrays:
        return replace(self, label=label)


def query_side(spec: DatasetSpec) -> list[str]:
    """Categorical columns the query/user tower reads: all but the item and its features."""
    item = {spec.item_id, *spec.item_features}
    return [c.name for c in spec.categorical if c.name not in item]


def _cardinality(spec: DatasetSpec, column: str | None) -> int:
    return next(c.cardinality for c in spec.categorical if c.name == column)


def history_matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """list<int64> -> [N, width] int64, most recent last, left-padded with PAD."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((len(col), width), PAD, np.int64)
    lengths = np.minimum(np.diff(offsets), width)
    for r in np.flatnonzero(lengths):
        end = offsets[r + 1]
        out[r, width - lengths[r]:] = values[end - lengths[r]:end]
    return out


def to_arrays(table: pa.Table, spec: DatasetSpec, task: str = "ranking",
              history_width: int = 50) -> Arrays:
    """One split as inputs for `task`:

    - ranking: dense features, every categorical id, label = the click;
    - retrieval: the clicked rows; sparse = the query-side ids (`query_side`), label = the
      clicked item, catalogue = each item's feature ids (last seen in this split; 0 unseen);
    - next_item: the clicked rows; sparse = the history [N, history_width] (PAD-padded),
      label = the clicked item.
    """
    segments = {c: table[c].to_numpy(zero_copy_only=False) for c in spec.segments}
    groups = table[spec.query_id].to_numpy().astype(np.int64) if spec.query_id else None
    if task == "ranking":
        dense = np.stack([table[c].to_numpy().astype(np.float32) for c in spec.dense], axis=1) \
            if spec.dense else np.zeros((table.num_rows, 0), np.float32)
        sparse = np.stack([table[c.name].to_numpy().astype(np.int64) for c in spec.categorical],
                          1)
        label = table[spec.label].to_numpy().astype(np.float32)
        return Arrays(dense, sparse, label, groups, segments)
    if spec.item_id is None:
        raise ValueError(f"dataset spec {spec.name}: the {task} task needs item_id set")
    clicked = np.flatnonzero(table[spec.label].to_numpy().astype(np.int64) == 1)
    item = table[spec.item_id].to_numpy().astype(np.int64)
    if task == "retrieval":
        cols = query_side(spec)
        sparse = np.stack([table[c].to_numpy().astype(np.int64) for c in cols], 1) if cols \
            else np.zeros((table.num_rows, 0), np.int64)
        catalogue = np.zeros((_cardinality(spec, spec.item_id), len(spec.item_features)),
                             np.int64)
        for j, c in enumerate(spec.item_features):
            catalogue[item, j] = table[c].to_numpy().astype(np.int64)
    elif task == "next_item":
        if spec.history is None:
            raise ValueError(f"dataset spec {spec.name}: the next_item task (sasrec) needs a "
                             "history column: set spec.history")
        sparse, catalogue = history_matrix(table[spec.history], history_width), None
    else:
        raise ValueError(f"unknown task {task!r}")
    full = Arrays(np.zeros((table.num_rows, 0), np.float32), sparse, item, groups, segments,
                  catalogue)
    return full.take(clicked)
