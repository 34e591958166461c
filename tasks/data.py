"""Datasets: a split laid out as model inputs (`Arrays`).

The built-in click log is made by `tasks.generator.generate`, a user's own by
`tasks.dataimport.import_dataset`; both are stored by `tasks.artifacts.BlobStore.put_dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from tasks.types import CategoricalColumn, DatasetSpec

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # shares of rows by time: train on the past, test on the future


PAD = -1  # history and multi-hot padding before the model maps it to its padding row


@dataclass(frozen=True)
class Arrays:
    """A split as model inputs, laid out for one task (see `to_arrays`).

    dense float32 [N, D] and sparse int64 [N, T] are the forward's two inputs; label is the
    click (float32, ranking) or the clicked item id (int64, retrieval / next_item). groups are
    the query/session ids of the rows (ranking lists), segments the segment columns' values,
    catalogue the item-feature ids of every item [n_items, F] (retrieval).

    sparse (ranking, retrieval) holds the categorical columns in spec order, each in its
    `column_slots` slice: a single-id column one slot (its id), a multi-hot column
    `multi_hot` = K slots (the row's last K ids, most recent last, left-padded with PAD).
    next_item: the history, [N, history_width], laid out like a multi-hot column.
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


def column_slots(categorical: Sequence[CategoricalColumn]) -> list[slice]:
    """Each column's slice of the sparse columns, in order: 1 slot per single-id column,
    `multi_hot` slots per multi-hot one.

    Example: user_id, recent_categories (multi_hot=3), device -> [0:1], [1:4], [4:5].
    """
    slots: list[slice] = []
    start = 0
    for column in categorical:
        width = column.multi_hot or 1
        slots.append(slice(start, start + width))
        start += width
    return slots


def item_slot(spec: DatasetSpec) -> int | None:
    """The item id's column of the ranking `sparse` array (`column_slots`); None without an
    item_id column."""
    names = [c.name for c in spec.categorical]
    if spec.item_id not in names:
        return None
    return column_slots(spec.categorical)[names.index(spec.item_id)].start


def history_matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """list<int64> -> [N, width] int64: each row's last `width` ids, most recent last,
    right-aligned, left-padded with PAD.

    Example: [[1, 2, 3], [], [7]], width 2 -> [[2, 3], [PAD, PAD], [PAD, 7]].
    """
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.full((len(col), width), PAD, np.int64)
    if len(col) == 0:
        return out
    offsets = col.offsets.to_numpy().astype(np.int64)  # into values, which a slice keeps whole
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(col)), lengths)  # one entry per id of every row
    at = np.arange(offsets[0], offsets[-1])
    back = np.repeat(offsets[1:], lengths) - at  # 1 for a row's last id, 2 the one before...
    keep = back <= width
    out[rows[keep], width - back[keep]] = values[at[keep]]
    return out


def id_matrix(table: pa.Table, columns: Sequence[CategoricalColumn]) -> np.ndarray:
    """The columns' ids as [N, T] int64, each column in its `column_slots` slice."""
    parts = [table[c.name].to_numpy().astype(np.int64)[:, None] if c.multi_hot is None
             else history_matrix(table[c.name], c.multi_hot) for c in columns]
    return np.concatenate(parts, 1) if parts else np.zeros((table.num_rows, 0), np.int64)


def to_arrays(table: pa.Table, spec: DatasetSpec, task: str = "ranking",
              history_width: int = 50) -> Arrays:
    """One split as inputs for `task`:

    - ranking: dense features, every categorical column's ids (`id_matrix`), label = the click;
    - retrieval: the clicked rows; sparse = the query-side columns' ids (`query_side`, laid out
      as in ranking), label = the clicked item, catalogue = each item's feature ids (last seen
      in this split; 0 unseen);
    - next_item: the clicked rows; sparse = the history [N, history_width] (PAD-padded),
      label = the clicked item.

    sparse is the concatenation, in spec.categorical order, of one slot per single-id column
    (its id) and multi_hot = K slots per multi-hot column: the row's last K ids right-aligned,
    left-padded with PAD (`history_matrix(column, K)`); `column_slots` gives each column's
    slice. A row of user_id=5, recent_categories=[3, 9] (multi_hot=3), device=1 is
    [5, PAD, 3, 9, 1]. Without multi-hot columns, sparse is [N, len(categorical)], one id each.
    """
    segments = {c: table[c].to_numpy(zero_copy_only=False) for c in spec.segments}
    groups = table[spec.query_id].to_numpy().astype(np.int64) if spec.query_id else None
    if task == "ranking":
        dense = np.stack([table[c].to_numpy().astype(np.float32) for c in spec.dense], axis=1) \
            if spec.dense else np.zeros((table.num_rows, 0), np.float32)
        sparse = id_matrix(table, spec.categorical)
        label = table[spec.label].to_numpy().astype(np.float32)
        return Arrays(dense, sparse, label, groups, segments)
    if spec.item_id is None:
        raise ValueError(f"dataset spec {spec.name}: the {task} task needs item_id set")
    clicked = np.flatnonzero(table[spec.label].to_numpy().astype(np.int64) == 1)
    item = table[spec.item_id].to_numpy().astype(np.int64)
    if task == "retrieval":
        bags = [c.name for c in spec.categorical if c.multi_hot and c.name in spec.item_features]
        if bags:
            raise ValueError(f"dataset spec {spec.name}: item_features {bags} are multi-hot; the "
                             "catalogue holds one id per item feature")
        query = set(query_side(spec))
        sparse = id_matrix(table, [c for c in spec.categorical if c.name in query])
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
