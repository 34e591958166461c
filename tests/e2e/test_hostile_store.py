"""A writer of the bucket who is not recsqueeze, and secrets that must stay put (issue 13).

On the real stack: result records replaced by a pickle that writes a canary file, and by a
well-formed JSON record without this deployment's seal, are recomputed - never executed,
never believed; after a run, no secret is found in any file of the state dir or Ray's temp
dir, any S3 object, any Prefect artifact, log, block document, flow-run parameter, or Ray's job
table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.driver import run_compress
from tasks.artifacts import ArtifactStore, seal
from tasks.results import SEAL, check_record
from tasks.types import (
    Candidate,
    CompressionRequest,
    DatasetRequest,
    QuantizeConfig,
    Resources,
    TrainConfig,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _request(name: str, seed: int) -> CompressionRequest:
    # data and training seeds of its own: every cached result of this request is new, in
    # whatever order the session's tests run (cache keys are content)
    return CompressionRequest(
        model_name=name, dataset=DatasetRequest(builtin="tiny", seed=seed),
        train=TrainConfig(epochs=2, batch_size=512, seed=seed),
        candidates=(Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),),
        resources=Resources(timing_seconds=5))


def _result_keys(store: ArtifactStore) -> set[str]:
    pages = store.s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket,
                                                               Prefix="prefect-results/")
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _task_states(settings, run_id: str) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return states


class _Canary:
    """Unpickling this touches `path` (what an attacker's payload would do instead)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _pickle_record(key: str, canary: str) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=key,
                                                      serializer=PickleSerializer()),
                        result=_Canary(canary)).serialize()


@pytest.fixture(scope="module")
def first_run(stack, settings):
    """One run whose cached results are all new: (its report, the result keys it wrote)."""
    store = ArtifactStore(settings)
    before = _result_keys(store)
    report = run_compress(_request("hostile-cache", seed=11), settings)
    assert report.status == "promoted", report.reason
    return report, sorted(_result_keys(store) - before)


def test_planted_pickles_and_forged_records_are_recomputed_never_run(first_run, settings,
                                                                      tmp_path):
    from prefect._internal.result_records import ResultRecord

    store = ArtifactStore(settings)
    _, ours = first_run
    objects = {k: store.s3.get_object(Bucket=store.bucket, Key=k) for k in ours}
    records = {k: (o["Body"].read(), o["Metadata"]) for k, o in objects.items()}
    kinds = {k: json.loads(json.loads(body)["result"])["type"] for k, (body, _) in records.items()}
    assert sorted(kinds.values()) == ["Built", "Built", "CandidateResult", "DatasetRef",
                                      "Evaluated"], kinds
    key = settings.signing_key.get_secret_value().encode()
    for k, (body, meta) in records.items():  # every record carries this deployment's seal
        assert meta[SEAL] == seal(key, k, body)

    # the payload is live: Prefect's own reader runs it
    control = tmp_path / "control"
    ResultRecord.deserialize(_pickle_record("x", str(control)))
    assert control.exists()

    # every record but the candidate's replaced by the pickle; the candidate's rewritten as a
    # well-formed JSON record claiming another node, without the seal
    canary = tmp_path / "canary"
    for k, kind in kinds.items():
        if kind == "CandidateResult":
            raw = json.loads(records[k][0])
            result = json.loads(raw["result"])
            result["data"]["node_ip"] = "forged"
            raw["result"] = json.dumps(result)
            forged = json.dumps(raw).encode()
            check_record(forged)  # it parses: only the seal tells it apart
            store.s3.put_object(Bucket=store.bucket, Key=k, Body=forged)
        else:
            store.s3.put_object(Bucket=store.bucket, Key=k, Body=_pickle_record(k, str(canary)))

    again = run_compress(_request("hostile-cache", seed=11), settings)
    assert not canary.exists()
    assert again.status == "not_promoted" and not again.failures, (again.reason, again.failures)
    states = _task_states(settings, again.run_id)
    for name in ("prepare-dataset", "train-baseline", "evaluate-baseline", "run-stage",
                 "evaluate-candidate"):
        assert states[name] == ["Completed"], (name, states[name])
    # healed: the next writer overwrote each record with a sealed JSON one
    for k in ours:
        obj = store.s3.get_object(Bucket=store.bucket, Key=k)
        body = obj["Body"].read()
        check_record(body)
        assert obj["Metadata"][SEAL] == seal(key, k, body)
        assert b"forged" not in body


def _secrets(settings) -> dict[str, bytes]:
    values = {"s3 access key id": settings.s3_access_key, "s3 secret key": settings.s3_secret_key,
              "signing key": settings.signing_key}
    found = {name: v.get_secret_value().encode() for name, v in values.items()}
    assert all(len(v) >= 16 for v in found.values()), "the stack's keys are generated and long"
    return found


def _hits(blob: bytes, secrets: dict[str, bytes]) -> list[str]:
    return [name for name, value in secrets.items() if value in blob]


def test_no_secret_outside_the_credentials_file(first_run, stack, settings):
    """After runs (this module's, and any earlier in the session) and a promotion."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    secrets = _secrets(settings)
    leaks: list[str] = []

    credentials = Path(settings.credentials_file)
    assert credentials.stat().st_mode & 0o777 == 0o600
    temp_dir = Path(stack.ray.temp_dir).parent  # Ray's own temp dir is inside it
    assert temp_dir.stat().st_mode & 0o777 == 0o700
    for root in (Path(stack.state_dir), temp_dir):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path != credentials:
                try:
                    blob = path.read_bytes()
                except OSError:  # a socket, a file removed meanwhile
                    continue
                leaks += [f"{path}: {h}" for h in _hits(blob, secrets)]

    store = ArtifactStore(settings)
    for page in store.s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket):
        for o in page.get("Contents", []):
            obj = store.s3.get_object(Bucket=store.bucket, Key=o["Key"])
            blob = obj["Body"].read() + json.dumps(obj.get("Metadata", {})).encode()
            leaks += [f"s3://{store.bucket}/{o['Key']}: {h}" for h in _hits(blob, secrets)]

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            api = {
                "artifacts": client._client.post("/artifacts/filter", json={}).content,
                "logs": client._client.post("/logs/filter", json={"limit": 200}).content,
                "block documents": client._client.post(
                    "/block_documents/filter", json={"include_secrets": True}).content,
                "flow runs": client._client.post("/flow_runs/filter", json={}).content,
                "task runs": client._client.post("/task_runs/filter", json={}).content,
                "deployments": client._client.post("/deployments/filter", json={}).content,
                "variables": client._client.post("/variables/filter", json={}).content,
            }
            offset = 200  # every log line, a page at a time
            while True:
                page = client._client.post("/logs/filter",
                                           json={"limit": 200, "offset": offset}).content
                if page.strip() == b"[]":
                    break
                api[f"logs {offset}"] = page
                offset += 200
    for name, blob in api.items():
        leaks += [f"prefect {name}: {h}" for h in _hits(blob, secrets)]

    env = os.environ | {"RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN_PATH": settings.ray_auth_token_path}
    jobs = subprocess.run(
        [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], "
         "_node_ip_address=sys.argv[2], logging_level='ERROR'); "
         "print(ray._private.state.jobs())", settings.ray_address, settings.ray_node_ip],
        capture_output=True, env=env, timeout=120)
    assert jobs.returncode == 0 and b"JobID" in jobs.stdout, jobs.stderr[-2000:]
    leaks += [f"ray job table: {h}" for h in _hits(jobs.stdout, secrets)]
    assert not leaks, leaks
