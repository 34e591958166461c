"""`recsqueeze dataset import`: a user's spec.json + Parquet/CSV, checked before any upload.

Pure (no S3): a small valid click log is written in every accepted layout and must load; then
each malformed variant must be refused with its exact message.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from tasks.data import PAD, SPLITS, to_arrays
from tasks.datacheck import DatasetError, validate
from tasks.dataimport import load_dataset, load_spec, load_splits, parse_id_lists, select_columns
from tasks.generator import generate
from tasks.types import DatasetSpec

N = 400  # splits by time: 280 train, 40 valid, 80 test
BOUNDS = {"train": (0, 280), "valid": (280, 320), "test": (320, 400)}
SPEC: dict[str, Any] = {
    "name": "shop-clicks", "label": "click",
    "categorical": [{"name": "user_id", "cardinality": 50}, {"name": "item_id", "cardinality": 100},
                    {"name": "category_id", "cardinality": 10}],
    "dense": ["price", "position"], "user_id": "user_id", "item_id": "item_id",
    "query_id": "session_id", "timestamp": "ts", "history": "history",
    "item_features": ["category_id"], "segments": ["popularity"],
}
KEPT = ["click", "user_id", "item_id", "category_id", "price", "position", "session_id", "ts",
        "history", "popularity"]


def _clicklog(seed: int = 0) -> pa.Table:
    """N time-ordered impressions; rows 0 and 1 of every split hold ids 0 and cardinality-1 and
    both labels, so the min/max and classes in the messages below are known."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 50, N), rng.integers(0, 100, N)
    click = (rng.random(N) < 0.3).astype(np.int8)
    history = [rng.integers(0, 100, rng.integers(0, 6)).tolist() for _ in range(N)]
    for lo, _ in BOUNDS.values():
        users[lo], items[lo], click[lo], history[lo] = 0, 0, 0, [0]
        users[lo + 1], items[lo + 1], click[lo + 1], history[lo + 1] = 49, 99, 1, [99]
    return pa.table({
        "user_id": users, "item_id": items, "category_id": items % 10,
        "session_id": np.arange(N) // 4, "ts": 1_700_000_000 + 60 * np.arange(N),
        "click": click, "price": rng.lognormal(3, 0.5, N).astype(np.float32),
        "position": rng.integers(1, 21, N).astype(np.float32),
        "history": pa.array(history, pa.list_(pa.int64())),
        "popularity": np.where(items < 20, "head", "tail"),
        "description": [f"item {i}, colour {c}" for i, c in zip(items, rng.integers(0, 5, N))],
    })


def _tags() -> pa.Array:
    """A multi-hot column of N rows: row i holds i % 5 ids counting up from i % 10, so rows are
    empty, shorter and longer than multi_hot=3; rows 0 and 1 of every split hold [0] and [9]."""
    tags = [[(i + j) % 10 for j in range(i % 5)] for i in range(N)]
    for lo, _ in BOUNDS.values():
        tags[lo], tags[lo + 1] = [0], [9]
    return pa.array(tags, pa.list_(pa.int64()))


def _splits(table: pa.Table) -> dict[str, pa.Table]:
    return {s: table.slice(lo, hi - lo) for s, (lo, hi) in BOUNDS.items()}


def _write(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    for name in table.column_names:  # history, multi-hot: "12 7 301"
        if pa.types.is_list(table[name].type):
            text = [" ".join(map(str, ids)) for ids in table[name].to_pylist()]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(text))
    pcsv.write_csv(table, path)


def _write_dataset(tmp_path: Path, spec: dict[str, Any], tables: dict[str, pa.Table],
                   layout: str) -> tuple[Path, Path]:
    """layout: parquet-dir / csv-dir (one file per split) or parquet-file / csv-file (one file,
    rows shuffled so that only the timestamp orders them)."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    fmt, form = layout.split("-")
    if form == "dir":
        data = tmp_path / "data"
        data.mkdir()
        for split, table in tables.items():
            _write(table, data / f"{split}.{fmt}")
        return spec_path, data
    data = tmp_path / f"clicks.{fmt}"
    table = pa.concat_tables(tables[s] for s in SPLITS)
    _write(table.take(np.random.default_rng(1).permutation(table.num_rows)), data)
    return spec_path, data


def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# --- valid data ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["parquet-dir", "csv-dir", "parquet-file", "csv-file"])
def test_valid_dataset_loads_in_every_layout(tmp_path, layout):
    original = _clicklog()
    spec_path, data = _write_dataset(tmp_path, SPEC, _splits(original), layout)
    tables, spec = load_dataset(spec_path, data)
    assert spec == DatasetSpec.model_validate(SPEC)
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 280, "valid": 40, "test": 80}
    loaded = pa.concat_tables(tables[s] for s in SPLITS)  # the single file comes back in ts order
    assert loaded.column_names == KEPT  # the free-text description is not kept
    assert loaded.schema.field("history").type == pa.list_(pa.int64())
    assert loaded.schema.field("click").type == pa.int8()
    assert loaded.schema.field("price").type == pa.float32()
    for name in ("ts", "click", "user_id", "item_id", "session_id", "history", "popularity"):
        assert loaded[name].to_pylist() == original[name].to_pylist(), name
    np.testing.assert_allclose(loaded["price"].to_numpy(), original["price"].to_numpy(), rtol=1e-6)


def test_built_in_generator_data_passes():
    tables, spec = generate("tiny", 0)
    validate(tables, spec)


def test_load_splits_splits_one_file_70_10_20_by_time(tmp_path):
    spec_path, data = _write_dataset(tmp_path, SPEC, _splits(_clicklog()), "parquet-file")
    tables = load_splits(data, load_spec(spec_path))
    ts = {s: tables[s]["ts"].to_numpy() for s in SPLITS}
    assert [len(ts[s]) for s in SPLITS] == [280, 40, 80]
    assert ts["train"].max() < ts["valid"].min() and ts["valid"].max() < ts["test"].min()


def test_one_file_split_keeps_each_session_whole(tmp_path):
    table = _clicklog()
    table = table.set_column(3, "session_id", pa.array(np.arange(N) // 6))  # 280, 320 cut sessions
    spec_path, data = _write_dataset(tmp_path, SPEC, _splits(table), "parquet-file")
    tables = load_splits(data, load_spec(spec_path))
    assert [tables[s].num_rows for s in SPLITS] == [282, 42, 76]  # cuts moved to session starts
    sessions = [set(tables[s]["session_id"].to_pylist()) for s in SPLITS]
    assert not (sessions[0] & sessions[1] or sessions[1] & sessions[2] or sessions[0] & sessions[2])


def test_select_columns_drops_extra_columns_and_casts_to_canonical_dtypes():
    table = _clicklog().slice(0, 5)
    table = table.set_column(0, "user_id", pc.cast(table["user_id"], pa.int32()))
    out = select_columns({"train": table}, DatasetSpec.model_validate(SPEC))["train"]
    assert out.column_names == KEPT and "description" in table.column_names
    assert out.schema.field("user_id").type == pa.int64()
    assert out["user_id"].to_pylist() == table["user_id"].to_pylist()


def test_csv_history_text_becomes_lists_of_ids():
    text = pa.chunked_array([["12 7 301", "", "  5 ", "4"]])
    lists = parse_id_lists(text, "history column 'history'", "x.csv")
    assert lists.type == pa.list_(pa.int64())
    assert lists.to_pylist() == [[12, 7, 301], [], [5], [4]]


@pytest.mark.parametrize("layout", ["parquet-dir", "csv-dir", "parquet-file", "csv-file"])
def test_multi_hot_column_loads_in_every_layout(tmp_path, layout):
    spec, tables = copy.deepcopy(SPEC), _splits(_clicklog())
    with_tags()(spec, tables)
    original = pa.concat_tables(tables[s] for s in SPLITS)
    spec_path, data = _write_dataset(tmp_path, spec, tables, layout)
    loaded, data_spec = load_dataset(spec_path, data)
    assert data_spec.categorical[3].model_dump() == {"name": "tags", "cardinality": 10,
                                                      "multi_hot": 3}
    train = loaded["train"]
    assert train.column_names == [*KEPT[:4], "tags", *KEPT[4:]]
    assert train.schema.field("tags").type == pa.list_(pa.int64())
    both = pa.concat_tables(loaded[s] for s in SPLITS)
    assert both["tags"].to_pylist() == original["tags"].to_pylist()  # "" in a CSV: []
    assert train["tags"].to_pylist()[:7] == [[0], [9], [2, 3], [3, 4, 5], [4, 5, 6, 7], [], [6]]
    sparse = to_arrays(train, data_spec).sparse  # user_id, item_id, category_id, tags x3
    assert sparse.shape == (280, 6)
    np.testing.assert_array_equal(sparse[:7, 3:], [[PAD, PAD, 0], [PAD, PAD, 9], [PAD, 2, 3],
                                                   [3, 4, 5], [5, 6, 7], [PAD, PAD, PAD],
                                                   [PAD, PAD, 6]])
    np.testing.assert_array_equal(sparse[:, 1], original["item_id"].to_numpy()[:280])


@pytest.mark.parametrize("dtype", [pa.list_(pa.int16()), pa.large_list(pa.int32()),
                                   pa.list_(pa.uint8())])
def test_multi_hot_parquet_of_any_integer_list_type_becomes_list_int64(tmp_path, dtype):
    spec, tables = copy.deepcopy(SPEC), _splits(_clicklog())
    with_tags()(spec, tables)
    for split, table in tables.items():
        tables[split] = _set_column(table, "tags", pc.cast(table["tags"], dtype))
    spec_path, data = _write_dataset(tmp_path, spec, tables, "parquet-dir")
    loaded, _ = load_dataset(spec_path, data)
    assert loaded["valid"].schema.field("tags").type == pa.list_(pa.int64())
    assert loaded["valid"]["tags"].to_pylist() == _tags()[280:320].to_pylist()


# --- malformed data: one problem each, refused with its exact message ----------------------
Mutation = Callable[[dict[str, Any], dict[str, pa.Table]], None]


def put(split: str, column: str, rows: dict[int, Any], dtype: pa.DataType | None = None) -> Mutation:
    """Set some rows of one column of one split."""
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        table = tables[split]
        values = table[column].to_pylist()
        for i, v in rows.items():
            values[i] = v
        index = table.schema.get_field_index(column)
        tables[split] = table.set_column(index, column, pa.array(values, dtype or table[column].type))
    return mutate


def change(split: str, fn: Callable[[pa.Table], pa.Table]) -> Mutation:
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        tables[split] = fn(tables[split])
    return mutate


def spec_with(**fields: Any) -> Mutation:
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        spec.update(fields)
    return mutate


def with_tags(multi_hot: int | None = 3) -> Mutation:
    """A multi-hot column 'tags' (10 ids; `_tags`) in the spec and in every split."""
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        entry = {"name": "tags", "cardinality": 10}
        spec["categorical"] = [*spec["categorical"], entry if multi_hot is None
                               else {**entry, "multi_hot": multi_hot}]
        for split, (lo, hi) in BOUNDS.items():
            tables[split] = tables[split].append_column("tags", _tags().slice(lo, hi - lo))
    return mutate


def steps(*mutations: Mutation) -> Mutation:
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        for step in mutations:
            step(spec, tables)
    return mutate


def drop_split(split: str) -> Mutation:
    def mutate(spec: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        del tables[split]
    return mutate


def _set_column(table: pa.Table, name: str, values: Any) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


CATS = SPEC["categorical"]
MALFORMED = [
    pytest.param(
        change("valid", lambda t: t.drop_columns(["click"])),
        "valid.parquet: missing column 'click' (label); columns present: "
        "user_id, item_id, category_id, session_id, ts, price, position, history, popularity, "
        "description; rename the column in the data or in spec.json", id="missing-label-column"),
    pytest.param(
        put("train", "click", {5: 2}),
        "train.parquet: label column 'click' has values other than 0/1: 2 (1 row, first at row 5); "
        "map it to 0/1 (1 = positive, e.g. clicked)", id="non-binary-label"),
    pytest.param(
        change("train", lambda t: _set_column(t, "click", pc.cast(t["click"], pa.float64()))),
        "train.parquet: label column 'click' has dtype double; it must be integer or bool 0/1: "
        "cast it to int8 once its values are 0/1", id="float-label"),
    pytest.param(
        change("test", lambda t: _set_column(t, "click", pa.array(np.zeros(80, np.int8)))),
        "test.parquet: label column 'click' has only 0s (80 rows); AUC needs both classes in the "
        "test split: use a longer test period or more data", id="test-split-one-class"),
    pytest.param(
        change("train", lambda t: _set_column(t, "category_id", pc.cast(t["category_id"], pa.string()))),
        "train.parquet: categorical column 'category_id' has wrong dtype string; ids must be "
        "integers in [0, 10): map raw values to ids 0..9 first (see docs/byo-data.md)",
        id="string-categorical"),
    pytest.param(
        put("test", "item_id", {3: 100}),
        "test.parquet: categorical column 'item_id' has ids out of range [0, 100): found min 0, "
        "max 100 (1 row, first at row 3); remap them, or raise cardinality to at least 101 in "
        "spec.json", id="id-out-of-range"),
    pytest.param(
        put("train", "user_id", {7: -1}),
        "train.parquet: categorical column 'user_id' has ids out of range [0, 50): found min -1, "
        "max 49 (1 row, first at row 7); negative ids are not allowed: map them to ids in 0..49",
        id="negative-id"),
    pytest.param(
        put("valid", "category_id", {3: None, 8: None}),
        "valid.parquet: categorical column 'category_id' has 2 null values (first at row 3); every "
        "row needs an id: give missing values an id of their own (e.g. 0 = unknown) and count it "
        "in cardinality", id="null-categorical"),
    pytest.param(
        put("valid", "price", {11: float("nan")}),
        "valid.parquet: dense column 'price' has 1 NaN value (first at row 11); replace NaN with a "
        "number (e.g. 0 or the column mean) and add a 0/1 column if missing matters",
        id="nan-dense"),
    pytest.param(
        put("test", "position", {2: float("-inf"), 9: float("inf")}),
        "test.parquet: dense column 'position' has 2 infinite values (first at row 2: -inf); clip "
        "it, or take a log, so every value is finite", id="inf-dense"),
    pytest.param(
        change("train", lambda t: _set_column(t, "price", pc.cast(t["price"], pa.string()))),
        "train.parquet: dense column 'price' has dtype string; dense features must be numbers "
        "(int, float or bool): parse it, or make it a categorical column", id="string-dense"),
    pytest.param(
        change("valid", lambda t: t.slice(0, 0)),
        "valid.parquet: empty split (0 rows); train, valid and test all need rows", id="empty-split"),
    pytest.param(
        drop_split("test"),
        "{data}: no test file (expected test.parquet or test.csv; found: train.parquet, "
        "valid.parquet); provide train, valid and test files, or one file to split by time",
        id="missing-split-file"),
    pytest.param(
        change("train", lambda t: _set_column(t, "session_id", pc.cast(t["session_id"], pa.string()))),
        "train.parquet: query_id column 'session_id' has dtype string; it must be an integer id per "
        "query/session: map each distinct value to an int first", id="string-query-id"),
    pytest.param(
        put("valid", "ts", {0: None}),
        "valid.parquet: timestamp column 'ts' has 1 null value (first at row 0); every row needs "
        "an event time: drop rows without one", id="null-timestamp"),
    pytest.param(
        put("train", "history", {4: [3, 100]}),
        "train.parquet: history column 'history' (item_id column 'item_id') has ids out of range "
        "[0, 100): found min 0, max 100 (1 id, first at row 4); history ids must be in item_id's "
        "id space: map them with the same mapping as item_id", id="history-id-out-of-range"),
    pytest.param(
        put("train", "history", {2: [None, 3]}),
        "train.parquet: history column 'history' has 1 null item id (first at row 2); drop them "
        "from the lists", id="history-null-id"),
    pytest.param(
        steps(with_tags(), change("train", lambda t: _set_column(t, "tags", t["category_id"]))),
        "train.parquet: multi-hot column 'tags' has dtype int64; it must be a list of integer ids "
        'per row (list<int64>; in a CSV: ids separated by spaces, e.g. "12 7 301"): write lists, '
        "or remove multi_hot from its spec.json entry for one id per row",
        id="multi-hot-not-a-list"),
    pytest.param(
        with_tags(multi_hot=None),
        "train.parquet: categorical column 'tags' holds lists (dtype list<element: int64>) but has "
        'no multi_hot; set "multi_hot": N in its categorical entry of spec.json for the model to '
        "pool the last N ids of each row, or write one id per row", id="lists-without-multi-hot"),
    pytest.param(
        steps(with_tags(), put("valid", "tags", {3: None})),
        "valid.parquet: multi-hot column 'tags' has 1 null value (first at row 3); write an empty "
        "list for a row without ids (in a CSV: an empty cell)", id="multi-hot-null-list"),
    pytest.param(
        steps(with_tags(), put("train", "tags", {2: [None, 3]})),
        "train.parquet: multi-hot column 'tags' has 1 null id (first at row 2); drop them from "
        "the lists", id="multi-hot-null-id"),
    pytest.param(
        steps(with_tags(), put("test", "tags", {4: [3, 10], 9: [12]})),
        "test.parquet: multi-hot column 'tags' has ids out of range [0, 10): found min 0, max 12 "
        "(2 ids, first at row 4: 10); remap them, or raise cardinality to at least 13 in "
        "spec.json", id="multi-hot-id-out-of-range"),
    pytest.param(
        steps(with_tags(), put("train", "tags", {6: [-1, -1, 3]})),
        "train.parquet: multi-hot column 'tags' has ids out of range [0, 10): found min -1, max 9 "
        "(2 ids, first at row 6: -1); negative ids are not allowed, padding included: write only "
        "the row's own ids (a row may hold fewer than multi_hot, or none), each in 0..9",
        id="multi-hot-negative-id"),
    pytest.param(
        change("test", lambda t: _set_column(t, "popularity", pa.array([f"s{i}" for i in range(80)]))),
        "test.parquet: segment column 'popularity' has 80 distinct values (at most 50); a segment "
        "groups rows into a few slices (e.g. head/tail): bucket it, or make it a categorical "
        "feature instead", id="segment-too-many-values"),
    pytest.param(
        put("train", "popularity", {6: None}),
        "train.parquet: segment column 'popularity' has 1 null value (first at row 6); fill them "
        "with a value of their own, e.g. 'unknown'", id="segment-null"),
    # spec.json: checked before any data is read
    pytest.param(
        spec_with(item_features=["category_id", "price"]),
        "{spec}: item_features: 'price' is not a categorical column (categorical: user_id, item_id, "
        "category_id); item features must be categorical ids: add it to categorical or drop it "
        "from item_features", id="item-feature-not-categorical"),
    pytest.param(
        spec_with(item_features=["item_id"]),
        "{spec}: item_features: 'item_id' is item_id; list only the columns that describe the "
        "item besides its id", id="item-feature-is-item-id"),
    pytest.param(
        spec_with(user_id="session_id"),
        '{spec}: user_id: \'session_id\' is not a categorical column; add {"name": "session_id", '
        '"cardinality": N} to categorical', id="user-id-not-categorical"),
    pytest.param(
        spec_with(categorical=[*CATS[:2], {"name": "category_id", "cardinality": 0}]),
        "{spec}: categorical.2.cardinality: Input should be greater than 0", id="cardinality-0"),
    pytest.param(
        spec_with(categorical=[*CATS, {"name": "click", "cardinality": 2}]),
        "{spec}: column 'click' has two roles, label and categorical; a label fed to the model as "
        "an input leaks the answer: use another column", id="label-is-also-a-feature"),
    pytest.param(
        spec_with(dense=["price", "position", "category_id"]),
        "{spec}: column 'category_id' has two roles, dense and categorical; give it one (ids: "
        "categorical, numbers: dense)", id="dense-and-categorical"),
    pytest.param(
        spec_with(item_id=None, item_features=["category_id"]),
        "{spec}: history: 'history' holds item ids, so item_id must be set too: name the item id "
        "column", id="history-without-item-id"),
    pytest.param(
        spec_with(categorical=[*CATS, {"name": "history", "cardinality": 100, "multi_hot": 5}]),
        "{spec}: column 'history' is the history and a multi-hot categorical column too; give it "
        "one role, or copy it into a column of its own for the other", id="multi-hot-history"),
    pytest.param(
        spec_with(categorical=[*CATS, {"name": "click", "cardinality": 2, "multi_hot": 2}]),
        "{spec}: column 'click' has two roles, label and multi-hot categorical; a label fed to the "
        "model as an input leaks the answer: use another column", id="multi-hot-label"),
    pytest.param(
        spec_with(categorical=[CATS[0], {**CATS[1], "multi_hot": 4}, CATS[2]]),
        "{spec}: item_id: 'item_id' is multi-hot; item_id is one id per row: name a single-id "
        "column, or remove multi_hot from 'item_id'", id="multi-hot-item-id"),
    pytest.param(
        spec_with(categorical=[*CATS[:2], {**CATS[2], "multi_hot": 2}]),
        "{spec}: item_features: 'category_id' is multi-hot; the item catalogue holds one id per "
        "item feature: drop it from item_features (the query/user tower then reads it), or give "
        "each item one id for it", id="multi-hot-item-feature"),
    pytest.param(
        spec_with(categorical=[*CATS, {"name": "session_id", "cardinality": 100, "multi_hot": 2}]),
        "{spec}: query_id: 'session_id' is multi-hot; a query/session is one integer id per row: "
        "name a single-id column", id="multi-hot-query-id"),
    pytest.param(
        spec_with(categorical=[*CATS[:2], {**CATS[2], "multi_hot": 0}]),
        "{spec}: categorical.2.multi_hot: Input should be greater than or equal to 1; remove "
        "multi_hot (or set it to null) for one id per row", id="multi-hot-0"),
    pytest.param(
        spec_with(categorical=[*CATS[:2], {**CATS[2], "multi_hot": 2000}]),
        "{spec}: categorical.2.multi_hot: Input should be less than or equal to 1024; the model "
        "pools at most a row's last 1024 ids", id="multi-hot-over-1024"),
    pytest.param(
        spec_with(categorical=[*CATS[:2], {**CATS[2], "multi_hot": True}]),
        "{spec}: categorical.2.multi_hot: multi_hot is how many ids of a row the model reads, "
        "e.g. 8, not a flag (got true)", id="multi-hot-true"),
    pytest.param(
        spec_with(bayes_auc=0.8),
        "{spec}: bayes_auc: only the built-in generator knows the Bayes-optimal AUC; remove the "
        "field", id="user-sets-bayes-auc"),
]


@pytest.mark.parametrize(("mutate", "expected"), MALFORMED)
def test_malformed_dataset_is_refused_with_exact_message(tmp_path, mutate, expected):
    spec, tables = copy.deepcopy(SPEC), _splits(_clicklog())
    mutate(spec, tables)
    spec_path, data = _write_dataset(tmp_path, spec, tables, "parquet-dir")
    expected = expected.replace("{spec}", str(spec_path)).replace("{data}", str(data))
    with pytest.raises(DatasetError, match=_exactly(expected)):
        load_dataset(spec_path, data)


def test_single_file_without_timestamp_is_refused(tmp_path):
    spec = {**SPEC, "timestamp": None}
    spec_path, data = _write_dataset(tmp_path, spec, _splits(_clicklog()), "csv-file")
    with pytest.raises(DatasetError, match=_exactly(
            f"{data}: one file is split by time, but spec.json sets no timestamp; set timestamp "
            "to the event-time column, or give a directory with train, valid and test files")):
        load_dataset(spec_path, data)


def test_single_file_errors_name_the_file_and_its_own_row(tmp_path):
    spec_path, data = _write_dataset(tmp_path, SPEC, _splits(_clicklog()), "csv-file")
    lines = data.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[18].split(",")  # file row 17 (the header is line 0)
    cells[header.index('"price"')] = ""
    lines[18] = ",".join(cells)
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=_exactly(
            "clicks.csv: dense column 'price' has 1 null value (first at row 17); fill them (e.g. "
            "with 0 or the column mean) and add a 0/1 column if missing matters")):
        load_dataset(spec_path, data)


def test_csv_history_that_is_not_ids_is_refused(tmp_path):
    tables = _splits(_clicklog())
    text = [" ".join(map(str, h)) for h in tables["train"]["history"].to_pylist()]
    text[4] = "12,7"  # a comma-separated list: one token that is no id
    tables["train"] = _set_column(tables["train"], "history", pa.array(text))
    spec_path, data = _write_dataset(tmp_path, SPEC, tables, "csv-dir")
    with pytest.raises(DatasetError, match=_exactly(
            "train.csv: history column 'history' has 1 value that is not an integer id (first at "
            "row 4: '12,7'); write its ids as integers separated by spaces, e.g. \"12 7 301\"")):
        load_dataset(spec_path, data)


def test_csv_multi_hot_that_is_not_ids_is_refused(tmp_path):
    spec, tables = copy.deepcopy(SPEC), _splits(_clicklog())
    with_tags()(spec, tables)
    text = [" ".join(map(str, ids)) for ids in tables["valid"]["tags"].to_pylist()]
    text[3] = "3;7"
    tables["valid"] = _set_column(tables["valid"], "tags", pa.array(text))
    spec_path, data = _write_dataset(tmp_path, spec, tables, "csv-dir")
    with pytest.raises(DatasetError, match=_exactly(
            "valid.csv: multi-hot column 'tags' has 1 value that is not an integer id (first at "
            "row 3: '3;7'); write its ids as integers separated by spaces, e.g. \"12 7 301\"")):
        load_dataset(spec_path, data)


def test_csv_multi_hot_out_of_range_names_the_csv_row_and_id(tmp_path):
    spec, tables = copy.deepcopy(SPEC), _splits(_clicklog())
    steps(with_tags(), put("train", "tags", {8: [1, 2, 30]}))(spec, tables)
    spec_path, data = _write_dataset(tmp_path, spec, tables, "csv-dir")
    with pytest.raises(DatasetError, match=_exactly(
            "train.csv: multi-hot column 'tags' has ids out of range [0, 10): found min 0, max 30 "
            "(1 id, first at row 8: 30); remap them, or raise cardinality to at least 31 in "
            "spec.json")):
        load_dataset(spec_path, data)


def test_spec_file_problems(tmp_path):
    spec_path = tmp_path / "spec.json"
    with pytest.raises(DatasetError, match=_exactly(
            f"{spec_path}: spec file not found; write a spec.json naming each column's role "
            "(example in docs/byo-data.md)")):
        load_spec(spec_path)
    spec_path.write_text('{"name": "x",}')
    with pytest.raises(DatasetError, match=_exactly(
            f"{spec_path}: invalid JSON at line 1 column 14: Expecting property name enclosed in "
            "double quotes")):
        load_spec(spec_path)
    spec_path.write_text(json.dumps({**SPEC, "segment": ["popularity"]}))
    with pytest.raises(DatasetError, match=re.escape(
            f"{spec_path}: segment: Extra inputs are not permitted (known fields: name, label, ")):
        load_spec(spec_path)


def test_validate_names_a_missing_split():
    tables, spec = generate("tiny", 0)
    del tables["test"]
    with pytest.raises(DatasetError, match=_exactly(
            "test split: split missing (got train, valid); provide train, valid and test")):
        validate(tables, spec)


def test_cli_prints_the_uri_or_a_clean_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tasks.dataimport
    from flows.cli import app
    from tasks.artifacts import MemoryStore

    # no S3 here (the stack-backed twin is in integration): the same upload, into memory
    store = MemoryStore()
    monkeypatch.setattr(tasks.dataimport, "ArtifactStore", lambda settings: store)
    spec_path, data = _write_dataset(tmp_path, SPEC, _splits(_clicklog()), "csv-file")
    state = ["--state-dir", str(tmp_path / "state")]
    ok = CliRunner().invoke(app, ["dataset", "import", str(spec_path), str(data), *state])
    assert ok.exit_code == 0, ok.output
    uri = ok.stdout.strip()
    assert uri.startswith("mem://memory/datasets/shop-clicks/") and store.dataset_ref(uri).rows
    bad = CliRunner().invoke(app, ["dataset", "import", str(spec_path), str(tmp_path / "x.csv"), *state])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert bad.output == f"invalid dataset: {tmp_path / 'x.csv'}: not found; give a directory " \
        "holding train, valid and test files (.parquet or .csv), or one .parquet/.csv file\n"
