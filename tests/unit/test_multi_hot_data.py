"""Multi-hot categorical columns on the data side: the spec field, `column_slots`, and the
sparse layout `to_arrays` builds (the last N ids of a row, right-aligned, PAD on the left);
without a multi-hot column, arrays and spec JSON exactly as before the field existed."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from tasks.data import PAD, SPLITS, column_slots, history_matrix, query_side, to_arrays
from tasks.generator import generate
from tasks.types import CategoricalColumn, DatasetSpec

P = PAD
SPEC = DatasetSpec(
    name="bags", categorical=(
        CategoricalColumn(name="user_id", cardinality=10),
        CategoricalColumn(name="tags", cardinality=10, multi_hot=3),
        CategoricalColumn(name="item_id", cardinality=20),
        CategoricalColumn(name="terms", cardinality=50, multi_hot=1),
        CategoricalColumn(name="category_id", cardinality=5),
    ), dense=("price",), user_id="user_id", item_id="item_id", item_features=("category_id",))


def _table() -> pa.Table:
    ids = pa.list_(pa.int64())
    return pa.table({
        "user_id": [5, 6, 7, 8], "item_id": [11, 12, 13, 14], "category_id": [1, 2, 3, 4],
        "tags": pa.array([[3, 9], [], [1, 2, 3, 4, 5], [0]], ids),  # shorter, empty, longer
        "terms": pa.array([[40, 41], [7], [], [49]], ids),
        "price": pa.array([1.5, 2.5, 3.5, 4.5], pa.float32()), "click": [1, 0, 1, 1],
    })


def test_column_slots_give_each_column_its_slice_in_spec_order():
    assert column_slots(SPEC.categorical) == [slice(0, 1), slice(1, 4), slice(4, 5), slice(5, 6),
                                              slice(6, 7)]
    assert column_slots(()) == []


def test_ranking_sparse_holds_the_last_n_ids_right_aligned_left_padded():
    arrays = to_arrays(_table(), SPEC)
    assert arrays.sparse.dtype == np.int64
    np.testing.assert_array_equal(arrays.sparse, [
        # user  tags x3      item  terms  category
        [5, P, 3, 9, 11, 41, 1],
        [6, P, P, P, 12, 7, 2],  # no tags: all padding
        [7, 3, 4, 5, 13, P, 3],  # five tags: the last three; no terms
        [8, P, P, 0, 14, 49, 4],
    ])
    table = _table()
    for column, slots in zip(SPEC.categorical, column_slots(SPEC.categorical)):
        if column.multi_hot:  # each multi-hot slice is exactly history_matrix(column, N)
            np.testing.assert_array_equal(arrays.sparse[:, slots],
                                          history_matrix(table[column.name], column.multi_hot))
    np.testing.assert_array_equal(arrays.dense, [[1.5], [2.5], [3.5], [4.5]])
    np.testing.assert_array_equal(arrays.label, [1, 0, 1, 1])


def test_retrieval_sparse_lays_out_the_query_side_columns_the_same_way():
    assert query_side(SPEC) == ["user_id", "tags", "terms"]
    arrays = to_arrays(_table(), SPEC, "retrieval")  # the clicked rows: 0, 2, 3
    np.testing.assert_array_equal(arrays.sparse, [[5, P, 3, 9, 41], [7, 3, 4, 5, P],
                                                  [8, P, P, 0, 49]])
    np.testing.assert_array_equal(arrays.label, [11, 13, 14])
    assert arrays.catalogue is not None and arrays.catalogue.shape == (20, 1)
    np.testing.assert_array_equal(arrays.catalogue[11:15, 0], [1, 2, 3, 4])


def test_retrieval_refuses_a_multi_hot_item_feature():
    spec = SPEC.model_copy(update={"item_features": ("category_id", "tags")})
    with pytest.raises(ValueError, match=r"^dataset spec bags: item_features \['tags'\] are "
                       "multi-hot; the catalogue holds one id per item feature$"):
        to_arrays(_table(), spec, "retrieval")


def test_history_matrix_of_sliced_chunks():
    column = pa.chunked_array([pa.array([[1, 2, 3], [], [7]]), pa.array([[4, 5], [6]])],
                              pa.list_(pa.int64()))
    np.testing.assert_array_equal(history_matrix(column.slice(1, 3), 2),
                                  [[P, P], [P, 7], [4, 5]])
    np.testing.assert_array_equal(history_matrix(column, 4),
                                  [[P, 1, 2, 3], [P, P, P, P], [P, P, P, 7], [P, P, 4, 5],
                                   [P, P, P, 6]])
    assert history_matrix(column.slice(0, 0), 3).shape == (0, 3)


def _stacked(table: pa.Table, names: list[str]) -> np.ndarray:
    """sparse as built before multi-hot columns existed: one int64 id per column."""
    return np.stack([table[c].to_numpy().astype(np.int64) for c in names], 1)


@pytest.mark.parametrize("task", ["ranking", "retrieval"])
def test_arrays_without_multi_hot_columns_are_byte_identical(task):
    tables, spec = generate("tiny", 0)
    spec = spec.model_copy(update={"categorical": tuple(  # its single-id columns
        c for c in spec.categorical if c.multi_hot is None)})
    for split in SPLITS:
        arrays = to_arrays(tables[split], spec, task)
        if task == "ranking":
            names, rows = [c.name for c in spec.categorical], np.arange(tables[split].num_rows)
        else:
            names = query_side(spec)
            rows = np.flatnonzero(tables[split][spec.label].to_numpy() == 1)
        expected = _stacked(tables[split], names)[rows]
        assert arrays.sparse.shape == expected.shape == (len(rows), len(names))
        assert arrays.sparse.dtype == expected.dtype and arrays.sparse.flags.c_contiguous
        assert arrays.sparse.tobytes() == expected.tobytes()


def test_spec_json_without_multi_hot_is_as_before():
    column = CategoricalColumn(name="device", cardinality=3)
    assert column.multi_hot is None
    assert column.model_dump_json() == '{"name":"device","cardinality":3}'  # dataset sha256s
    _, spec = generate("tiny", 0)
    assert spec.model_dump_json().count('"multi_hot"') == 1  # recent_categories' alone
    old = {"name": "old", "categorical": [{"name": "device", "cardinality": 3}], "dense": []}
    assert DatasetSpec.model_validate(old).categorical == (column,)


def test_spec_json_round_trip_with_multi_hot():
    assert SPEC.categorical[1].model_dump() == {"name": "tags", "cardinality": 10, "multi_hot": 3}
    assert DatasetSpec.model_validate_json(SPEC.model_dump_json()) == SPEC
    props = DatasetSpec.model_json_schema()["$defs"]["CategoricalColumn"]["properties"]
    assert set(props) == {"name", "cardinality", "multi_hot"}
    assert all("description" in p for p in props.values())  # the Prefect form shows them


@pytest.mark.parametrize(("value", "message"), [
    (0, "Input should be greater than or equal to 1"),
    (1025, "Input should be less than or equal to 1024"),
    (True, "multi_hot is how many ids of a row the model reads, e.g. 8, not a flag (got true)"),
])
def test_multi_hot_out_of_bounds_is_refused(value, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        CategoricalColumn(name="tags", cardinality=10, multi_hot=value)
