"""Test data with a multi-hot column, derived from the built-in click log."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.types import CategoricalColumn, DatasetSpec


def with_recent_categories(tables: dict[str, pa.Table], data: DatasetSpec, width: int = 8,
                           ) -> tuple[dict[str, pa.Table], DatasetSpec]:
    """The splits plus `recent_categories`: the categories of the user's earlier clicks (its
    `history`), a multi-hot column of `width` ids; the generator's ground truth favours the
    category of the last click, so it carries signal of its own."""
    items = next(c.cardinality for c in data.categorical if c.name == "item_id")
    cats = next(c.cardinality for c in data.categorical if c.name == "category_id")
    category = np.zeros(items, np.int64)
    for t in tables.values():
        category[t["item_id"].to_numpy()] = t["category_id"].to_numpy()
    out = {}
    for split, t in tables.items():
        history = t["history"].combine_chunks()
        ids = pa.ListArray.from_arrays(history.offsets, pa.array(
            category[history.values.to_numpy()], pa.int64()))
        out[split] = t.append_column("recent_categories", ids)
    spec = data.model_copy(update={
        "name": data.name + "-recent", "categorical": (*data.categorical, CategoricalColumn(
            name="recent_categories", cardinality=cats, multi_hot=width))})
    return out, spec
