"""Datasets: the built-in e-commerce click log, Parquet I/O on S3 (pyarrow), tensors.

The generator draws clicks from a hidden ground-truth model, so the Bayes-optimal AUC (the AUC of
the true click probability on the test split) is known and stored in the spec: the ceiling any
model can reach on this data.

Ground truth, per impression (user u, query q, item i shown at position k):
    logit = -2.2 + 1.2*[cat(i) == intent(q)] + 0.9*tanh(<a_u, b_i>) + 0.6*affinity[seg(u), cat(i)]
            - 0.35*log(1+k) - 0.5*price_z(i)*price_sensitivity[seg(u)] + 0.4*quality(i)
            + 0.2*device_hour[device, hour]
Users and items follow Zipf popularity; half of the shown items match the query's category.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from infra.settings import Settings
from tasks.metrics import auc
from tasks.types import CategoricalColumn, DatasetRef, DatasetSpec

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class GeneratorSize:
    users: int
    items: int
    queries: int
    rows: int


SIZES = {
    "tiny": GeneratorSize(users=2_000, items=1_000, queries=300, rows=40_000),
    "small": GeneratorSize(users=100_000, items=50_000, queries=5_000, rows=1_000_000),
}
_CATEGORIES, _BRANDS, _SEGMENTS, _DEVICES, _HOURS, _POSITIONS = 40, 400, 6, 3, 24, 20
_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # by time: train on the past, test on the future


def _zipf(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** a
    perm = rng.permutation(n)  # popularity unrelated to id order
    return perm[rng.choice(n, size=size, p=weights / weights.sum())]


def generate(size: str, seed: int = 0) -> tuple[dict[str, pa.Table], DatasetSpec]:
    """Generate the built-in click log: three time-ordered splits and their spec."""
    if size not in SIZES:
        raise ValueError(f"dataset.builtin must be one of {sorted(SIZES)} (got {size!r})")
    g = SIZES[size]
    rng = np.random.default_rng(seed)
    k = 8
    # hidden world
    user_seg = rng.integers(0, _SEGMENTS, g.users)
    user_dev = rng.integers(0, _DEVICES, g.users)
    user_vec = rng.normal(0, 1, (g.users, k)) / np.sqrt(k) * 1.5
    item_cat = rng.integers(0, _CATEGORIES, g.items)
    item_brand = rng.integers(0, _BRANDS, g.items)
    cat_vec = rng.normal(0, 1, (_CATEGORIES, k))
    item_vec = (cat_vec[item_cat] + 0.7 * rng.normal(0, 1, (g.items, k))) / np.sqrt(k) * 1.5
    item_price_z = rng.normal(0, 1, g.items) + 0.3 * rng.normal(0, 1, _CATEGORIES)[item_cat]
    item_quality = rng.normal(0, 1, g.items)
    affinity = rng.normal(0, 1, (_SEGMENTS, _CATEGORIES))
    price_sens = rng.uniform(-0.2, 1.0, _SEGMENTS)
    device_hour = rng.normal(0, 1, (_DEVICES, _HOURS))
    query_intent = rng.integers(0, _CATEGORIES, g.queries)
    items_by_cat = [np.flatnonzero(item_cat == c) for c in range(_CATEGORIES)]

    # impressions
    n = g.rows
    users = _zipf(rng, g.users, n, 1.0)
    queries = _zipf(rng, g.queries, n, 1.1)
    items = _zipf(rng, g.items, n, 1.05)
    match = rng.random(n) < 0.5
    intents = query_intent[queries]
    for c in range(_CATEGORIES):  # search results: half the impressions match the intent
        rows = np.flatnonzero(match & (intents == c))
        if len(rows) and len(items_by_cat[c]):
            items[rows] = rng.choice(items_by_cat[c], size=len(rows))
    position = rng.integers(1, _POSITIONS + 1, n)
    hour = rng.integers(0, _HOURS, n)
    seg, dev = user_seg[users], user_dev[users]
    logit = (
        -2.2
        + 1.2 * (item_cat[items] == intents)
        + 0.9 * np.tanh(np.einsum("nk,nk->n", user_vec[users], item_vec[items]))
        + 0.6 * affinity[seg, item_cat[items]]
        - 0.35 * np.log1p(position)
        - 0.5 * item_price_z[items] * price_sens[seg]
        + 0.4 * item_quality[items]
        + 0.2 * device_hour[dev, hour]
    )
    p_true = 1.0 / (1.0 + np.exp(-logit))
    click = (rng.random(n) < p_true).astype(np.int8)
    timestamp = np.sort(rng.uniform(0, 30 * 86400, n)).astype(np.int64)  # 30 days, in order

    price = np.exp(3.0 + 0.8 * item_price_z[items])
    item_pop = np.bincount(items, minlength=g.items)[items]
    columns = {
        "user_id": users, "item_id": items, "category_id": item_cat[items],
        "brand_id": item_brand[items], "query_id": queries, "user_segment": seg,
        "device": dev, "hour": hour,
        "log_price": np.log(price).astype(np.float32),
        "position": position.astype(np.float32),
        "log_item_popularity": np.log1p(item_pop).astype(np.float32),
        "timestamp": timestamp, "click": click,
    }
    cards = {"user_id": g.users, "item_id": g.items, "category_id": _CATEGORIES,
             "brand_id": _BRANDS, "query_id": g.queries, "user_segment": _SEGMENTS,
             "device": _DEVICES, "hour": _HOURS}
    bounds = np.cumsum([0, *(int(f * n) for f in _SPLIT_FRACTIONS[:-1]), n - sum(
        int(f * n) for f in _SPLIT_FRACTIONS[:-1])])
    tables = {
        split: pa.table({name: col[bounds[i]:bounds[i + 1]] for name, col in columns.items()})
        for i, split in enumerate(SPLITS)
    }
    test = slice(bounds[2], bounds[3])
    spec = DatasetSpec(
        name=f"clicklog-{size}-s{seed}", label="click",
        categorical=tuple(CategoricalColumn(name=c, cardinality=v) for c, v in cards.items()),
        dense=("log_price", "position", "log_item_popularity"),
        user_id="user_id", item_id="item_id", query_id="query_id", timestamp="timestamp",
        bayes_auc=auc(click[test], p_true[test]),
    )
    return tables, spec


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
    """Upload splits + spec.json under datasets/NAME/SHA/; idempotent (content-addressed)."""
    blobs = {}
    for split in SPLITS:
        buf = io.BytesIO()
        pq.write_table(tables[split], buf, compression="zstd")
        blobs[split] = buf.getvalue()
    shas = {s: hashlib.sha256(b).hexdigest() for s, b in blobs.items()}
    sha = hashlib.sha256("".join(shas[s] for s in SPLITS).encode()).hexdigest()
    uri = f"s3://{settings.s3_bucket}/datasets/{spec.name}/{sha[:16]}/"
    filesystem = s3_filesystem(settings)
    for split, blob in blobs.items():
        with filesystem.open_output_stream(_split_path(uri, split)) as out:
            out.write(blob)
    ref = DatasetRef(uri=uri, sha256=sha, spec=spec, splits=shas,
                     rows={s: tables[s].num_rows for s in SPLITS})
    with filesystem.open_output_stream(uri.removeprefix("s3://") + "spec.json") as out:
        out.write(ref.model_dump_json(indent=2).encode())
    return ref


def read_dataset_ref(uri: str, settings: Settings) -> DatasetRef:
    """Load the DatasetRef stored at `uri` (its spec.json)."""
    path = uri.removeprefix("s3://").rstrip("/") + "/spec.json"
    try:
        with s3_filesystem(settings).open_input_stream(path) as f:
            raw = json.loads(f.read())
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(
            f"dataset.uri: no dataset at {uri} (expected {path}); generate one with "
            "`recsqueeze dataset generate` or set dataset.builtin"
        ) from exc
    return DatasetRef.model_validate(raw)


def read_split(ref: DatasetRef, split: str, settings: Settings) -> pa.Table:
    """Read one split, verifying its sha256 first."""
    with s3_filesystem(settings).open_input_stream(_split_path(ref.uri, split)) as f:
        blob = f.read()
    got = hashlib.sha256(blob).hexdigest()
    if got != ref.splits[split]:
        raise ValueError(f"dataset {ref.uri}{split}.parquet: sha256 {got} != {ref.splits[split]}"
                         " (corrupted or replaced)")
    return pq.read_table(io.BytesIO(blob))


@dataclass(frozen=True)
class Arrays:
    """A split as model inputs: dense float32 [N, D], categorical int64 [N, T], labels [N]."""

    dense: np.ndarray
    sparse: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def to_arrays(table: pa.Table, spec: DatasetSpec) -> Arrays:
    dense = np.stack([table[c].to_numpy().astype(np.float32) for c in spec.dense], axis=1) \
        if spec.dense else np.zeros((table.num_rows, 0), np.float32)
    sparse = np.stack([table[c.name].to_numpy().astype(np.int64) for c in spec.categorical], 1)
    label = table[spec.label].to_numpy().astype(np.float32)
    return Arrays(dense=dense, sparse=sparse, label=label)
