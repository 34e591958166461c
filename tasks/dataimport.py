"""Bring your own data: check a spec.json and its Parquet/CSV splits, then upload them.

`recsqueeze dataset import spec.json PATH` runs `import_dataset`. PATH is a directory holding
train, valid and test (``.parquet`` or ``.csv`` each), or one file that is split by time on
``spec.timestamp``: first 70% train, next 10% valid, last 20% test, as the generator does.

Checks run before anything is uploaded, in a fixed order, and stop at the first problem with a
`DatasetError` that names the file (or split), the column, what was found and the fix: a bad
dataset fails here in seconds, not an hour later inside a training task on a Ray worker.
Rows in messages are counted from 0 within the file (a CSV's header is not a row).

Example::

    tables, spec = load_dataset(Path("spec.json"), Path("clicks.csv"))  # checked, columns kept
    ref = import_dataset(Path("spec.json"), Path("clicks.csv"), settings)  # ... and uploaded
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from infra.settings import Settings
from tasks.data import SPLITS, write_dataset
from tasks.types import CategoricalColumn, DatasetRef, DatasetSpec

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # one file is split by time: train on the past, test on the future
SUFFIXES = (".parquet", ".csv")
MAX_SEGMENT_VALUES = 50  # a segment is a handful of slices (head/tail), not an id
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # spec.name is an S3 path segment
_INT_TOKEN = r"^[+-]?\d+$"


class DatasetError(ValueError):
    """A dataset or its spec is unusable; the message says where, what was found, and the fix."""


# --- spec ----------------------------------------------------------------------------------
def load_spec(path: Path) -> DatasetSpec:
    """Read and check spec.json; every problem becomes a DatasetError naming the spec field."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"{path}: spec file not found; write a spec.json naming each column's "
                           "role (example in docs/byo-data.md)") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the spec ({exc.strerror})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                           f"{exc.msg}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: a spec is a JSON object naming each column's role (got "
                           f"{type(raw).__name__}); see the example in docs/byo-data.md")
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        raise DatasetError(f"{path}: " + "; ".join(_field_error(e) for e in exc.errors())) from None
    if spec.bayes_auc is not None:
        raise DatasetError(f"{path}: bayes_auc: only the built-in generator knows the "
                           "Bayes-optimal AUC; remove the field")
    if not _NAME.fullmatch(spec.name):
        raise DatasetError(f"{path}: name: {spec.name!r} is an S3 path segment; use letters, "
                           "digits, '.', '_' and '-' only (e.g. 'shop-clicks-2024')")
    check_spec(spec, str(path))
    return spec


def _field_error(error: ErrorDetails) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    msg = error["msg"]
    if error["type"] == "extra_forbidden":  # a typo: say which names exist
        model = DatasetSpec if len(error["loc"]) == 1 else CategoricalColumn
        msg += f" (known fields: {', '.join(model.model_fields)})"
    if error["type"] == "less_than_equal" and error["loc"][-1:] == ("cardinality",):
        msg += "; hash or bucket the ids into fewer first"
    return f"{loc}: {msg}" if loc else msg


def check_spec(spec: DatasetSpec, where: str = "spec") -> None:
    """Column roles that contradict each other, whatever the data holds."""
    cats = [c.name for c in spec.categorical]
    for role, names in (("categorical", cats), ("dense", spec.dense),
                        ("item_features", spec.item_features), ("segments", spec.segments)):
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise DatasetError(f"{where}: {role}: {twice!r} is listed twice; list each column once")
    others = {**{c: "segments" for c in spec.segments}, **{c: "dense" for c in spec.dense},
              **{c: "categorical" for c in cats}}
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
    for col in spec.item_features:
        if col == spec.item_id:
            raise DatasetError(f"{where}: item_features: {col!r} is item_id; list only the "
                               "columns that describe the item besides its id")
        if col not in cats:
            raise DatasetError(f"{where}: item_features: {col!r} is not a categorical column "
                               f"(categorical: {', '.join(cats)}); item features must be "
                               "categorical ids: add it to categorical or drop it from item_features")
    if spec.history is not None:
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


# --- reading -------------------------------------------------------------------------------
def load_splits(path: Path, spec: DatasetSpec) -> dict[str, pa.Table]:
    """Read train/valid/test from a directory, or split one file by time on spec.timestamp.

    One file is checked whole before it is split (`check_table`), so its errors name the
    file's own rows and the sort never meets a bad timestamp.
    """
    return _read_splits(path, spec)[0]


def _read_splits(path: Path, spec: DatasetSpec) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """The splits, and what to call each in messages (its file)."""
    if not path.exists():
        raise DatasetError(f"{path}: not found; give a directory holding train, valid and test "
                           "files (.parquet or .csv), or one .parquet/.csv file")
    if path.is_dir():
        files = _split_files(path)
        return {s: _read_file(f, spec) for s, f in files.items()}, {s: f.name for s, f in files.items()}
    _check_suffix(path)
    if spec.timestamp is None:
        raise DatasetError(f"{path}: one file is split by time, but spec.json sets no timestamp; "
                           "set timestamp to the event-time column, or give a directory with "
                           "train, valid and test files")
    table = _read_file(path, spec)
    if table.num_rows == 0:
        raise DatasetError(f"{path}: empty file (0 rows); give a file with the rows to import")
    check_table(table, spec, path.name)
    return split_by_time(table, spec), {s: f"{path.name} ({s} split)" for s in SPLITS}


def split_by_time(table: pa.Table, spec: DatasetSpec) -> dict[str, pa.Table]:
    """First 70% of rows by spec.timestamp -> train, next 10% -> valid, last 20% -> test.

    With a query_id, a query/session stays whole, in the split where it began (each cut moves
    forward to the next query): a ranked list cut in two would be scored as two short lists.
    """
    time = pc.cast(table[spec.timestamp], pa.int64()).to_numpy()
    if spec.query_id is None:
        order = np.argsort(time, kind="stable")
        starts = np.arange(len(order))
    else:
        _, query = np.unique(table[spec.query_id].to_numpy(), return_inverse=True)
        began = np.full(query.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(began, query, time)
        order = np.lexsort((time, query, began[query]))  # by query start, then within a query
        starts = np.concatenate([[0], np.flatnonzero(np.diff(query[order])) + 1])
    n = len(order)

    def cut_at(row: int) -> int:  # the first start of a query at or after `row`
        i = int(np.searchsorted(starts, row))
        return int(starts[i]) if i < len(starts) else n

    n_train, n_valid = int(SPLIT_FRACTIONS[0] * n), int(SPLIT_FRACTIONS[1] * n)
    cut = [0, cut_at(n_train), cut_at(n_train + n_valid), n]
    return {s: table.take(order[cut[i]:cut[i + 1]]) for i, s in enumerate(SPLITS)}


def _split_files(directory: Path) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        found = [directory / f"{split}{ext}" for ext in SUFFIXES if (directory / f"{split}{ext}").is_file()]
        if not found:
            present = _listing(sorted(p.name for p in directory.iterdir())) or "nothing"
            raise DatasetError(f"{directory}: no {split} file (expected {split}.parquet or "
                               f"{split}.csv; found: {present}); provide train, valid and test "
                               "files, or one file to split by time")
        if len(found) > 1:
            raise DatasetError(f"{directory}: both {split}.parquet and {split}.csv; keep one")
        files[split] = found[0]
    return files


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .parquet or .csv")


def _read_file(path: Path, spec: DatasetSpec) -> pa.Table:
    _check_suffix(path)
    kind = path.suffix.removeprefix(".")
    try:
        if kind == "parquet":
            _check_unique(pq.read_schema(path).names, path.name)  # else read_table fails on them
            return pq.read_table(path)
        # history stays text here ("12 7 301"), whatever pyarrow would infer from its first rows
        types = {spec.history: pa.string()} if spec.history else {}
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{path.name}: cannot read it as {kind} ({first}); check that it is "
                           f"a complete {kind} file, or export it again") from None
    _check_unique(table.column_names, path.name)
    if spec.history and spec.history in table.column_names:
        index = table.schema.get_field_index(spec.history)
        table = table.set_column(index, spec.history, parse_history(table[spec.history], spec.history,
                                                                    path.name))
    return table


def _check_unique(names: list[str], where: str) -> None:
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise DatasetError(f"{where}: column {twice!r} appears {names.count(twice)} times; "
                           "rename or drop the copies so every column name is unique")


def parse_history(column: pa.ChunkedArray, name: str, where: str) -> pa.ListArray:
    """CSV history text -> list<int64>: "12 7 301" -> [12, 7, 301], "" -> []."""
    text = column.combine_chunks()
    parts = pc.utf8_split_whitespace(text)
    tokens, rows = pc.list_flatten(parts), pc.list_parent_indices(parts)
    keep = pc.not_equal(tokens, "")  # leading/trailing blanks split off as ""
    tokens, rows = tokens.filter(keep), rows.filter(keep)
    count, first = _rows(pc.invert(pc.match_substring_regex(tokens, _INT_TOKEN)))
    if count:
        raise DatasetError(f"{where}: history column {name!r} has {_n(count, 'value')} that "
                           f"{'is' if count == 1 else 'are'} not an integer id (first at row "
                           f"{rows[first]}: {tokens[first].as_py()!r}); write item ids as integers "
                           'separated by spaces, e.g. "12 7 301"')
    ids = pc.cast(tokens, pa.int64())
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows.to_numpy(), minlength=len(text)))])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), ids)


# --- checks --------------------------------------------------------------------------------
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
            raise DatasetError(f"{names[split]}: split missing (got {_listing(list(tables))}); "
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
    """Checks of one table, in spec order: columns present, label, categorical, dense, query_id,
    timestamp, history, segments."""
    missing = [(c, r) for c, r in spec_columns(spec) if c not in table.column_names]
    if missing:
        listed = ", ".join(f"{c!r} ({r})" for c, r in missing)
        raise DatasetError(f"{where}: missing column{'s'[:len(missing) > 1]} {listed}; columns "
                           f"present: {_listing(table.column_names)}; rename the column in the "
                           "data or in spec.json")
    for name, role in spec_columns(spec):
        if pa.types.is_null(table[name].type):  # a CSV column with no value in any row
            raise DatasetError(f"{where}: column {name!r} ({role}) has no values (all "
                               f"{table.num_rows} rows empty); fill it, or drop it from spec.json")
    _check_label(table[spec.label], spec.label, where)
    for cat in spec.categorical:
        _check_ids(table[cat.name], f"categorical column {cat.name!r}", cat.cardinality, where)
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
    count, first = _rows(bad)
    if count:
        values = ", ".join(str(v) for v in sorted(pc.unique(col.filter(bad)).to_pylist())[:5])
        raise DatasetError(f"{where}: {what} has values other than 0/1: {values} "
                           f"({_n(count, 'row')}, first at row {first}); map it to 0/1 "
                           "(1 = positive, e.g. clicked)")


def _check_ids(col: pa.ChunkedArray, what: str, cardinality: int, where: str) -> None:
    if not pa.types.is_integer(col.type):
        raise DatasetError(f"{where}: {what} has wrong dtype {col.type}; ids must be integers in "
                           f"[0, {cardinality}): map raw values to ids 0..{cardinality - 1} first "
                           "(see docs/byo-data.md)")
    _check_nulls(col, what, where, "every row needs an id: give missing values an id of their "
                 "own (e.g. 0 = unknown) and count it in cardinality")
    _check_range(col, what, cardinality, where, _rows(pc.or_(pc.less(col, 0),
                                                              pc.greater_equal(col, cardinality))))


def _check_range(values: pa.Array | pa.ChunkedArray, what: str, cardinality: int, where: str,
                 bad: tuple[int, int], unit: str = "row", fix: str = "") -> None:
    count, first = bad
    if not count:
        return
    low, high = (v.as_py() for v in pc.min_max(values).values())
    if not fix:
        fix = (f"negative ids are not allowed: map them to ids in 0..{cardinality - 1}" if low < 0
               else f"remap them, or raise cardinality to at least {high + 1} in spec.json")
    raise DatasetError(f"{where}: {what} has ids out of range [0, {cardinality}): found min {low}, "
                       f"max {high} ({_n(count, unit)}, first at row {first}); {fix}")


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
    count, first = _rows(pc.is_nan(col))
    if count:
        raise DatasetError(f"{where}: {what} has {_n(count, 'NaN value')} (first at row {first}); "
                           "replace NaN with a number (e.g. 0 or the column mean) and add a 0/1 "
                           "column if missing matters")
    count, first = _rows(pc.is_inf(col))
    if count:
        raise DatasetError(f"{where}: {what} has {_n(count, 'infinite value')} (first at row "
                           f"{first}: {col[first].as_py()}); clip it, or take a log, so every value "
                           "is finite")


def _check_history(col: pa.ChunkedArray, name: str, item_id: str, items: int, where: str) -> None:
    what = f"history column {name!r}"
    t = col.type
    if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
        raise DatasetError(f"{where}: {what} has dtype {t}; it must be a list of integer item ids "
                           '(list<int64>; in a CSV: ids separated by spaces, e.g. "12 7 301")')
    _check_nulls(col, what, where, "write an empty list for a row without history")
    lists = col.combine_chunks()
    ids, rows = pc.list_flatten(lists), pc.list_parent_indices(lists)
    count, first = _rows(pc.is_null(ids))
    if count:
        raise DatasetError(f"{where}: {what} has {_n(count, 'null item id')} (first at row "
                           f"{rows[first]}); drop them from the lists")
    count, first = _rows(pc.or_(pc.less(ids, 0), pc.greater_equal(ids, items)))
    _check_range(ids, f"{what} (item_id column {item_id!r})", items, where,
                 (count, rows[first].as_py() if count else -1), unit="id",
                 fix="history ids must be in item_id's id space: map them with the same mapping "
                     "as item_id")


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
        _, first = _rows(pc.is_null(col))
        raise DatasetError(f"{where}: {what} has {_n(col.null_count, 'null value')} (first at row "
                           f"{first}); {fix}")


def _rows(mask: pa.Array | pa.ChunkedArray) -> tuple[int, int]:
    """How many entries the boolean mask marks, and the first of them (-1: none)."""
    mask = pc.fill_null(mask, False)
    count = pc.sum(mask).as_py() or 0
    return count, (pc.index(mask, True).as_py() if count else -1)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- upload --------------------------------------------------------------------------------
def select_columns(tables: Mapping[str, pa.Table], spec: DatasetSpec) -> dict[str, pa.Table]:
    """Only the spec's columns (stray ones, e.g. free text, are not stored), in canonical dtypes:
    label int8, ids and query_id int64, dense float32, history list<int64>, as the generator."""
    types: dict[str, pa.DataType] = {spec.label: pa.int8(), **{d: pa.float32() for d in spec.dense},
                                     **{c.name: pa.int64() for c in spec.categorical}}
    if spec.query_id is not None:
        types[spec.query_id] = pa.int64()
    if spec.history is not None:
        types[spec.history] = pa.list_(pa.int64())
    out = {}
    for split, table in tables.items():
        columns = {}
        for name, _ in spec_columns(spec):
            col, want = table[name], types.get(name)
            # dense ints beyond 2**24 lose precision in float32, like every dense input does
            columns[name] = col if want is None or col.type == want else \
                pc.cast(col, want, safe=name not in spec.dense)
        out[split] = pa.table(columns)
    return out


def load_dataset(spec_path: Path, path: Path) -> tuple[dict[str, pa.Table], DatasetSpec]:
    """load_spec, load_splits, validate, select_columns: the splits ready to upload."""
    spec = load_spec(spec_path)
    tables, sources = _read_splits(path, spec)
    validate(tables, spec, sources)
    return select_columns(tables, spec), spec


def import_dataset(spec_path: Path, path: Path, settings: Settings) -> DatasetRef:
    """Check a user's dataset and upload it (content-addressed: importing twice is a no-op).

    Returns the DatasetRef whose uri a CompressionRequest's ``dataset.uri`` takes.
    """
    tables, spec = load_dataset(spec_path, path)
    return write_dataset(tables, spec, settings)
