"""The gate's promise on the real stack: nothing wrong is ever promoted.

A promotion whose alias move fails after the version was sealed is retried into the same
version; a production model that cannot be verified (overwritten, truncated) blocks promotion;
two concurrent CLI runs never both beat the same champion; a baseline at chance stops before
compression; a budget below the test split's resolution is reported with the rows it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from flows.driver import run_compress
from tasks.artifacts import ArtifactStore
from tasks.generator import generate
from tasks.registry import Registry
from tasks.types import (
    Candidate,
    CompressionRequest,
    DatasetRequest,
    QuantizeConfig,
    Resources,
    TrainConfig,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ONE = (Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),)


def _request(name: str, **kw) -> CompressionRequest:
    kw.setdefault("resources", Resources(timing_seconds=5))  # the gate is tested, not latency
    return CompressionRequest(model_name=name, dataset=DatasetRequest(builtin="tiny"),
                              train=TrainConfig(epochs=1, batch_size=512), candidates=ONE, **kw)


def _registry_keys(store: ArtifactStore, name: str = "") -> dict[str, str]:
    pages = store.s3.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=f"registry/{name}")
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _cli(stack, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--state-dir",
                           stack.state_dir], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def promoted(stack, settings):
    """A first promotion whose alias move fails once after the version is sealed: Prefect
    retries `promote`, and the retry finds its own sealed version."""
    failures = []
    real = Registry._move_production

    def flaky(self, model, n, expected):  # the driver runs `promote`: patch it here
        if not failures:
            failures.append(n)
            raise ConnectionError("injected: the store went away after the seal")
        return real(self, model, n, expected)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Registry, "_move_production", flaky)
        report = run_compress(_request("gate-ranker"), settings)
    return report, failures


def test_a_retry_after_the_seal_publishes_one_version(promoted, settings):
    report, failures = promoted
    assert failures == [1]  # the failure happened, after version 1 was sealed
    assert report.status == "promoted" and report.promoted.version == 1
    reg = Registry(ArtifactStore(settings))
    assert reg.versions("gate-ranker") == [1] and reg.alias("gate-ranker") == 1
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[report.run_id])))
    [promote] = [r for r in runs if r.name.startswith("promote")]
    assert promote.run_count == 2 and promote.state_type.value == "COMPLETED"


def test_leaderboard_json_carries_resolution_and_trivial_baselines(promoted):
    report, _ = promoted
    [res] = report.resolution
    assert res.metric == "main" and res.measured == "auc" and res.rows == report.baseline.rows
    assert 0 < res.resolution < 0.05
    # latency: timed in one quiet task, each ratio with its 95% interval
    for row in report.leaderboard:
        assert row.latency_ratio_low <= row.latency_ratio <= row.latency_ratio_high, row
    names = {t.name for t in report.trivial}
    assert names == {"global_ctr", "item_ctr"} and all(t.margin_low > 0 for t in report.trivial)
    assert next(t for t in report.trivial if t.name == "global_ctr").value == 0.5


@pytest.mark.parametrize("damage, what", [
    (lambda blob: b"\x80\x04 not a model at all" + blob[:100], "overwritten"),
    (lambda blob: blob[: len(blob) // 2], "truncated"),
])
def test_a_production_model_that_cannot_be_verified_blocks_promotion(
        promoted, settings, stack, damage, what):
    store = ArtifactStore(settings)
    key = "registry/gate-ranker/versions/1/model.safetensors"
    original = store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    store.s3.put_object(Bucket=store.bucket, Key=key, Body=damage(original))
    try:
        before = _registry_keys(store, "gate-ranker/")
        # a candidate that is smaller than v1 and would be promoted over a sound champion
        smaller = Candidate(id="int4-emb", plan=(QuantizeConfig(linear="none",
                                                                embeddings="rowwise_int4"),))
        report = run_compress(_request("gate-ranker").model_copy(
            update={"candidates": (*ONE, smaller)}), settings)
        expected = ("production v1 could not be verified (sha256 mismatch in "
                    "registry/gate-ranker/versions/1/model.safetensors): fix or roll back the "
                    "registry")
        assert report.status == "not_promoted" and report.reason == expected, what
        assert report.chosen == "int4-emb"
        assert _registry_keys(store, "gate-ranker/") == before  # nothing written, nothing moved
        shown = _cli(stack, "registry", "show", "gate-ranker", timeout=120)
        assert shown.returncode == 1
        assert "gate-ranker v1 could not be verified (sha256 mismatch" in shown.stderr
    finally:
        store.s3.put_object(Bucket=store.bucket, Key=key, Body=original)
    shown = _cli(stack, "registry", "show", "gate-ranker", "--json", timeout=120)
    assert shown.returncode == 0 and json.loads(shown.stdout)["verified"] is True


def test_two_concurrent_cli_runs_never_both_beat_the_same_champion(stack, settings, tmp_path):
    store = ArtifactStore(settings)
    path = tmp_path / "request.json"
    path.write_text(_request("race-ranker").model_dump_json())
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: _cli(stack, "run", "--request", str(path), "--json"),
                             range(2)))
    reports = []
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
        reports.append(json.loads(out.stdout))
    won = [r for r in reports if r["status"] == "promoted"]
    lost = [r for r in reports if r["status"] != "promoted"]
    assert len(won) == 1 and len(lost) == 1, [r["reason"] for r in reports]
    version = won[0]["promoted"]["version"]
    # the loser measured no champion and found the alias moved at promotion, or started late
    # enough to measure the winner's version as its champion (then judged against it)
    assert lost[0]["reason"].startswith((
        f"production moved from no version to v{version} during this run",
        f"does not beat production v{version}")), lost[0]["reason"]
    reg = Registry(store)
    assert reg.alias("race-ranker") == version
    # the loser either stopped before writing, or sealed a version it did not make production
    assert reg.versions("race-ranker") in ([version], sorted({version, version + 1}))


@pytest.fixture(scope="module")
def at_chance(settings):
    """The tiny click log with every split's clicks shuffled: labels independent of every
    feature (same click rate)."""
    tables, spec = generate("tiny", 0)
    rng = np.random.default_rng(7)
    shuffled = {split: table.set_column(table.schema.get_field_index("click"), "click",
                                        pa.array(rng.permutation(table["click"].to_numpy())))
                for split, table in tables.items()}
    ref = ArtifactStore(settings).put_dataset(shuffled, spec.model_copy(
        update={"name": "clicklog-at-chance", "bayes_auc": None}))
    return ref.uri


def test_a_baseline_at_chance_stops_before_compression(at_chance, stack, settings, tmp_path):
    store = ArtifactStore(settings)
    before = _registry_keys(store)
    raw = _request("chance-ranker").model_dump(mode="json")
    raw["dataset"] = {"uri": at_chance}
    raw["budget"] = {"metrics": {"main": {"max_drop": 0.001, "relative": True},
                                 "logloss": {"max_drop": 1e-6}}}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(raw))
    out = _cli(stack, "run", "--request", str(path), "--json")
    assert out.returncode == 1, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["status"] == "stopped" and report["leaderboard"] == []
    assert report["reason"].startswith("the baseline is not worth compressing: its auc ")
    assert "does not beat the trivial" in report["reason"]
    assert "require_useful_baseline=false" in report["reason"]
    assert _registry_keys(store) == before
    # no candidate stage ever ran
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[report["run_id"]])))
    assert not [r for r in runs if r.name.startswith(("run-stage", "calibrate"))]
    # the budget below resolution is named, with the test rows it would need
    logloss = next(r for r in report["resolution"] if r["metric"] == "logloss")
    assert not logloss["resolvable"] and logloss["rows_needed"] > logloss["rows"]
    [warning] = [w for w in report["warnings"] if w.startswith("budget logloss:")]
    assert f"about {logloss['rows_needed']:,} test rows would be needed" in warning
