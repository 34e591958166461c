"""Bring your own data: check a spec.json and its Parquet/CSV splits, then upload them.

`recsqueeze dataset import spec.json PATH` runs `import_dataset`. PATH is a directory holding
train, valid and test (``.parquet`` or ``.csv`` each), or one file that is split by time on
``spec.timestamp``: first 70% train, next 10% valid, last 20% test, as the generator does.

Checks (`tasks.datacheck`) run before anything is uploaded, in a fixed order, and stop at the
first problem with a `DatasetError` that names the file (or split), the column, what was found
and the fix: a bad dataset fails here in seconds, not an hour later inside a training task on a
Ray worker. Rows in messages are counted from 0 within the file (a CSV's header is not a row).
This module reads the files (a CSV's history and multi-hot text, "12 7 301", becomes
list<int64>), splits one file by time, and keeps only the spec's columns in canonical dtypes.

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
from tasks.artifacts import ArtifactStore
from tasks.data import SPLIT_FRACTIONS, SPLITS
from tasks.datacheck import (
    DatasetError,
    check_spec,
    check_table,
    first_repeat,
    listing,
    marked_rows,
    plural,
    spec_columns,
    validate,
)
from tasks.types import MAX_MULTI_HOT, CategoricalColumn, DatasetRef, DatasetSpec

SUFFIXES = (".parquet", ".csv")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # spec.name is an S3 path segment
_INT_TOKEN = r"^[+-]?\d+$"


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
    msg = error["msg"].removeprefix("Value error, ")  # our validators' own sentences
    if error["type"] == "extra_forbidden":  # a typo: say which names exist
        model = DatasetSpec if len(error["loc"]) == 1 else CategoricalColumn
        msg += f" (known fields: {', '.join(model.model_fields)})"
    if error["type"] == "less_than_equal" and error["loc"][-1:] == ("cardinality",):
        msg += "; hash or bucket the ids into fewer first"
    if error["loc"][-1:] == ("multi_hot",) and error["type"] == "greater_than_equal":
        msg += "; remove multi_hot (or set it to null) for one id per row"
    if error["loc"][-1:] == ("multi_hot",) and error["type"] == "less_than_equal":
        msg += f"; the model pools at most a row's last {MAX_MULTI_HOT} ids"
    return f"{loc}: {msg}" if loc else msg


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
            present = listing(sorted(p.name for p in directory.iterdir())) or "nothing"
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
    lists = _list_columns(spec)
    try:
        if kind == "parquet":
            _check_unique(pq.read_schema(path).names, path.name)  # else read_table fails on them
            return pq.read_table(path)
        # list columns stay text here ("12 7 301"), whatever pyarrow would infer from their
        # first rows (one id each: int64), and an empty cell stays "" (an empty list)
        types = {name: pa.string() for name in lists}
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{path.name}: cannot read it as {kind} ({first}); check that it is "
                           f"a complete {kind} file, or export it again") from None
    _check_unique(table.column_names, path.name)
    for name, what in lists.items():
        if name in table.column_names:
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, parse_id_lists(table[name], what, path.name))
    return table


def _list_columns(spec: DatasetSpec) -> dict[str, str]:
    """The columns a CSV holds as space-separated ids, with what messages call each."""
    lists = {c.name: f"multi-hot column {c.name!r}" for c in spec.categorical if c.multi_hot}
    if spec.history:
        lists[spec.history] = f"history column {spec.history!r}"
    return lists


def _check_unique(names: list[str], where: str) -> None:
    twice = first_repeat(names)
    if twice is not None:
        raise DatasetError(f"{where}: column {twice!r} appears {names.count(twice)} times; "
                           "rename or drop the copies so every column name is unique")


def parse_id_lists(column: pa.ChunkedArray, what: str, where: str) -> pa.ListArray:
    """CSV text of a list column (history, multi-hot) -> list<int64>: "12 7 301" -> [12, 7, 301],
    "" -> []. `what` names the column in messages (e.g. "history column 'history'")."""
    text = column.combine_chunks()
    parts = pc.utf8_split_whitespace(text)
    tokens, rows = pc.list_flatten(parts), pc.list_parent_indices(parts)
    keep = pc.not_equal(tokens, "")  # leading/trailing blanks split off as ""
    tokens, rows = tokens.filter(keep), rows.filter(keep)
    count, first = marked_rows(pc.invert(pc.match_substring_regex(tokens, _INT_TOKEN)))
    if count:
        raise DatasetError(f"{where}: {what} has {plural(count, 'value')} that "
                           f"{'is' if count == 1 else 'are'} not an integer id (first at row "
                           f"{rows[first]}: {tokens[first].as_py()!r}); write its ids as integers "
                           'separated by spaces, e.g. "12 7 301"')
    ids = pc.cast(tokens, pa.int64())
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows.to_numpy(), minlength=len(text)))])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), ids)


# --- upload --------------------------------------------------------------------------------
def select_columns(tables: Mapping[str, pa.Table], spec: DatasetSpec) -> dict[str, pa.Table]:
    """Only the spec's columns (stray ones, e.g. free text, are not stored), in canonical dtypes:
    label int8, ids and query_id int64, dense float32, history and multi-hot list<int64>, as the
    generator."""
    types: dict[str, pa.DataType] = {
        spec.label: pa.int8(), **{d: pa.float32() for d in spec.dense},
        **{c.name: pa.list_(pa.int64()) if c.multi_hot else pa.int64() for c in spec.categorical}}
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
    return ArtifactStore(settings).put_dataset(tables, spec)
