"""`recsqueeze dataset import` against the real local stack: a user's CSV ends up in S3."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.artifacts import ArtifactStore
from tasks.data import SPLITS

pytestmark = pytest.mark.integration


def test_import_csv_then_read_it_back(settings, tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    items = rng.integers(0, 30, n)
    click = (rng.random(n) < 0.3).astype(np.int8)
    click[-2:] = (0, 1)  # both classes in the test split (the last 20% by time)
    pcsv.write_csv(pa.table({
        "ts": 1_700_000_000 + 60 * np.arange(n), "session_id": np.arange(n) // 5,
        "user_id": rng.integers(0, 20, n), "item_id": items, "category_id": items % 4,
        "price": rng.lognormal(3, 0.5, n), "click": click,
        "history": [" ".join(map(str, rng.integers(0, 30, i % 4))) for i in range(n)],
        "popularity": np.where(items < 5, "head", "tail"),
        "note": ["free text, not stored"] * n,
    }), tmp_path / "clicks.csv")
    (tmp_path / "spec.json").write_text(json.dumps({
        "name": "byo-clicks", "label": "click", "dense": ["price"],
        "categorical": [{"name": "user_id", "cardinality": 20}, {"name": "item_id", "cardinality": 30},
                        {"name": "category_id", "cardinality": 4}],
        "user_id": "user_id", "item_id": "item_id", "query_id": "session_id", "timestamp": "ts",
        "history": "history", "item_features": ["category_id"], "segments": ["popularity"],
    }))

    args = ["dataset", "import", str(tmp_path / "spec.json"), str(tmp_path / "clicks.csv"),
            "--state-dir", str(settings.state_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    uri = result.stdout.strip()
    assert uri.startswith(f"s3://{settings.s3_bucket}/datasets/byo-clicks/")

    ref = ArtifactStore(settings).dataset_ref(uri)
    assert ref.rows == {"train": 140, "valid": 20, "test": 40}
    assert ref.spec.history == "history" and ref.spec.bayes_auc is None
    tables = {s: ArtifactStore(settings).read_split(ref, s) for s in SPLITS}
    assert "note" not in tables["train"].column_names
    assert tables["train"].schema.field("history").type == pa.list_(pa.int64())
    ts = [tables[s]["ts"].to_numpy() for s in SPLITS]
    assert ts[0].max() < ts[1].min() and ts[1].max() < ts[2].min()
    assert sorted(tables["test"]["click"].to_pylist())[-1] == 1

    again = CliRunner().invoke(app, args)  # content-addressed: the same data, the same URI
    assert again.exit_code == 0 and again.stdout.strip() == uri

    # the same rows under another spec are another dataset: the first one is never rewritten

    store = ArtifactStore(settings)
    key = uri.removeprefix(f"s3://{settings.s3_bucket}/") + "spec.json"
    first = store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec["categorical"][0]["cardinality"] = 25
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    other = CliRunner().invoke(app, args)
    assert other.exit_code == 0 and other.stdout.strip() != uri, other.output
    assert store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read() == first
    assert ArtifactStore(settings).dataset_ref(other.stdout.strip()).spec.categorical[0].cardinality == 25

    # a cardinality no table could hold is refused, naming the limit
    spec["categorical"][0]["cardinality"] = 10**12
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    huge = CliRunner().invoke(app, args)
    assert huge.exit_code == 2 and "less than or equal to 50000000" in huge.output, huge.output
