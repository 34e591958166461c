"""Checks of a user's dataset (spec roles, then each split's columns), before any upload.

Each check stops at the first problem with a `DatasetError` that names the file (or split), the
column, what was found and the fix. Rows in messages are counted from 0 within the file (a
CSV's header is not a row). `tasks.dataimport` reads the files and runs these checks.

Example::

    validate(tables, spec, sources={"train": "train.csv", ...})  # raises DatasetError
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from tasks.data import SPLITS
from tasks.types import DatasetSpec

MAX_SEGMENT_VALUES = 50  # a segment is a handful of slices (head/tail), not an id


class DatasetError(ValueError):
    """A dataset or its spec is unusable; the message says where, what was found, and the fix."""


# --- spec ----------------------------------------------------------------------------------
def check_spec(spec: DatasetSpec, where: str = "spec") -> None:
    """Column roles that contradict each other, whatever the data holds."""
    cats = [c.name for c in spec.categorical]
    bags = {c.name for c in spec.categorical if c.multi_hot is not None}
    for role, names in (("categorical", cats), ("dense", spec.dense),
                        ("item_features", spec.item_features), ("segments", spec.segments)):
        twice = first_repeat(names)
        if twice is not None:
            raise DatasetError(f"{where}: {role}: {twice!r} is listed twice; list each column once")
    others = {**{c: "segments" for c in spec.segments}, **{c: "dense" for c in spec.dense},
              **{c: "multi-hot categorical" if c in bags else "categorical" for c in cats}}
    for role in ("history", "timestamp", "query_id"):
        if getattr(spec, role) is not None:
            others[getattr(spec, role)] = role
    if spec.label in others:
        raise DatasetError(f"{where}: column {spec.label!r} has two roles, label and "
                           f"{others[spec.label]}; a label fed to the model as an input leaks the "
                           "answer: use another column")
    for col in spec.dense:
        if col in cats:
            raise DatasetError(f"{where}: column {col!r} has two roles, dense and categorical; "
                               "give it one (ids: categorical, numbers: dense)")
    for role in ("user_id", "item_id"):
        col = getattr(spec, role)
        if col is not None and col not in cats:
            raise DatasetError(f"{where}: {role}: {col!r} is not a categorical column; add "
                               f'{{"name": "{col}", "cardinality": N}} to categorical')
        if col in bags:
            raise DatasetError(f"{where}: {role}: {col!r} is multi-hot; {role} is one id per row: "
                               f"name a single-id column, or remove multi_hot from {col!r}")
    for col in spec.item_features:
        if col == spec.item_id:
            raise DatasetError(f"{where}: item_features: {col!r} is item_id; list only the "
                               "columns that describe the item besides its id")
        if col not in cats:
            raise DatasetError(f"{where}: item_features: {col!r} is not a categorical column "
                               f"(categorical: {', '.join(cats)}); item features must be "
                               "categorical ids: add it to categorical or drop it from item_features")
        if col in bags:
            raise DatasetError(f"{where}: item_features: {col!r} is multi-hot; the item catalogue "
                               "holds one id per item feature: drop it from item_features (the "
                               "query/user tower then reads it), or give each item one id for it")
    if spec.query_id in bags:
        raise DatasetError(f"{where}: query_id: {spec.query_id!r} is multi-hot; a query/session is "
                           "one integer id per row: name a single-id column")
    if spec.history is not None:
        if spec.history in bags:
            raise DatasetError(f"{where}: column {spec.history!r} is the history and a multi-hot "
                               "categorical column too; give it one role, or copy it into a "
                               "column of its own for the other")
        if spec.history in cats or spec.history in spec.dense or spec.history in spec.segments:
            raise DatasetError(f"{where}: column {spec.history!r} is the history and a feature "
                               "too; a list column has the history role only")
        if spec.item_id is None:
            raise DatasetError(f"{where}: history: {spec.history!r} holds item ids, so item_id "
                               "must be set too: name the item id column")


def spec_columns(spec: DatasetSpec) -> list[tuple[str, str]]:
    """Every column the spec names, once, with its role: the columns a split must have."""
    roles = [(spec.label, "label"), *((c.name, "categorical") for c in spec.categorical),
             *((c, "dense") for c in spec.dense)]
    for role in ("query_id", "timestamp", "history"):
        if getattr(spec, role) is not None:
            roles.append((getattr(spec, role), role))
    roles += [(c, "segment") for c in spec.segments]
    first: dict[str, str] = {}
    for col, role in roles:  # query_id may also be categorical: keep its first role
        first.setdefault(col, role)
    return list(first.items())


# --- splits --------------------------------------------------------------------------------
def validate(tables: Mapping[str, pa.Table], spec: DatasetSpec,
             sources: Mapping[str, str] | None = None) -> None:
    """Raise DatasetError on the first problem: spec roles, then each split, then the test labels.

    Args:
        tables: the train, valid and test tables.
        spec: the column roles.
        sources: what to call each split in messages (its file); default "train split" etc.
    """
    check_spec(spec)
    names = {s: (sources or {}).get(s, f"{s} split") for s in SPLITS}
    for split in SPLITS:
        if split not in tables:
            raise DatasetError(f"{names[split]}: split missing (got {listing(list(tables))}); "
                               "provide train, valid and test")
        if tables[split].num_rows == 0:
            raise DatasetError(f"{names[split]}: empty split (0 rows); train, valid and test all "
                               "need rows")
    for split in SPLITS:
        check_table(tables[split], spec, names[split])
    label = tables["test"][spec.label]
    classes = pc.unique(label).to_pylist()
    if len(classes) < 2:
        raise DatasetError(f"{names['test']}: label column {spec.label!r} has only {int(classes[0])}s "
                           f"({len(label)} rows); AUC needs both classes in the test split: use a "
                           "longer test period or more data")


def check_table(table: pa.Table, spec: DatasetSpec, where: str) -> None:
    """Checks of one table, in spec order: columns present, label, categorical (one id or, if
    multi-hot, a list of ids per row), dense, query_id, timestamp, history, segments."""
    missing = [(c, r) for c, r in spec_columns(spec) if c not in table.column_names]
    if missing:
        listed = ", ".join(f"{c!r} ({r})" for c, r in missing)
        raise DatasetError(f"{where}: missing column{'s'[:len(missing) > 1]} {listed}; columns "
                           f"present: {listing(table.column_names)}; rename the column in the "
                           "data or in spec.json")
    for name, role in spec_columns(spec):
        if pa.types.is_null(table[name].type):  # a CSV column with no value in any row
            raise DatasetError(f"{where}: column {name!r} ({role}) has no values (all "
                               f"{table.num_rows} rows empty); fill it, or drop it from spec.json")
    _check_label(table[spec.label], spec.label, where)
    for cat in spec.categorical:
        if cat.multi_hot is None:
            _check_ids(table[cat.name], f"categorical column {cat.name!r}", cat.cardinality, where)
        else:
            _check_multi_hot(table[cat.name], cat.name, cat.cardinality, where)
    for name in spec.dense:
        _check_dense(table[name], name, where)
    if spec.query_id is not None:
        col = table[spec.query_id]
        what = f"query_id column {spec.query_id!r}"
        if not pa.types.is_integer(col.type):
            raise DatasetError(f"{where}: {what} has dtype {col.type}; it must be an integer id "
                               "per query/session: map each distinct value to an int first")
        _check_nulls(col, what, where, "every row belongs to a query/session: give rows without "
                     "one an id of their own")
    if spec.timestamp is not None:
        col = table[spec.timestamp]
        what = f"timestamp column {spec.timestamp!r}"
        if not (pa.types.is_integer(col.type) or pa.types.is_timestamp(col.type)):
            raise DatasetError(f"{where}: {what} has dtype {col.type}; it must be an integer "
                               "(e.g. unix seconds) or a timestamp: parse it first")
        _check_nulls(col, what, where, "every row needs an event time: drop rows without one")
    if spec.history is not None:
        items = next(c.cardinality for c in spec.categorical if c.name == spec.item_id)
        _check_history(table[spec.history], spec.history, spec.item_id or "", items, where)
    for name in spec.segments:
        _check_segment(table[name], name, where)


def _check_label(col: pa.ChunkedArray, name: str, where: str) -> None:
    what = f"label column {name!r}"
    if not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise DatasetError(f"{where}: {what} has dtype {col.type}; it must be integer or bool "
                           "0/1: cast it to int8 once its values are 0/1")
    _check_nulls(col, what, where, "every row needs a 0/1 label: drop those rows or fill them")
    if pa.types.is_boolean(col.type):
        return
    bad = pc.and_(pc.not_equal(col, 0), pc.not_equal(col, 1))
    count, first = marked_rows(bad)
    if count:
        values = ", ".join(str(v) for v in sorted(pc.unique(col.filter(bad)).to_pylist())[:5])
        raise DatasetError(f"{where}: {what} has values other than 0/1: {values} "
                           f"({plural(count, 'row')}, first at row {first}); map it to 0/1 "
                           "(1 = positive, e.g. clicked)")


def _check_ids(col: pa.ChunkedArray, what: str, cardinality: int, where: str) -> None:
    if _is_list(col.type):
        raise DatasetError(f"{where}: {what} holds lists (dtype {col.type}) but has no multi_hot; "
                           'set "multi_hot": N in its categorical entry of spec.json for the model '
                           "to pool the last N ids of each row, or write one id per row")
    if not pa.types.is_integer(col.type):
        raise DatasetError(f"{where}: {what} has wrong dtype {col.type}; ids must be integers in "
                           f"[0, {cardinality}): map raw values to ids 0..{cardinality - 1} first "
                           "(see docs/byo-data.md)")
    _check_nulls(col, what, where, "every row needs an id: give missing values an id of their "
                 "own (e.g. 0 = unknown) and count it in cardinality")
    _check_range(col, what, cardinality, where, marked_rows(pc.or_(pc.less(col, 0),
                                                              pc.greater_equal(col, cardinality))))


def _check_range(values: pa.Array | pa.ChunkedArray, what: str, cardinality: int, where: str,
                 bad: tuple[int, int], unit: str = "row", fix: str = "", negative_fix: str = "",
                 first_id: int | None = None) -> None:
    count, first = bad
    if not count:
        return
    low, high = (v.as_py() for v in pc.min_max(values).values())
    if not fix:
        fix = ((negative_fix or f"negative ids are not allowed: map them to ids in "
                f"0..{cardinality - 1}") if low < 0
               else f"remap them, or raise cardinality to at least {high + 1} in spec.json")
    at = f"row {first}" if first_id is None else f"row {first}: {first_id}"
    raise DatasetError(f"{where}: {what} has ids out of range [0, {cardinality}): found min {low}, "
                       f"max {high} ({plural(count, unit)}, first at {at}); {fix}")


def _check_dense(col: pa.ChunkedArray, name: str, where: str) -> None:
    what = f"dense column {name!r}"
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DatasetError(f"{where}: {what} has dtype {t}; dense features must be numbers "
                           "(int, float or bool): parse it, or make it a categorical column")
    _check_nulls(col, what, where, "fill them (e.g. with 0 or the column mean) and add a 0/1 "
                 "column if missing matters")
    if not pa.types.is_floating(t):
        return
    count, first = marked_rows(pc.is_nan(col))
    if count:
        raise DatasetError(f"{where}: {what} has {plural(count, 'NaN value')} (first at row {first}); "
                           "replace NaN with a number (e.g. 0 or the column mean) and add a 0/1 "
                           "column if missing matters")
    count, first = marked_rows(pc.is_inf(col))
    if count:
        raise DatasetError(f"{where}: {what} has {plural(count, 'infinite value')} (first at row "
                           f"{first}: {col[first].as_py()}); clip it, or take a log, so every value "
                           "is finite")


def _check_history(col: pa.ChunkedArray, name: str, item_id: str, items: int, where: str) -> None:
    what = f"history column {name!r}"
    t = col.type
    if not (_is_list(t) and pa.types.is_integer(t.value_type)):
        raise DatasetError(f"{where}: {what} has dtype {t}; it must be a list of integer item ids "
                           '(list<int64>; in a CSV: ids separated by spaces, e.g. "12 7 301")')
    _check_nulls(col, what, where, "write an empty list for a row without history")
    ids, rows = _list_ids(col, what, "null item id", where)
    count, first = marked_rows(pc.or_(pc.less(ids, 0), pc.greater_equal(ids, items)))
    _check_range(ids, f"{what} (item_id column {item_id!r})", items, where,
                 (count, rows[first].as_py() if count else -1), unit="id",
                 fix="history ids must be in item_id's id space: map them with the same mapping "
                     "as item_id")


def _check_multi_hot(col: pa.ChunkedArray, name: str, cardinality: int, where: str) -> None:
    """A list of ids per row (any number, none included). A null list is refused, not read as
    empty: it is often a failed join upstream, and an empty list says "no ids" plainly."""
    what = f"multi-hot column {name!r}"
    t = col.type
    if not (_is_list(t) and pa.types.is_integer(t.value_type)):
        raise DatasetError(f"{where}: {what} has dtype {t}; it must be a list of integer ids per "
                           'row (list<int64>; in a CSV: ids separated by spaces, e.g. "12 7 301"): '
                           "write lists, or remove multi_hot from its spec.json entry for one id "
                           "per row")
    _check_nulls(col, what, where, "write an empty list for a row without ids (in a CSV: an "
                 "empty cell)")
    ids, rows = _list_ids(col, what, "null id", where)
    count, first = marked_rows(pc.or_(pc.less(ids, 0), pc.greater_equal(ids, cardinality)))
    _check_range(ids, what, cardinality, where, (count, rows[first].as_py() if count else -1),
                 unit="id", first_id=ids[first].as_py() if count else None,
                 negative_fix="negative ids are not allowed, padding included: write only the "
                 "row's own ids (a row may hold fewer than multi_hot, or none), each in "
                 f"0..{cardinality - 1}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _list_ids(col: pa.ChunkedArray, what: str, null_id: str, where: str) -> tuple[pa.Array, pa.Array]:
    """A list column's ids, flat, and the row of each; refused if an id is null."""
    lists = col.combine_chunks()
    ids, rows = pc.list_flatten(lists), pc.list_parent_indices(lists)
    count, first = marked_rows(pc.is_null(ids))
    if count:
        raise DatasetError(f"{where}: {what} has {plural(count, null_id)} (first at row "
                           f"{rows[first]}); drop them from the lists")
    return ids, rows


def _check_segment(col: pa.ChunkedArray, name: str, where: str) -> None:
    what = f"segment column {name!r}"
    if pa.types.is_nested(col.type):
        raise DatasetError(f"{where}: {what} has dtype {col.type}; a segment holds one scalar "
                           "per row (e.g. 'head'/'tail')")
    _check_nulls(col, what, where, "fill them with a value of their own, e.g. 'unknown'")
    distinct = pc.count_distinct(col).as_py()
    if distinct > MAX_SEGMENT_VALUES:
        raise DatasetError(f"{where}: {what} has {distinct} distinct values (at most "
                           f"{MAX_SEGMENT_VALUES}); a segment groups rows into a few slices (e.g. "
                           "head/tail): bucket it, or make it a categorical feature instead")


def _check_nulls(col: pa.ChunkedArray, what: str, where: str, fix: str) -> None:
    if col.null_count:
        _, first = marked_rows(pc.is_null(col))
        raise DatasetError(f"{where}: {what} has {plural(col.null_count, 'null value')} (first at row "
                           f"{first}); {fix}")


# --- message helpers -----------------------------------------------------------------------
def marked_rows(mask: pa.Array | pa.ChunkedArray) -> tuple[int, int]:
    """How many entries the boolean mask marks, and the first of them (-1: none)."""
    mask = pc.fill_null(mask, False)
    count = pc.sum(mask).as_py() or 0
    return count, (pc.index(mask, True).as_py() if count else -1)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def first_repeat(names: Sequence[str]) -> str | None:
    """The first name that stands earlier in `names` too, or None: no name repeats."""
    return next((n for i, n in enumerate(names) if n in names[:i]), None)


def listing(names: list[str], limit: int = 20) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
