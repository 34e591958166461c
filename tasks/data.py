"""Datasets: Parquet I/O on S3 (pyarrow), and a split laid out as model inputs (`Arrays`).

The built-in click log is made by `tasks.generator.generate`, a user's own by
`tasks.dataimport.import_dataset`; both are stored by `write_dataset`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pydantic import ValidationError

from infra.settings import Settings
from tasks.types import DatasetRef, DatasetSpec

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # shares of rows by time: train on the past, test on the future


# --- S3 I/O ---------------------------------------------------------------------------------
def s3_filesystem(settings: Settings) -> pafs.S3FileSystem:
    scheme, _, host = settings.s3_endpoint.partition("://")
    return pafs.S3FileSystem(
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        endpoint_override=host, scheme=scheme, region=settings.s3_region,
        allow_bucket_creation=False,
    )


def _split_path(uri: str, split: str) -> str:
    return uri.removeprefix("s3://").rstrip("/") + f"/{split}.parquet"


def write_dataset(tables: dict[str, pa.Table], spec: DatasetSpec, settings: Settings) -> DatasetRef:
    """Upload splits + spec.json under datasets/NAME/SHA/, SHA over the splits and the spec:
    the same rows under another spec are another dataset, and an existing dataset's files are
    never rewritten (an identical import finds them and writes nothing)."""
    blobs = {}
    for split in SPLITS:
        buf = io.BytesIO()
        pq.write_table(tables[split], buf, compression="zstd")
        blobs[split] = buf.getvalue()
    shas = {s: hashlib.sha256(b).hexdigest() for s, b in blobs.items()}
    sha = hashlib.sha256(("".join(shas[s] for s in SPLITS)
                          + spec.model_dump_json()).encode()).hexdigest()
    uri = f"s3://{settings.s3_bucket}/datasets/{spec.name}/{sha[:16]}/"
    filesystem = s3_filesystem(settings)
    ref = DatasetRef(uri=uri, sha256=sha, spec=spec, splits=shas,
                     rows={s: tables[s].num_rows for s in SPLITS})
    try:
        if read_dataset_ref(uri, settings) == ref:
            return ref  # already there, complete (spec.json is written last)
    except (OSError, ValueError):
        pass
    for split, blob in blobs.items():
        with filesystem.open_output_stream(_split_path(uri, split)) as out:
            out.write(blob)
    with filesystem.open_output_stream(uri.removeprefix("s3://") + "spec.json") as out:
        out.write(ref.model_dump_json(indent=2).encode())
    return ref


def read_dataset_ref(uri: str, settings: Settings) -> DatasetRef:
    """Load the DatasetRef stored at `uri` (its spec.json)."""
    path = uri.removeprefix("s3://").rstrip("/") + "/spec.json"
    try:
        with s3_filesystem(settings).open_input_stream(path) as f:
            blob = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(
            f"dataset.uri: no dataset at {uri} (expected {path}); generate one with "
            "`recsqueeze dataset generate` or set dataset.builtin"
        ) from exc
    try:
        return DatasetRef.model_validate(json.loads(blob))
    except ValueError as exc:  # not JSON, or not a DatasetRef: edited outside an import
        what = (f"{'.'.join(map(str, exc.errors()[0]['loc']))}: {exc.errors()[0]['msg']}"
                if isinstance(exc, ValidationError) else "not JSON")
        raise ValueError(
            f"dataset.uri: s3://{path} is not a dataset record ({what}); import the dataset "
            "again (`recsqueeze dataset import`) and use the uri it prints") from None


def read_split(ref: DatasetRef, split: str, settings: Settings) -> pa.Table:
    """Read one split, verifying its sha256 first."""
    with s3_filesystem(settings).open_input_stream(_split_path(ref.uri, split)) as f:
        blob = f.read()
    got = hashlib.sha256(blob).hexdigest()
    if got != ref.splits[split]:
        raise ValueError(f"dataset {ref.uri}{split}.parquet: sha256 {got} != {ref.splits[split]}"
                         " (corrupted or replaced); import the dataset again (`recsqueeze "
                         "dataset import`)")
    return pq.read_table(io.BytesIO(blob))


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
