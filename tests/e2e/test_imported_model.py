"""A model the user trained, brought in with `recsqueeze model import`, compressed on the real
stack (S3, Prefect server, 2-node Ray): the import's event starts the default request, which
promotes; a request naming production's source applies every stage kind to it; its export
loads with torch alone; the import's bad inputs are refused in one line with nothing written.

The model is defined outside the package, in a layout unlike the built-in DLRM
(tests/user_models/bag_ranker.py: EmbeddingBag tables in a ModuleDict, a pooled multi-hot
feature, one table shared by two features, BatchNorm and LayerNorm), and trained by its own
loop here, on the tiny click log with a multi-hot column."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file, save_model

from tasks.artifacts import ArtifactStore
from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.metrics import auc
from tasks.modelimport import baseline_source
from tasks.models import build, resolve
from tasks.registry import Registry
from tasks.types import parse_model_spec
from tests.serving_check import score_without_recsqueeze, write_inputs
from tests.stack_helpers import wait_flow_run
from tests.user_models.dict_ranker import fit

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SPEC = {"family": "custom", "task": "ranking",
        "class_path": "tests.user_models.bag_ranker:BagRanker", "embedding_dim": 16}


def _cli(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--state-dir",
                           stack.state_dir], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(stack, settings, tmp_path_factory):
    """The tiny click log (its multi-hot column included) in the stack's S3, and a BagRanker trained on
    it by the user's own loop, saved as safetensors and as a torch state_dict."""
    tables, data = generate("tiny", 0)  # its recent_categories is multi-hot
    ref = ArtifactStore(settings).put_dataset(tables, data)
    train = to_arrays(tables["train"], data)
    model = fit(build(resolve(parse_model_spec(SPEC), data), 0), train.dense, train.sparse,
                train.label, epochs=3)
    folder = tmp_path_factory.mktemp("weights")
    save_model(model, str(folder / "ranker.safetensors"))  # a shared table under one name
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
                 json.dumps(SPEC), "--dataset", ref.uri, "--name", "bag-ranker")
    assert first.returncode == 0, first.stderr
    uri = first.stdout.strip()
    assert uri.startswith("s3://") and "/objects/" in uri
    # the import's event starts `compress/on-import`: the default request on this model
    with httpx.Client(base_url=settings.prefect_api_url, timeout=30) as api:
        run = wait_flow_run(api, _triggered_run(api, uri)["id"], timeout_s=600)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["request"] == {"model_name": "bag-ranker", "baseline": uri,
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
    lineage = store.get_json(f"registry/bag-ranker/versions/{version}/lineage.json")
    assert lineage["baseline_source"]["model"]["uri"] == uri
    assert lineage["chain"][0]["stage"] == "imported"
    # the nightly run's source: the baseline production was compressed from is this import
    assert Registry(store).alias("bag-ranker") == version
    assert baseline_source(store, "bag-ranker@production").model.uri == uri

    # the same weights as a state_dict: the same model, nothing written, no second event
    again = _cli(stack, "model", "import", str(folder / "ranker.pt"), "--spec", json.dumps(SPEC),
                 "--dataset", ref.uri, "--name", "bag-ranker")
    assert again.returncode == 0 and again.stdout.strip() == uri, again.stderr
    assert "nothing written" in again.stderr
    assert [e["uri"] for e in _imported_events(settings)].count(uri) == 1
    listed = _cli(stack, "model", "list", "bag-ranker")
    assert listed.returncode == 0 and listed.stdout.count("\n") == 1 and uri in listed.stdout

    # production's source, through the CLI with a candidate of every stage kind (what a
    # nightly request names): each runs on the imported model
    student = {**SPEC, "embedding_dim": 8}
    int8 = {"kind": "quantize", "linear": "int8_weight_only", "embeddings": "rowwise_int8"}
    request = folder / "nightly.json"
    request.write_text(json.dumps({
        "model_name": "bag-ranker", "baseline": "bag-ranker@production",
        "dataset": {"uri": ref.uri}, "promote": False, "resources": {"timing_seconds": 5},
        "candidates": [
            {"id": "mixed", "plan": [{"kind": "quantize", "mixed_precision": {}}]},
            {"id": "rows-int8", "plan": [{"kind": "prune", "method": "embedding_rows",
                                          "sparsity": 0.5}, int8]},
            {"id": "neurons", "plan": [{"kind": "prune", "method": "structured",
                                        "sparsity": 0.5, "finetune_epochs": 1}]},
            {"id": "tt-int8", "plan": [{"kind": "factorize", "target": "tt_embeddings",
                                        "rank": 8, "finetune_epochs": 1}, int8]},
            {"id": "student", "plan": [{"kind": "distill", "student": student, "epochs": 2}]},
        ]}))
    out = _cli(stack, "run", "--request", str(request), "--json", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    nightly = json.loads(out.stdout)
    assert nightly["baseline"]["quality"]["auc"] == report["baseline"]["quality"]["auc"]
    assert not nightly["failures"] and not nightly["skipped"], nightly
    assert {r["candidate"] for r in nightly["leaderboard"]} == {
        "mixed", "rows-int8", "neurons", "tt-int8", "student"}
    assert all(r["size_ratio"] > 1 for r in nightly["leaderboard"])
    assert nightly["status"] == "not_promoted" and "disabled" in nightly["reason"]


def test_the_promoted_import_exports_a_program_plain_torch_loads(stack, settings, trained,
                                                                tmp_path):
    ref, _, _, test = trained
    store = ArtifactStore(settings)
    version = Registry(store).alias("bag-ranker")
    assert version is not None, "the import's run promoted nothing (see the test above)"
    exported = _cli(stack, "registry", "export", "bag-ranker", str(tmp_path), "--version",
                    str(version))
    assert exported.returncode == 0, exported.stderr
    write_inputs(tmp_path, test.dense, test.sparse)
    got = score_without_recsqueeze([tmp_path])[tmp_path]
    model, _ = Registry(store).load("bag-ranker", version)
    with torch.no_grad():
        want = model(torch.from_numpy(test.dense), torch.from_numpy(test.sparse)).numpy()
    tol = json.loads((tmp_path / "serving.json").read_text())["checked"]["max_abs_diff_vs_eager"]
    assert got.shape == want.shape and abs(got - want).max() <= max(1e-5, 10 * tol)


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
     "'bags.user_id.weight' is [2000, 16] in the file, [2000, 8] in the model"),
    ("ranker.safetensors", {**SPEC, "class_path": "tests.user_models.dict_ranker:DictRanker",
                            "options": {"hidden": "wide"}},
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
