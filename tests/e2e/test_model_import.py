"""A model the user trained, brought in with `recsqueeze model import`, compressed by the
default request on the real stack (S3, Prefect server, 2-node Ray) and promoted; the import's
bad inputs refused in one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tasks.artifacts import ArtifactStore
from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.metrics import auc
from tasks.modelimport import baseline_source
from tasks.models import build, resolve
from tasks.registry import Registry
from tasks.types import parse_model_spec
from tests.stack_helpers import wait_flow_run
from tests.user_models.dict_ranker import fit

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SPEC = {"family": "custom", "task": "ranking",
        "class_path": "tests.user_models.dict_ranker:DictRanker", "embedding_dim": 16,
        "options": {"hidden": 64}}


def _cli(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--state-dir",
                           stack.state_dir], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(stack, settings, tmp_path_factory):
    """The tiny click log in the stack's S3, and a DictRanker trained on it by the user's own
    loop, saved as safetensors and as a torch state_dict."""
    tables, data = generate("tiny", 0)
    ref = ArtifactStore(settings).put_dataset(tables, data)
    train = to_arrays(tables["train"], data)
    model = fit(build(resolve(parse_model_spec(SPEC), data), 0), train.dense, train.sparse,
                train.label)
    folder = tmp_path_factory.mktemp("weights")
    save_file(model.state_dict(), folder / "ranker.safetensors")
    torch.save(model.state_dict(), folder / "ranker.pt")
    torch.save(model, folder / "pickled-module.pt")
    return ref, folder, model, to_arrays(tables["test"], data)


def _triggered_run(api: httpx.Client, uri: str, timeout_s: float = 180) -> dict:
    """The `compress/on-import` flow run whose request names `uri` as its baseline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = api.post("/flow_runs/filter", json={
            "deployments": {"name": {"any_": ["on-import"]}}, "limit": 50}).json()
        mine = [r for r in runs if r["parameters"]["request"].get("baseline") == uri]
        if mine:
            assert len(mine) == 1, mine
            return mine[0]
        time.sleep(1)
    raise AssertionError(f"no on-import flow run for {uri} after {timeout_s}s")


def test_an_import_starts_a_run_that_compresses_it_with_the_defaults_and_promotes(
        stack, settings, trained):
    ref, folder, model, test = trained
    first = _cli(stack, "model", "import", str(folder / "ranker.safetensors"), "--spec",
                 json.dumps(SPEC), "--dataset", ref.uri, "--name", "dict-ranker")
    assert first.returncode == 0, first.stderr
    uri = first.stdout.strip()
    assert uri.startswith("s3://") and "/objects/" in uri
    # the import's event starts `compress/on-import`: the default request on this model
    with httpx.Client(base_url=settings.prefect_api_url, timeout=30) as api:
        run = wait_flow_run(api, _triggered_run(api, uri)["id"], timeout_s=600)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["request"] == {"model_name": "dict-ranker", "baseline": uri,
                                            "dataset": {"uri": ref.uri}}
    store = ArtifactStore(settings)
    report = store.get_json(f"runs/{run['id']}/report.json")
    assert report["status"] == "promoted", report["reason"]
    # the baseline is the imported model itself (not retrained): its test AUC is the model's
    assert report["baseline"]["quality"]["auc"]["value"] == pytest.approx(
        auc(test.label, predict(model, test)), abs=1e-9)
    assert {r["candidate"] for r in report["leaderboard"]} == {"int8-all", "int8-emb",
                                                                 "int4-emb"}
    version = report["promoted"]["version"]
    lineage = store.get_json(f"registry/dict-ranker/versions/{version}/lineage.json")
    assert lineage["baseline_source"]["model"]["uri"] == uri
    assert lineage["chain"][0]["stage"] == "imported"
    # the nightly run's source: the baseline production was compressed from is this import
    assert Registry(store).alias("dict-ranker") == version
    assert baseline_source(store, "dict-ranker@production").model.uri == uri

    # the same weights as a state_dict: the same model, nothing written, no second event
    again = _cli(stack, "model", "import", str(folder / "ranker.pt"), "--spec", json.dumps(SPEC),
                 "--dataset", ref.uri, "--name", "dict-ranker")
    assert again.returncode == 0 and again.stdout.strip() == uri, again.stderr
    assert "nothing written" in again.stderr
    assert [e["uri"] for e in _imported_events(settings)].count(uri) == 1

    # a request naming production's source, run through the CLI (what a nightly run sends)
    request = folder / "nightly.json"
    request.write_text(json.dumps({"model_name": "dict-ranker",
                                   "baseline": "dict-ranker@production",
                                   "dataset": {"uri": ref.uri}, "promote": False,
                                   "resources": {"timing_seconds": 5}}))
    out = _cli(stack, "run", "--request", str(request), "--json", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    nightly = json.loads(out.stdout)
    assert nightly["baseline"]["quality"]["auc"] == report["baseline"]["quality"]["auc"]
    assert nightly["status"] == "not_promoted" and "disabled" in nightly["reason"]


def _imported_events(settings) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            for _ in range(60):  # events reach the server asynchronously
                wanted = EventFilter(event=EventNameFilter(name=["recsqueeze.model.imported"]))
                events = [e.payload for e in client.read_events(filter=wanted, limit=50).events]
                if events:
                    return events
                time.sleep(0.5)
    return []


def _keys(store: ArtifactStore) -> set[str]:
    return {k for prefix in ("registry/", "objects/", "datasets/", "imports/")
            for k in store.keys(prefix)}


@pytest.mark.parametrize(("weights", "spec", "needle"), [
    ("pickled-module.pt", SPEC, "weights: refused: the file holds pickled objects that are not "
                                "tensors"),
    ("empty.pt", SPEC, "weights: the file is empty"),
    ("truncated.safetensors", SPEC, "weights: not a readable safetensors file"),
    ("nan.safetensors", SPEC, "weights: tensor 'mlp.0.weight' holds NaN (1 of"),
    ("missing.pt", SPEC, "weights: cannot read"),
    ("ranker.safetensors", {**SPEC, "embedding_dim": 8},
     "'tables.user_id.weight' is [2000, 16] in the file, [2000, 8] in the model"),
    ("ranker.safetensors", {**SPEC, "options": {"hidden": "wide"}},
     "model: tests.user_models.dict_ranker:DictRanker cannot be built from the spec"),
    ("ranker.safetensors", {**SPEC, "class_path": "nowhere.models:Ranker"},
     "model.class_path: cannot import 'nowhere.models'"),
])
def test_import_refuses_bad_input_in_one_line_and_writes_nothing(stack, settings, trained,
                                                                 weights, spec, needle):
    ref, folder, model, _ = trained
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.safetensors").write_bytes(
        (folder / "ranker.safetensors").read_bytes()[:-4096])
    poisoned = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned["mlp.0.weight"][3, 1] = float("nan")
    save_file(poisoned, folder / "nan.safetensors")
    store = ArtifactStore(settings)
    before = _keys(store)
    out = _cli(stack, "model", "import", str(folder / weights), "--spec", json.dumps(spec),
               "--dataset", ref.uri, "--name", "refused")
    assert out.returncode == 2, out.stderr
    assert needle in " ".join(out.stderr.split()), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert _keys(store) == before
