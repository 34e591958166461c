"""The deployments users trigger, on the real stack: the REST API, run_deployment with an
idempotency key, the UI form's schema, the nightly schedule, the concurrency limit."""

from __future__ import annotations

import hashlib
import json
import time

import boto3
import httpx
import pytest

from tasks.types import Candidate, CompressionRequest, DatasetRequest, QuantizeConfig, TrainConfig
from tests.stack_helpers import create_flow_run
from tests.stack_helpers import wait_flow_run as _wait

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _tiny(name: str) -> dict:
    request = CompressionRequest(
        model_name=name, dataset=DatasetRequest(builtin="tiny"),
        train=TrainConfig(epochs=1, batch_size=512),
        candidates=(Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),))
    return request.model_dump(mode="json")


@pytest.fixture(scope="module")
def api(stack, settings):
    """httpx client on the Prefect REST API, once the served deployments are all registered."""
    client = httpx.Client(base_url=settings.prefect_api_url, timeout=30)
    deadline = time.monotonic() + 120
    names = ("on-demand", "nightly", "on-import")
    while time.monotonic() < deadline:
        if all(client.get(f"/deployments/name/compress/{n}").status_code == 200 for n in names):
            break
        time.sleep(1)
    else:
        log = f"{stack.state_dir}/deployments.log"
        pytest.fail(f"deployments never registered; see {log}")
    yield client
    client.close()


def test_rest_triggered_run_completes_and_promotes_a_version_plain_boto3_reads(api, settings):
    deployment = api.get("/deployments/name/compress/on-demand").json()
    # what `curl -X POST $PREFECT_API_URL/deployments/$ID/create_flow_run -d '{...}'` sends
    created = create_flow_run(api, deployment["id"],
                              json={"parameters": {"request": _tiny("rest-ranker")}})
    assert created.status_code == 201, created.text
    run = _wait(api, created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
                      aws_access_key_id=settings.s3_access_key.get_secret_value(),
                      aws_secret_access_key=settings.s3_secret_key.get_secret_value())
    bucket = settings.s3_bucket

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    version = json.loads(read("registry/rest-ranker/aliases/production.json"))["version"]
    info = json.loads(read(f"registry/rest-ranker/versions/{version}/version.json"))
    weights = read(f"registry/rest-ranker/versions/{version}/model.safetensors")
    assert hashlib.sha256(weights).hexdigest() == info["model"]["sha256"]
    lineage = json.loads(read(f"registry/rest-ranker/versions/{version}/lineage.json"))
    assert lineage["run_id"] == created.json()["id"]


def test_run_deployment_with_an_idempotency_key_starts_one_run(api, settings):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        first = run_deployment("compress/on-demand", parameters={"request": _tiny("idem-ranker")},
                               idempotency_key="nightly-2026-11-28", timeout=0)
        again = run_deployment("compress/on-demand", parameters={"request": _tiny("idem-ranker")},
                               idempotency_key="nightly-2026-11-28", timeout=0)
    assert first.id == again.id
    assert _wait(api, str(first.id))["state"]["type"] == "COMPLETED"


def test_deployments_carry_the_form_schedule_and_concurrency_limit(api, settings):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            for name in ("compress/on-demand", "compress/nightly", "compress/on-import"):
                d = client.read_deployment_by_name(name)
                assert d.global_concurrency_limit is not None, name
                assert d.global_concurrency_limit.limit == 1
                assert d.concurrency_options.collision_strategy.value == "ENQUEUE"
    on_demand = api.get("/deployments/name/compress/on-demand").json()
    nightly = api.get("/deployments/name/compress/nightly").json()
    cron = nightly["schedules"][0]["schedule"]
    assert cron["cron"] == "0 2 * * *" and cron["timezone"] == "UTC"
    assert nightly["schedules"][0]["active"] is False  # RECSQUEEZE_NIGHTLY_PAUSED=1 (conftest)
    assert nightly["parameters"]["request"]["dataset"]["builtin"] == "small"
    # the UI form: every field of the request (and of its nested types) has a description
    schema = on_demand["parameter_openapi_schema"]
    undocumented = [f"{name}.{field}" for name, d in schema["definitions"].items()
                    for field, prop in d.get("properties", {}).items()
                    if "description" not in prop and field != "kind"]
    assert not undocumented, undocumented


@pytest.mark.parametrize("field, value", [("max_drop", "NaN"), ("max_drop", "Infinity")])
def test_rest_run_with_a_non_finite_budget_fails_at_parameter_validation(api, settings, field,
                                                                         value):
    deployment = api.get("/deployments/name/compress/on-demand").json()
    request = _tiny("rest-nan-ranker")
    request["budget"] = {"metrics": {"main": {field: "__VALUE__", "relative": True}}}
    # what `curl -d '{"parameters": {"request": {... "max_drop": NaN ...}}}'` sends
    body = json.dumps({"parameters": {"request": request}}).replace('"__VALUE__"', value)
    created = create_flow_run(api, deployment["id"], content=body,
                              headers={"content-type": "application/json"})
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
                      aws_access_key_id=settings.s3_access_key.get_secret_value(),
                      aws_secret_access_key=settings.s3_secret_key.get_secret_value())
    written = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="registry/rest-nan-ranker/")
    if created.status_code != 201:  # refused by the API itself, before any run exists
        assert created.status_code in (400, 422), created.text
        assert written.get("KeyCount", 0) == 0
        return
    run = _wait(api, created.json()["id"])
    assert run["state"]["type"] == "FAILED", run["state"]
    message = run["state"]["message"] or ""
    assert "parameter" in message.lower() and "max_drop" in message, message
    for prefix in ("registry/rest-nan-ranker/", f"runs/{run['id']}/"):
        listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix)
        assert listed.get("KeyCount", 0) == 0, prefix
