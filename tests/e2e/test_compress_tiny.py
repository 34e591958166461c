"""The tiny compress flow end to end on the real stack: S3, Prefect server, 2-node Ray."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from flows.driver import run_compress
from tasks.artifacts import ArtifactStore
from tasks.data import to_arrays
from tasks.defaults import default_candidates
from tasks.evaluate import predict
from tasks.metrics import auc
from tasks.registry import Registry
from tasks.types import (
    Candidate,
    CompressionRequest,
    DatasetRequest,
    DistillConfig,
    DlrmSpec,
    PruneConfig,
    QuantizeConfig,
    Resources,
    TrainConfig,
)
from tests.serving_check import score_without_recsqueeze, write_inputs

pytestmark = [pytest.mark.slow, pytest.mark.integration]
# these tests check what the flow does with latencies, not how narrow their intervals get
QUICK_TIMING = Resources(timing_seconds=5)


STUDENT = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(64,))


def _request(name: str, *extra: Candidate, **kw) -> CompressionRequest:
    # the default candidates (one or two per family), a plan sharing its first stage with the
    # default pruned-int8 chain, a student chain, and 2:4 sparsity (skipped on CPU workers, run
    # on GPU ones)
    pruned = PruneConfig(method="structured", sparsity=0.5)
    student = DistillConfig(student=STUDENT, batch_size=512)
    candidates = (*default_candidates(), Candidate(id="pruned", plan=(pruned,)),
                  Candidate(id="student-int8", plan=(student, QuantizeConfig())),
                  Candidate(id="sparse-2of4", plan=(PruneConfig(method="semi_structured"),)),
                  *extra)
    kw.setdefault("resources", QUICK_TIMING)
    return CompressionRequest(model_name=name, dataset=DatasetRequest(builtin="tiny"),
                              train=TrainConfig(epochs=2, batch_size=512),
                              candidates=candidates, **kw)


class ConnectionSampler(threading.Thread):
    """Records every TCP peer and every listening socket (process name, pid, ip, port) of
    the stack's processes (and their children) while running."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.peers, self.stop_flag = pids, set(), threading.Event()
        self.listeners: set[tuple[str, int, str, int]] = set()

    def _procs(self):
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                yield root
                yield from root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue

    def sample(self) -> None:
        for proc in self._procs():
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.raddr:
                        self.peers.add((proc.name(), conn.raddr.ip, conn.raddr.port))
                    if conn.status == psutil.CONN_LISTEN:
                        self.listeners.add((proc.name(), proc.pid, conn.laddr.ip,
                                            conn.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.sample()
            time.sleep(0.3)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.fixture(scope="module")
def first_run(stack, settings):
    sampler = ConnectionSampler([*stack.pids(), os.getpid()])
    sampler.start()
    try:
        report = run_compress(_request("e2e-ranker"), settings)
    finally:
        sampler.stop_flag.set()
        sampler.join()
    sampler.sample()
    LISTENERS.update(sampler.listeners)
    return report, sampler.peers


LISTENERS: set[tuple[str, int, str, int]] = set()  # what the first run's processes listened on


def test_tiny_flow_promotes_a_model(first_run):
    report, _ = first_run
    assert report.status == "promoted", report.reason
    assert report.promoted.uri.startswith("s3://") and report.promoted.version == 1
    assert not report.failures, report.failures
    if torch.cuda.is_available():
        assert len(report.leaderboard) == 10
    else:  # no GPU: 2:4 is reported as skipped, with the reason, and the rest goes on
        assert len(report.leaderboard) == 9 and "needs a CUDA worker" in report.skipped[
            "sparse-2of4"]
    int8 = {r.candidate: r for r in report.leaderboard}
    assert int8["int8-all"].size_ratio > 3.0  # measured artifact bytes, not a formula
    # post-training quantization barely moves AUC; retrained candidates are judged by the gate
    assert all(r.delta > -0.01 for r in report.leaderboard if r.plan.startswith("quantize"))
    assert {r.candidate for r in report.leaderboard} >= {"pruned-int8", "student-half", "tt-int8"}


def test_promoted_model_reproduces_its_reported_auc(first_run, settings):
    report, _ = first_run
    reg = Registry(ArtifactStore(settings))
    model, _ = reg.load("e2e-ranker", report.promoted.version)
    test = to_arrays(ArtifactStore(settings).read_split(report.dataset, "test"), report.dataset.spec)
    row = next(r for r in report.leaderboard if r.candidate == report.promoted.candidate_id)
    assert auc(test.label, predict(model, test)) == pytest.approx(row.quality, abs=1e-9)


def test_candidates_ran_on_two_ray_nodes_and_lineage_records_it(first_run, settings, stack):
    report, _ = first_run
    nodes = {r.node_ip for r in report.leaderboard}
    assert len(nodes) >= 2, nodes
    assert nodes <= {n.ip for n in stack.ray.nodes}
    store = ArtifactStore(settings)
    lineage = store.get_json(f"registry/e2e-ranker/versions/{report.promoted.version}/lineage.json")
    assert lineage["ray_node"] in nodes and lineage["dataset"]["sha256"] == report.dataset.sha256
    chain = lineage["chain"]
    plan = next(r.plan for r in report.leaderboard if r.candidate == report.promoted.candidate_id)
    assert [c["stage"] for c in chain] == ["baseline", *plan.split(" -> ")]
    assert all(c["cpu_s"] > 0 and c["device"] in ("cpu", "cuda") and c["ray_node"] in nodes
               for c in chain)
    for key in (f"registry/e2e-ranker/versions/{report.promoted.version}/pareto.png",
                f"runs/{report.run_id}/pareto.png"):
        png = store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
        assert png.startswith(b"\x89PNG"), key
    promoted = Registry(store).version_info("e2e-ranker", report.promoted.version)
    assert chain[-1]["model"]["sha256"] == promoted["model"]["sha256"]
    auc_ = lineage["metrics"]["quality"]["auc"]
    assert auc_["ci_low"] <= auc_["value"] <= auc_["ci_high"]
    # NDCG per search session and AUC per segment value, each paired with the baseline
    assert {d["metric"] for d in lineage["deltas"]} >= {
        "auc", "logloss", "ndcg@10", "auc[item_popularity=tail]", "auc[user_type=new]"}
    assert store.get_json(f"runs/{report.run_id}/report.json")["status"] == "promoted"


def test_task_runs_are_visible_in_the_prefect_server(first_run, settings):
    report, _ = first_run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[report.run_id])))
            artifacts = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[report.run_id])))}
    assert {"leaderboard", "compression-report", "pareto"} <= artifacts
    names = [r.name.rsplit("-", 1)[0] for r in runs]
    # 4 quantize plans + the shared prune (once) + its chain's quantize + the half student +
    # TT and its quantize + the small student and its quantize + the 2:4 prune
    assert names.count("run-stage") == 12
    assert names.count("calibrate") == 1  # once per run, whatever number of plans use it
    assert "train-baseline" in names and "promote" in names
    not_done = {r.name.rsplit("-", 1)[0] for r in runs if r.state_type.value != "COMPLETED"}
    assert not_done <= ({"run-stage", "evaluate-candidate"} if report.skipped else set())


def test_all_stack_traffic_stays_on_loopback(first_run):
    _, peers = first_run
    assert peers, "sampler saw no connections at all"
    outside = sorted(p for p in peers if not _loopback(p[1]))
    assert not outside, f"connections leaving 127.0.0.0/8: {outside}"


def test_every_listener_is_on_loopback_or_on_the_documented_allow_list(first_run, stack):
    from cluster.local import WILDCARD_LISTENERS, wildcard_listener

    assert LISTENERS, "sampler saw no listening socket"
    wildcard, leaks = [], []
    for name, pid, ip, port in sorted(LISTENERS):
        if _loopback(ip):
            continue
        kind = "driver" if pid == os.getpid() else wildcard_listener(stack.ray, name, port)
        (wildcard if kind in WILDCARD_LISTENERS else leaks).append((name, ip, port, kind))
    print(f"\nLISTENERS {len(LISTENERS)} sockets, {len(wildcard)} on the Ray allow-list:")
    for row in wildcard:
        print("LISTENERS", *row)
    assert not leaks, f"listening beyond loopback, not on the allow-list: {leaks}"
    # S3 and Prefect on loopback alone
    assert all(_loopback(ip) for name, _, ip, _ in LISTENERS if name in ("weed", "prefect"))


def _teacher_key(model_sha: str, report) -> str:
    digest = hashlib.sha256(f"{model_sha}|{report.dataset.splits['train']}".encode()).hexdigest()
    return f"teacher-outputs/{digest}.json"


def test_second_run_is_deterministic_does_not_overwrite_and_says_why(first_run, settings):
    report, _ = first_run
    reg = Registry(ArtifactStore(settings))
    prod_sha = reg.version_info("e2e-ranker", 1)["model"]["sha256"]
    from_prod = Candidate(id="student-of-prod", plan=(DistillConfig(
        student=STUDENT, batch_size=512, teacher="e2e-ranker@production"),))
    # reuse_results=False: every task recomputes (and refreshes the cache) -- determinism,
    # not the cache, must make the numbers equal
    again = run_compress(_request("e2e-ranker", from_prod).model_copy(
        update={"reuse_results": False}), settings)
    assert again.status == "not_promoted"
    assert "does not beat production v1" in again.reason
    assert reg.versions("e2e-ranker") == [1] and reg.alias("e2e-ranker") == 1
    # same request, same seed: every candidate is bit-for-bit the same model, same metrics
    first = {r.candidate: r for r in report.leaderboard}
    for row in again.leaderboard:
        if row.candidate in first:
            assert (row.size_bytes, row.quality, row.logloss_delta, row.delta) == (
                first[row.candidate].size_bytes, first[row.candidate].quality,
                first[row.candidate].logloss_delta, first[row.candidate].delta), row.candidate
    assert "student-of-prod" in {r.candidate for r in again.leaderboard}
    # the calibration tables and the teachers' outputs come from the S3 caches: one entry per
    # (model, data) -- the baseline's, plus production v1's for the registry teacher
    keys = reg.s3.list_objects_v2(Bucket=reg.store.bucket, Prefix="calibration/")["Contents"]
    assert len(keys) == 1
    teachers = {o["Key"] for o in reg.s3.list_objects_v2(
        Bucket=reg.store.bucket, Prefix="teacher-outputs/")["Contents"]}
    assert _teacher_key(prod_sha, report) in teachers and len(teachers) == 2, teachers


def test_identical_rerun_is_served_from_the_s3_result_cache(first_run, settings):
    report, _ = first_run
    again = run_compress(_request("e2e-ranker"), settings)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.run_id])))
    states = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    for name in ("prepare-dataset", "train-baseline", "evaluate-baseline", "calibrate"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    # every stage and evaluation but the 2:4 one's (skipped on CPU: a skip is not a result, so
    # never cached, and its evaluation never becomes ready)
    assert states["run-stage"].count("Cached") == 11, states["run-stage"]
    assert states["evaluate-candidate"].count("Cached") == 9, states["evaluate-candidate"]
    first = {r.candidate: (r.size_bytes, r.quality) for r in report.leaderboard}
    assert {r.candidate: (r.size_bytes, r.quality) for r in again.leaderboard} == first
    keys = Registry(ArtifactStore(settings)).s3.list_objects_v2(
        Bucket=settings.s3_bucket, Prefix="prefect-results/")
    assert keys.get("KeyCount", 0) > 0  # the results live in S3, not on a worker's disk


def test_missing_dataset_fails_clearly_and_leaves_registry_untouched(first_run, settings):
    reg = Registry(ArtifactStore(settings))
    before = reg.versions("e2e-ranker")
    bad = _request("e2e-ranker").model_copy(
        update={"dataset": DatasetRequest(builtin=None, uri="s3://artifacts/datasets/nope/")})
    with pytest.raises(Exception, match="dataset.uri: no dataset at"):
        run_compress(bad, settings)
    assert reg.versions("e2e-ranker") == before and reg.alias("e2e-ranker") == 1


def test_a_stage_larger_than_any_node_is_refused_before_work(first_run, settings):
    """cpus_per_stage: 100 on 1-CPU nodes used to queue for ever (the run stayed RUNNING)."""
    store = ArtifactStore(settings)
    before = _keys(store, "registry/"), _keys(store, "datasets/"), _keys(store, "objects/")
    big = _request("e2e-ranker", resources=Resources(cpus_per_stage=100))
    with pytest.raises(Exception, match=r"resources.cpus_per_stage \(100\) is more than any "
                                        r"Ray node has \(the largest has 1 CPUs\)"):
        run_compress(big, settings)
    assert (_keys(store, "registry/"), _keys(store, "datasets/"), _keys(store, "objects/")) == \
        before


def _keys(store: ArtifactStore, prefix: str) -> dict[str, str]:
    pages = store.s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket,
                                                               Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.parametrize("raw, needle", [
    ('{"budget": {"metrics": {"auc": {"max_drop": -0.1}}}}', "max_drop must be >= 0 (got -0.1)"),
    ('{"model": {"family": "resnet"}}', "model.family"),
    ('{"budget": {"metrics": {"main": {"max_drop": NaN}}}}',
     "budget.metrics.main.max_drop must be a finite number (got nan); NaN and Infinity are not "
     "allowed: give a number"),
    ('{"budget": {"metrics": {"main": {"max_drop": Infinity}}}}',
     "budget.metrics.main.max_drop must be a finite number (got inf)"),
    ('{"train": {"lr": Infinity}}', "train.lr must be a finite number (got inf)"),
    # refused once the run can look (the data, the cluster): still one line, exit 2
    ('{"dataset": {"builtin": null, "uri": "s3://artifacts/datasets/nope/"}}',
     "run refused: dataset.uri: no dataset at s3://artifacts/datasets/nope/"),
    ('{"dataset": {"builtin": "tiny"}, "resources": {"cpus_per_stage": 100}}',
     "run refused: resources.cpus_per_stage (100) is more than any Ray node has"),
    ('{"dataset": {"builtin": "tiny"}, "resources": {"serving_device": "cuda"}}',
     "run refused: resources.serving_device is 'cuda' but no Ray node has a GPU"),
])
def test_cli_refuses_malformed_request_before_touching_anything(raw, needle, stack, tmp_path,
                                                                settings):
    path = tmp_path / "request.json"
    path.write_text(raw)  # as a user writes it: Python's json reads NaN and Infinity
    reg = Registry(ArtifactStore(settings))
    before = {m: reg.versions(m) for m in reg.models()}
    pages = reg.s3.get_paginator("list_objects_v2")

    def registry_keys() -> set[str]:
        return {o["Key"] for page in pages.paginate(Bucket=reg.store.bucket, Prefix="registry/")
                for o in page.get("Contents", [])}

    keys = registry_keys()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--request", str(path), "--json",
         "--state-dir", stack.state_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert needle in " ".join(out.stderr.split()), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert {m: reg.versions(m) for m in reg.models()} == before
    assert registry_keys() == keys


def test_promotion_emits_a_prefect_event(first_run, settings):
    report, _ = first_run
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    payloads = []
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            for _ in range(60):  # events reach the server asynchronously
                # a new filter each time: its default time window ends when it is made; the
                # server caps a page at 50 (the client's default of 100 is refused)
                wanted = EventFilter(event=EventNameFilter(name=["recsqueeze.model.promoted"]))
                payloads = [e.payload for e in client.read_events(filter=wanted, limit=50).events]
                if any(p.get("run_id") == report.run_id for p in payloads):
                    break
                time.sleep(0.5)
    event = next(p for p in payloads if p.get("run_id") == report.run_id)
    assert event["model"] == "e2e-ranker" and event["version"] == report.promoted.version
    assert event["uri"] == report.promoted.uri


def test_registry_cli_refuses_bad_moves_clearly(first_run, stack):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", "registry", *args,
                               "--state-dir", stack.state_dir],
                              capture_output=True, text=True, timeout=120)

    out = cli("promote", "e2e-ranker", "99")
    assert out.returncode == 1 and "version 99 does not exist" in out.stderr
    out = cli("rollback", "e2e-ranker")
    assert out.returncode == 1 and "no previous version to roll back to" in out.stderr
    out = cli("promote", "e2e-ranker", "1")
    assert out.returncode == 0 and "production=1" in out.stdout
    # registry show: bad input is refused in one line, no traceback
    for args, code, needle in (
            (("show", "e2e-ranker", "--version", "0"), 2, "--version must be 1 or more (got 0)"),
            (("show", "e2e-ranker", "--version", "7"), 1, "e2e-ranker has no version 7"),
            (("show", "../etc"), 2, "model name '../etc' is not a registry name")):
        out = cli(*args)
        assert out.returncode == code and needle in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    shown = cli("show", "e2e-ranker", "--version", "1", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["verified"] is True


def test_the_promoted_version_carries_an_export_that_plain_torch_loads(first_run, stack,
                                                                         settings, tmp_path):
    """registry show names what the version is; registry export writes a torch.export
    program that a Python without recsqueeze loads, scoring the test rows as recsqueeze does;
    a tampered program in the bucket is refused."""
    report, _ = first_run

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", "registry", *args,
                               "--state-dir", stack.state_dir],
                              capture_output=True, text=True, timeout=300)

    store = ArtifactStore(settings)
    version = report.promoted.version
    info = Registry(store).version_info("e2e-ranker", version)
    assert {"export/model.pt2", "export/serving.json"} <= set(info["files"])
    shown = cli("show", "e2e-ranker", "--version", str(version), "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    row = next(r for r in report.leaderboard if r.candidate == report.promoted.candidate_id)
    assert summary["ratios"]["size"] == pytest.approx(row.size_ratio)
    assert summary["metrics"]["quality"]["auc"]["ci_low"] <= summary["metrics"]["quality"][
        "auc"]["value"] <= summary["metrics"]["quality"]["auc"]["ci_high"]
    assert summary["budget"]["metrics"]["main"]["max_drop"] == 0.001
    assert summary["ratios"]["latency_p99"] and summary["ratios"]["latency_p99"][0][
        "side_by_side"]
    # timed on this CPU-only cluster's one thread, and every row and the summary say so
    assert {r.latency_device for r in report.leaderboard} == {
        summary["ratios"]["latency_p99"][0]["device"]}
    assert summary["ratios"]["latency_p99"][0]["device"].startswith("cpu: 1 thread of ")
    assert summary["lineage"]["dataset_sha256"] == report.dataset.sha256
    assert summary["uris"]["export/model.pt2"].startswith("s3://")
    assert summary["export_error"] is None
    human = cli("show", "e2e-ranker", "--version", str(version))
    assert human.returncode == 0 and "budget passed: main: loss <= 0.001 (relative)" in \
        human.stdout and "export/model.pt2: s3://" in human.stdout, human.stdout

    out_dir = tmp_path / "serving"
    exported = cli("export", "e2e-ranker", str(out_dir), "--version", str(version))
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in out_dir.iterdir()} == {"model.pt2", "serving.json"}
    test = to_arrays(store.read_split(report.dataset, "test"), report.dataset.spec)
    write_inputs(out_dir, test.dense, test.sparse)
    got = score_without_recsqueeze([out_dir])[out_dir]
    model, _ = Registry(store).load("e2e-ranker", version)
    with torch.no_grad():
        want = model(torch.from_numpy(test.dense), torch.from_numpy(test.sparse)).numpy()
    tol = json.loads((out_dir / "serving.json").read_text())["checked"]["max_abs_diff_vs_eager"]
    assert got.shape == want.shape and abs(got - want).max() <= max(1e-5, 10 * tol)

    key = f"registry/e2e-ranker/versions/{version}/export/model.pt2"
    original = store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    try:
        store.s3.put_object(Bucket=store.bucket, Key=key, Body=original[:-10] + b"0123456789")
        refused = cli("export", "e2e-ranker", str(tmp_path / "again"), "--version", str(version))
        assert refused.returncode == 1 and "sha256 does not match" in refused.stderr
        assert not (tmp_path / "again").exists() and "Traceback" not in refused.stderr
    finally:
        store.s3.put_object(Bucket=store.bucket, Key=key, Body=original)


@pytest.fixture(scope="module")
def searched(stack, settings):
    """One run with both searches (their subflows run one after the other): NAS over 2
    generations of 2, and a 4-trial recipe search whose trials share one student.
    -> (report, {subflow name: its task runs}, artifacts by key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.types import Budget, MetricBudget, NASRequest, NASSpace, RecipeSearch, SearchSpace

    request = CompressionRequest(
        resources=QUICK_TIMING, model_name="search-ranker",
        dataset=DatasetRequest(builtin="tiny"), train=TrainConfig(epochs=1, batch_size=512),
        candidates=(Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),),
        budget=Budget(metrics={"main": MetricBudget(max_drop=0.5, relative=True)}),
        nas=NASRequest(space=NASSpace(embedding_dims=(8, 16), top_depths=(1,)), trials=4,
                       parallelism=2, steps=20, population=2, tournament=2),
        search=RecipeSearch(trials=4, parallelism=2, latency_seconds=0.5, prune_at=1000,
                            warm_start=False, space=SearchSpace(
                                student_dims=(8,), student_widths=(0.5,), per_table=False,
                                student_temperatures=(1.0,), qat_epochs=(0,),
                                table_precision=("rowwise_int8", "rowwise_int4", "rowwise_int2"),
                                linear_precision=("none", "int8_weight_only"))))
    report = run_compress(request, settings)
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[report.run_id])))
            assert sorted(f.state_type.value for f in subflows) == ["COMPLETED", "COMPLETED"]
            names = {f.id: client.read_flow(f.flow_id).name for f in subflows}
            runs = {names[f.id]: client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[f.id])))
                for f in subflows}
            # this run's subflows only: other tests on this stack write the same keys
            artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=list(names))))}
    return report, runs, artifacts


def _table(artifact):
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_nas_search_fans_out_generations_and_feeds_its_front_to_the_gate(searched):
    report, runs, artifacts = searched
    nas_rows = [r for r in report.leaderboard if r.candidate.startswith("nas-")]
    assert nas_rows and all(r.plan.startswith("nas(") for r in nas_rows)
    trials = [r for r in runs["nas"] if r.name.startswith("run-stage")]
    assert len(trials) == 4  # 2 generations of 2, as tasks of the subflow
    assert float(artifacts["nas-progress"].data) == 100.0
    table = _table(artifacts["nas-trials"])
    assert len(table) == 4 and {row["trial"] for row in table} >= {r.candidate for r in nas_rows}


def test_recipe_search_runs_trials_on_the_cluster_shares_prefixes_and_feeds_the_gate(searched):
    """The 4-trial recipe search through the flow on the 2 Ray nodes: the student every trial
    starts from is built once, the trials are tasks of the `recipe-search` subflow, they are
    scored on the valid split, and the front is judged by the gate with the other candidates."""
    report, runs, artifacts = searched
    assert report.search is not None and len(report.search.trials) == 4
    assert report.search.front
    rows = {r.candidate: r for r in report.leaderboard}
    assert set(report.search.front) <= set(rows)  # the front reached the gate
    assert all(rows[c].plan.startswith("distill(d8") for c in report.search.front)
    stages = [r for r in runs["recipe-search"] if r.name.startswith("run-stage")]
    distinct = {t.plan for t in report.search.trials if t.state == "complete"}
    # one student + one quantize stage per distinct chain: the shared prefix ran once
    assert len(stages) == 1 + len(distinct) < 2 * len(report.search.trials)
    assert any(r.name.startswith("validate-candidate") for r in runs["recipe-search"])
    assert float(artifacts["search-progress"].data) == 100.0
    assert len(_table(artifacts["search-trials"])) == 4
