"""Bad input, refused cleanly, on the real local stack: a table of cases per way in.

Ways in: `recsqueeze run --request FILE`, a flow run created through the Prefect REST API on the
served `compress/on-demand` deployment, `recsqueeze dataset import`, the `registry` commands,
and artifacts tampered in the bucket by someone who is not recsqueeze. Every case asserts the
exit code (or the HTTP status / the flow run's final state), the message naming the field and
the fix, on one line, no traceback, and that no key under registry/, objects/ or datasets/ was
added, removed or rewritten (keys and ETags listed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from tasks.artifacts import ArtifactStore
from tasks.registry import Registry
from tests.e2e.test_deployments import _tiny  # the REST cases edit its request
from tests.stack_helpers import create_flow_run

pytestmark = pytest.mark.integration
FLOW = pytest.mark.slow  # the cases that start a flow run (refused once it can look)
REPO = Path(__file__).resolve().parents[2]
WATCHED = ("registry/", "objects/", "datasets/")
PREFIX = "bad-input"  # every model and dataset this module puts in the bucket


# --- helpers -------------------------------------------------------------------------------
def _listing(store: ArtifactStore) -> dict[str, str]:
    """Every key under WATCHED with its ETag: one listing per prefix, a page per 1000 keys."""
    pages = store.s3.get_paginator("list_objects_v2")
    return {o["Key"]: o["ETag"] for prefix in WATCHED
            for page in pages.paginate(Bucket=store.bucket, Prefix=prefix)
            for o in page.get("Contents", [])}


def _recsqueeze(*args: str) -> subprocess.CompletedProcess[str]:
    """`recsqueeze ARGS` as a user runs it: its own process, this process's environment."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO, env=os.environ.copy())


def _cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """`recsqueeze ARGS --state-dir STACK`: against the test stack."""
    return _recsqueeze(*args, "--state-dir", str(stack.state_dir))


def _assert_refused(out: subprocess.CompletedProcess[str], code: int, needle: str,
                    before_work: bool = True) -> None:
    """Exit `code`; the last line of stderr holds the whole message; no traceback. Refused
    before any work, stderr is that one line and stdout is empty."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines and needle in lines[-1], (needle, out.stderr[-3000:])
    if before_work:
        assert len(lines) == 1 and not out.stdout, (out.stdout, out.stderr)


@pytest.fixture()
def unchanged(store: ArtifactStore) -> Iterator[None]:
    """Fails the case if it wrote, rewrote or removed a key under registry/, objects/, datasets/."""
    before = _listing(store)
    yield
    after = _listing(store)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"written under {WATCHED}: {changed[:10]}"


# --- a small click log in the user's formats -------------------------------------------------
N = 100  # one file split by time: 70 train, 10 valid, 20 test
SPEC: dict[str, Any] = {
    "name": f"{PREFIX}-clicks", "label": "click", "dense": ["price"],
    "categorical": [{"name": "user_id", "cardinality": 20}, {"name": "item_id", "cardinality": 30},
                    {"name": "category_id", "cardinality": 4}],
    "user_id": "user_id", "item_id": "item_id", "query_id": "session_id", "timestamp": "ts",
    "item_features": ["category_id"], "segments": ["popularity"],
}


def _clicks(seed: int = 0) -> dict[str, Any]:
    """Columns of N time-ordered impressions; both labels in every split."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 30, N)
    click = (rng.random(N) < 0.3).astype(np.int8)
    click[[0, 1, 70, 71, 80, 81]] = (0, 1, 0, 1, 0, 1)
    return {"ts": 1_700_000_000 + 60 * np.arange(N), "session_id": np.arange(N) // 5,
            "user_id": rng.integers(0, 20, N), "item_id": items, "category_id": items % 4,
            "price": np.round(rng.lognormal(3, 0.5, N), 3), "click": click,
            "popularity": np.where(items < 5, "head", "tail")}


Edit = Callable[[dict[str, Any], dict[str, Any]], None]  # (spec, columns) changed in place


def _write(tmp: Path, edit: Edit | None = None, fmt: str = "csv") -> tuple[Path, Path]:
    """spec.json and one clicks.csv / clicks.parquet, after `edit`."""
    spec, columns = json.loads(json.dumps(SPEC)), _clicks()
    if edit is not None:
        edit(spec, columns)
    (tmp / "spec.json").write_text(json.dumps(spec))
    table = pa.table(columns)
    data = tmp / f"clicks.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, data)
    else:
        pcsv.write_csv(table, data)
    return tmp / "spec.json", data


# --- what the bucket holds for the cases: datasets, registry models, tampered copies -------
@dataclass(frozen=True)
class World:
    fills: dict[str, str]  # placeholder in a case -> its value: {s3}, {dataset}, {split}, ...


def _publish(reg: Registry, model: str, ref: Any, versions: int, production: bool = True) -> None:
    files = {"metrics.json": {"auc": 0.7}, "lineage.json": {"run_id": "bad-input"}}
    for n in range(len(reg.versions(model)), versions):  # a rerun on the same bucket adds none
        reg.publish(model, ref, files, owner=f"{model}/{n}", candidate_id="int8-emb",
                    set_production=production)


def _tamper_registry(store: ArtifactStore) -> None:
    """What someone who can write the bucket, but holds no signing key, leaves behind."""
    def key(n: int, name: str) -> str:
        return f"registry/{PREFIX}-tampered/versions/{n}/{name}"

    def read(k: str) -> bytes:
        return store.s3.get_object(Bucket=store.bucket, Key=k)["Body"].read()

    def put(k: str, body: bytes) -> None:
        store.s3.put_object(Bucket=store.bucket, Key=k, Body=body)

    record = json.loads(read(key(1, "version.json")))
    put(key(1, "version.json"), json.dumps({**record, "candidate": "forged"}).encode())
    put(key(2, "version.json"), read(key(3, "version.json")))  # v2 re-pointed at v3's record
    weights = read(key(4, "model.safetensors"))
    put(key(4, "model.safetensors"), weights[: len(weights) // 2])
    put(key(5, "metrics.json"), b'{"auc": 0.99}')
    store.s3.delete_object(Bucket=store.bucket, Key=key(6, "lineage.json"))
    for model, body in (("alias-garbage", b"\x00 not json"), ("alias-type", b'{"version": "two"}')):
        put(f"registry/{PREFIX}-{model}/aliases/production.json", body)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory) -> Iterator[World]:
    from tasks.dataimport import import_dataset
    from tasks.models import build, resolve
    from tasks.types import DlrmSpec

    store = ArtifactStore(settings)
    reg = Registry(store)
    good = import_dataset(*_write(tmp_path_factory.mktemp("good")), settings)
    split = import_dataset(*_write(tmp_path_factory.mktemp("split"),
                                   lambda spec, _: spec.update(name=f"{PREFIX}-split")), settings)
    base = split.uri.removeprefix(f"s3://{store.bucket}/")
    test_split = store.s3.get_object(Bucket=store.bucket, Key=f"{base}test.parquet")["Body"].read()
    store.s3.put_object(Bucket=store.bucket, Key=f"{base}train.parquet", Body=test_split)
    replaced = {"{split_got}": hashlib.sha256(test_split).hexdigest(),
                "{split_recorded}": split.splits["train"]}
    garbage = f"datasets/{PREFIX}-garbage/0123456789abcdef/"
    store.s3.put_object(Bucket=store.bucket, Key=f"{garbage}spec.json", Body=b"{not json")

    spec = resolve(DlrmSpec(embedding_dim=4, bottom_mlp=(4,), top_mlp=(4,)), good.spec)
    ref = store.put_model(build(spec), spec)
    for model, versions in (("ranker", 2), ("single", 1), ("tampered", 6), ("alias-garbage", 1),
                            ("alias-type", 1)):
        _publish(reg, f"{PREFIX}-{model}", ref, versions)
    _publish(reg, f"{PREFIX}-unpromoted", ref, 1, production=False)
    _tamper_registry(store)
    yield World(fills={"{s3}": store.uri(""), "{dataset}": good.uri, "{split}": split.uri,
                      "{garbage}": store.uri(garbage), **replaced})
    # the broken aliases would break any later `registry list` of the session
    for model in ("alias-garbage", "alias-type"):
        store.s3.delete_object(Bucket=store.bucket,
                               Key=f"registry/{PREFIX}-{model}/aliases/production.json")


def _fill(text: str, world: World, **paths: Path) -> str:
    for placeholder, uri in world.fills.items():
        text = text.replace(placeholder, uri)
    for name, path in paths.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text


# --- `recsqueeze run --request FILE` ---------------------------------------------------------
def _request(raw: str, needle: str, case: str, code: int = 2, argv: tuple[str, ...] = (),
             flow: bool = False) -> Any:
    return pytest.param(raw, argv, code, needle, flow, id=case, marks=[FLOW] if flow else [])


STAGE = '{"candidates": [{"id": "a", "plan": [%s]}]}'
REQUESTS = [
    # the file itself
    _request('{"model_name": "x",}', "invalid request: --request {req}: invalid JSON at line 1 "
             "column 20: Expecting property name enclosed in double quotes", "json-syntax"),
    _request("", "invalid request: --request {req}: empty file; write the request as a JSON "
             "object ({} takes every default)", "empty-file"),
    _request("[1, 2]", 'invalid request: --request {req}: a request is a JSON object of fields, '
             'e.g. {"model_name": "ctr-ranker"} (got a JSON array)', "not-an-object"),
    _request("", "invalid request: --request {tmp}/nope.json: file not found; give the path of "
             "a CompressionRequest JSON file", "missing-file",
             argv=("run", "--request", "{tmp}/nope.json")),
    _request("", "invalid request: --size must be tiny, small or small_ids (got 'huge'); for "
             "your own data give --request with dataset.uri", "unknown-size",
             argv=("run", "--size", "huge")),
    # fields
    _request('{"modle_name": "x"}', "invalid request: modle_name: unknown field; remove it or "
             "fix its name (allowed here: baseline, budget, calibrate, candidates, dataset, model, "
             "model_name, nas, promote, require_useful_baseline, resources, reuse_results, "
             "search, train)",
             "unknown-field"),
    _request('{"train": {"epoch": 3}}', "train.epoch: unknown field; remove it or fix its name "
             "(allowed here: batch_size, embedding_l2, epochs, lr, min_steps, patience, seed, "
             "weight_decay)",
             "unknown-nested-field"),
    _request('{"model_name": "../etc"}', "model_name: String should match pattern "
             "'^[a-z0-9][a-z0-9\\-]{0,62}$' (got '../etc')", "model-name-path"),
    _request('{"model": {"embedding_dim": 0}}', "model.embedding_dim: Input should be greater "
             "than 0 (got 0)", "embedding-dim-zero"),
    _request('{"model": {"class_path": "shop.models:Ranker"}}', "model.class_path is for family "
             "'custom' only (family is 'dlrm'); remove it or set family to 'custom'",
             "class-path-without-custom"),
    _request('{"model": {"family": "resnet"}}', "model.family: 'resnet' is not a model family; "
             "set family to one of dlrm, two_tower, sasrec, custom (left out: dlrm)",
             "unknown-family"),
    _request('{"model": {"layers": 4}}', "model.layers is for family 'sasrec' only (family is "
             "'dlrm'); remove it or set family to 'sasrec'", "field-of-another-family"),
    _request('{"train": {"epochs": 0}}', "train.epochs: Input should be greater than or equal "
             "to 1 (got 0)", "epochs-zero"),
    _request('{"train": {"weight_decay": NaN}}', "train.weight_decay must be a finite number "
             "(got nan); NaN and Infinity are not allowed: give a number", "weight-decay-nan"),
    _request('{"dataset": {"builtin": "tiny", "uri": "s3://artifacts/datasets/x/"}}',
             "dataset: set exactly one of dataset.builtin ('tiny'|'small'|'small_ids') or "
             "dataset.uri (got "
             "builtin='tiny', uri='s3://artifacts/datasets/x/')", "dataset-two-sources"),
    _request('{"dataset": {"uri": "/home/me/clicks"}}', "dataset.uri must start with s3:// "
             "(got '/home/me/clicks')", "dataset-uri-not-s3"),
    _request('{"candidates": [{"id": "a", "plan": [{"kind": "quantize"}]}, '
             '{"id": "a", "plan": [{"kind": "prune"}]}]}',
             "candidates: ids must be unique (duplicated: ['a'])", "duplicate-candidate-ids"),
    _request(STAGE % '{"linear": "fp16"}', 'candidates[0].plan[0]: no "kind"; set kind to one '
             "of quantize, prune, factorize, distill, nas_trial", "stage-without-kind"),
    _request(STAGE % '{"kind": "quantize", "linear": "int2_weight_only"}',
             "candidates[0].plan[0].linear: quantize.linear: int2 is for embedding tables only "
             "(got 'int2_weight_only'); use int4_weight_only or an int8 mode for Linear layers",
             "int2-linear"),
    _request(STAGE % '{"kind": "prune", "sparsity": 1.5}', "candidates[0].plan[0].sparsity: "
             "prune.sparsity must be in (0, 1) (got 1.5); it is the fraction removed",
             "sparsity-above-one"),
    _request('{"budget": {"metrics": {"main": {"max_drop": 1.5, "relative": true}}}}',
             "budget.metrics.main: max_drop is a fraction of the baseline's value when relative "
             "is true and must be < 1 (got 1.5); e.g. 0.001 = 0.1%", "relative-max-drop-above-one"),
    _request('{"resources": {"timing_seconds": Infinity}}', "resources.timing_seconds must be a "
             "finite number (got inf); NaN and Infinity are not allowed: give a number",
             "timing-infinity"),
    _request('{"budget": {"metrics": {"recall@50": {"max_drop": 0.01}}}}',
             "budget.metrics['recall@50']: a dlrm model (ranking) is not measured on recall; "
             "budget one of ['main', 'auc', 'logloss', 'ndcg'] (main = auc)",
             "metric-of-another-family"),
    _request('{"model": {"family": "sasrec"}, "nas": {}}', "nas: the search space is the DLRM "
             "ranker's; model.family is 'sasrec' (remove nas or use family 'dlrm')",
             "nas-on-sasrec"),
    _request("{}", "no stack: prefect_api_url is empty: start the stack (`recsqueeze up`)",
             "no-stack-at-state-dir", code=1,
             argv=("run", "--request", "{req}", "--state-dir", "{tmp}/no-stack")),
    # refused once the run can look at the data: still one line, exit 2 (a missing dataset and
    # a stage no node can hold: test_compress_tiny's test_cli_refuses_malformed_request_...)
    _request('{"dataset": {"uri": "{dataset}"}, "budget": {"metrics": {"auc[country=fr]": '
             '{"max_drop": 0.01}}}}', "run refused: budget.metrics['auc[country=fr]']: "
             "'country' is not a segment column of dataset bad-input-clicks (segments: "
             "['popularity']); name one of them or add it to the dataset spec's segments",
             "budget-on-unknown-segment", flow=True),
]


@pytest.mark.parametrize("raw, argv, code, needle, flow", REQUESTS)
def test_run_refuses_a_bad_request(raw, argv, code, needle, flow, stack, world, tmp_path,
                                   unchanged):
    path = tmp_path / "request.json"
    path.write_text(_fill(raw, world))  # as a user writes it: Python's json reads NaN, Infinity
    args = [_fill(a, world, req=path, tmp=tmp_path) for a in argv or ("run", "--request", "{req}")]
    out = _recsqueeze(*args) if "--state-dir" in args else _cli(stack, *args, "--json")
    _assert_refused(out, code, _fill(needle, world, req=path, tmp=tmp_path), before_work=not flow)
    if flow:
        assert not out.stdout  # --json: nothing for a script to mistake for a result


# --- a flow run created through the Prefect REST API -----------------------------------------
@pytest.fixture(scope="module")
def on_demand(stack, settings) -> Iterator[tuple[httpx.Client, str]]:
    """The Prefect REST API and the served on-demand deployment's id, once registered."""
    client = httpx.Client(base_url=settings.prefect_api_url, timeout=30)
    deadline = time.monotonic() + 120
    while (got := client.get("/deployments/name/compress/on-demand")).status_code != 200:
        if time.monotonic() > deadline:
            pytest.fail(f"deployments never registered; see {stack.state_dir}/deployments.log")
        time.sleep(1)
    yield client, got.json()["id"]
    client.close()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    """A request edit: the field at dotted `path` (list indices as numbers) set to `value`."""
    def edit(request: dict[str, Any]) -> dict[str, Any]:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = request
        for part in parents:
            node = node[part]
        node[last] = value
        return request
    return edit


def _rest(edit: Callable[[dict[str, Any]], Any], status: int | str, needle: str, case: str) -> Any:
    return pytest.param(edit, status, needle, id=case,
                        marks=[FLOW] if status == "FAILED" else [])


REST = [  # refused by the API itself (the deployment enforces its parameter schema): 409
    _rest(_set("modle_name", "x"), 409, "Validation failed for field 'request'. Failure reason: "
          "Additional properties are not allowed ('modle_name' was unexpected)", "unknown-field"),
    # the form offers one schema per family: the API's check names the field, not the choices
    # (the flow's own validation names them: the unknown-family request case above)
    _rest(_set("model.family", "resnet"), 409, "Validation failed for field 'request.model'. "
          "Failure reason: ", "unknown-family"),
    _rest(_set("train.epochs", 0), 409, "Validation failed for field 'request.train.epochs'. "
          "Failure reason: 0 is less than the minimum of 1", "epochs-zero"),
    _rest(_set("model_name", "Bad Name"), 409, "Validation failed for field 'request.model_name'."
          " Failure reason: 'Bad Name' does not match", "model-name-pattern"),
    _rest(lambda request: [request], 409, "is not of type 'object'", "not-an-object"),
    _rest(_set("candidates.0.plan.0.kind", "sharpen"), 409, "Validation failed for field "
          "'request.candidates[0].plan[0]'", "unknown-stage-kind"),
    # what a JSON schema cannot say: the run is created, and fails at parameter validation
    _rest(lambda request: {**request, "candidates": request["candidates"] * 2}, "FAILED",
          "request.candidates: Value error, candidates: ids must be unique (duplicated: "
          "['int8-emb'])", "duplicate-candidate-ids"),
    _rest(_set("dataset.uri", "s3://artifacts/datasets/x/"), "FAILED", "request.dataset: Value "
          "error, dataset: set exactly one of dataset.builtin ('tiny'|'small'|'small_ids') or "
          "dataset.uri "
          "(got builtin='tiny', uri='s3://artifacts/datasets/x/')", "dataset-two-sources"),
]


@pytest.mark.parametrize("edit, status, needle", REST)
def test_rest_refuses_a_bad_request(edit, status, needle, on_demand, store, unchanged):
    api, deployment = on_demand
    created = create_flow_run(api, deployment, json={"parameters": {
        "request": edit(_tiny(f"{PREFIX}-rest"))}})
    if status != "FAILED":
        assert created.status_code == status, created.text
        detail = created.json()["detail"]
        assert detail.startswith("Error creating flow run: Validation failed for field 'request")
        assert needle in detail and "\n" not in detail, detail
        return
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 180
    while (run := api.get(f"/flow_runs/{run_id}").json())["state"]["type"] not in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"flow run {run_id} still {run['state']['type']}"
        time.sleep(1)
    message = run["state"]["message"] or ""
    assert run["state"]["type"] == "FAILED", run["state"]
    assert message.startswith("Validation of flow parameters failed"), message
    assert any(needle in line for line in message.splitlines()), message  # one line per field
    assert "Traceback" not in message
    listed = store.s3.list_objects_v2(Bucket=store.bucket, Prefix=f"runs/{run_id}/")
    assert listed.get("KeyCount", 0) == 0  # the flow itself never started


# --- `recsqueeze dataset import SPEC PATH` ---------------------------------------------------
def _column(name: str, fn: Callable[[Any], Any]) -> Edit:
    def edit(spec: dict[str, Any], columns: dict[str, Any]) -> None:
        columns[name] = fn(columns[name])
    return edit


def _cell(name: str, row: int, value: Any, dtype: pa.DataType | None = None) -> Edit:
    def edit(spec: dict[str, Any], columns: dict[str, Any]) -> None:
        values = list(columns[name])
        values[row] = value
        columns[name] = pa.array(values, dtype)
    return edit


def _spec(**fields: Any) -> Edit:
    def edit(spec: dict[str, Any], columns: dict[str, Any]) -> None:
        spec.update(fields)
    return edit


Files = Callable[[Path], tuple[Path, Path]]  # tmp -> (spec.json, data) as the user has them


def _files(edit: Edit | None = None, fmt: str = "csv",
           then: Callable[[Path, Path], Path] | None = None) -> Files:
    def make(tmp: Path) -> tuple[Path, Path]:
        spec, data = _write(tmp, edit, fmt)
        return spec, (then(spec, data) if then else data)
    return make


def _as(name: str, text: str | None = None) -> Callable[[Path, Path], Path]:
    """The data is the file `name` beside it instead, holding `text` (None: no such file)."""
    def swap(spec: Path, data: Path) -> Path:
        path = data.with_name(name)
        if text is not None:
            path.write_text(text)
        return path
    return swap


def _header_only(spec: Path, data: Path) -> Path:
    data.write_text(data.read_text().splitlines()[0] + "\n")
    return data


def _spec_text(text: str) -> Callable[[Path, Path], Path]:
    def rewrite(spec: Path, data: Path) -> Path:
        spec.write_text(text)
        return data
    return rewrite


def _extra_price(spec: Path, data: Path) -> Path:
    if data.suffix == ".parquet":
        table = pq.read_table(data)
        pq.write_table(table.append_column("price", table["price"]), data)
    else:
        lines = data.read_text().splitlines()
        data.write_text("\n".join([lines[0] + ',"price"', *(f"{x},1.5" for x in lines[1:])]) + "\n")
    return data


DATASETS = [
    pytest.param(_files(lambda spec, columns: columns.pop("price")),
                 "clicks.csv: missing column 'price' (dense); columns present: ts, session_id, "
                 "user_id, item_id, category_id, click, popularity; rename the column in the "
                 "data or in spec.json", id="missing-column"),
    pytest.param(_files(_column("user_id", lambda v: [f"u{x}" for x in v])),
                 "clicks.csv: categorical column 'user_id' has wrong dtype string; ids must be "
                 "integers in [0, 20): map raw values to ids 0..19 first", id="wrong-dtype"),
    pytest.param(_files(_cell("click", 5, float("nan"), pa.float64()), "parquet"),
                 "clicks.parquet: label column 'click' has dtype double; it must be integer or "
                 "bool 0/1: cast it to int8 once its values are 0/1", id="nan-label"),
    pytest.param(_files(_cell("click", 5, None, pa.int8())),
                 "clicks.csv: label column 'click' has 1 null value (first at row 5); every row "
                 "needs a 0/1 label: drop those rows or fill them", id="empty-label-cell"),
    pytest.param(_files(then=_extra_price), "clicks.csv: column 'price' appears 2 times; rename "
                 "or drop the copies so every column name is unique", id="duplicate-column-csv"),
    pytest.param(_files(fmt="parquet", then=_extra_price), "clicks.parquet: column 'price' "
                 "appears 2 times; rename or drop the copies so every column name is unique",
                 id="duplicate-column-parquet"),
    pytest.param(_files(_cell("user_id", 7, -1)), "clicks.csv: categorical column 'user_id' has "
                 "ids out of range [0, 20): found min -1, max 19 (1 row, first at row 7); negative "
                 "ids are not allowed: map them to ids in 0..19", id="negative-id"),
    pytest.param(_files(_spec(categorical=[{"name": "user_id", "cardinality": 10**12},
                                           *SPEC["categorical"][1:]])),
                 "{spec}: categorical.0.cardinality: Input should be less than or equal to "
                 "50000000; hash or bucket the ids into fewer first", id="cardinality-too-large"),
    pytest.param(_files(then=_as("clicks.csv", "")), "clicks.csv: cannot read it as csv (Empty CSV "
                 "file); check that it is a complete csv file, or export it again",
                 id="empty-file"),
    pytest.param(_files(then=_header_only),
                 "{data}: empty file (0 rows); give a file with the rows to import",
                 id="header-only"),
    pytest.param(_files(then=_as("nope.csv")),
                 "{data}: not found; give a directory holding train, valid and test files "
                 "(.parquet or .csv), or one .parquet/.csv file", id="missing-file"),
    pytest.param(_files(then=_as("clicks.parquet", "not parquet")), "clicks.parquet: cannot "
                 "read it as parquet (", id="not-parquet"),
    pytest.param(_files(then=_spec_text('{"name": "x",}')),
                 "{spec}: invalid JSON at line 1 column 14: Expecting property name enclosed in "
                 "double quotes", id="bad-spec-json"),
    pytest.param(_files(_spec(segment=["popularity"])), "{spec}: segment: Extra inputs are not "
                 "permitted (known fields: name, label, categorical, dense, user_id, item_id, ",
                 id="spec-field-typo"),
]


@pytest.mark.parametrize("files, needle", DATASETS)
def test_dataset_import_refuses_bad_data(files, needle, stack, tmp_path, unchanged):
    spec, data = files(tmp_path)
    out = _cli(stack, "dataset", "import", str(spec), str(data))
    _assert_refused(out, 2, "invalid dataset: " + needle.replace("{spec}", str(spec)).replace(
        "{data}", str(data)))


# --- `recsqueeze registry ...` ---------------------------------------------------------------
def _registry(args: str, code: int, needle: str, case: str) -> Any:
    return pytest.param(args.split(), code, needle, id=case)


M = PREFIX  # model names below: f"{M}-ranker" has v1, v2 (production v2, previous v1)
REGISTRY = [
    _registry("show ../etc", 2, "model name '../etc' is not a registry name: 1-63 lowercase "
              "letters, digits and '-', starting with a letter or digit", "show-path-as-name"),
    _registry(f"show {M}-ranker --version 0", 2, "--version must be 1 or more (got 0); omit it "
              "for production", "show-version-zero"),
    _registry(f"show {M}-ranker --version 99", 1, f"{M}-ranker has no version 99 (versions: "
              "[1, 2])", "show-missing-version"),
    _registry("show no-such-model", 1, "registry has no model 'no-such-model'; `recsqueeze "
              "registry list` shows the models", "show-unknown-model"),
    _registry(f"show {M}-unpromoted", 1, f"{M}-unpromoted has no production version (versions: "
              f"[1]); give --version N, or `recsqueeze registry promote {M}-unpromoted N`",
              "show-without-production"),
    _registry(f"promote {M}-ranker 99", 1, f"registry {M}-ranker: version 99 does not exist "
              "(versions: [1, 2])", "promote-missing-version"),
    _registry("promote no-such-model 1", 1, "registry no-such-model: version 1 does not exist "
              "(versions: [])", "promote-unknown-model"),
    _registry("promote ../etc 1", 1, "model name '../etc' is not a registry name",
              "promote-path-as-name"),
    _registry(f"rollback {M}-single", 1, f"registry {M}-single: no previous version to roll "
              f"back to (versions: [1]); promote another version first: `recsqueeze registry "
              f"promote {M}-single N`", "rollback-without-previous"),
]


@pytest.mark.parametrize("args, code, needle", REGISTRY)
def test_registry_refuses_a_bad_command(args, code, needle, stack, world, unchanged):
    _assert_refused(_cli(stack, "registry", *args), code, needle)


# --- artifacts tampered in the bucket: named, never trusted, nothing rewritten ---------------
def _version(n: int) -> str:
    return f"{{s3}}registry/{M}-tampered/versions/{n}"


def _tampered(args: str, code: int, needle: str, case: str, dataset: str | None = None,
              quiet: bool = True) -> Any:
    """`dataset`: run a request on that dataset; `quiet`: stderr is the message, stdout empty."""
    return pytest.param(args, code, needle, dataset, quiet and dataset is None, id=case,
                        marks=[FLOW] if dataset else [])


TAMPERED = [
    _tampered(f"registry show {M}-tampered --version 1", 1, f"{M}-tampered v1 could not be "
              f"verified: {_version(1)}/version.json: the version record's seal does not match "
              "(edited outside a promotion, or sealed with another signing key): fix or roll "
              "back the registry", "version-record-edited"),
    _tampered(f"registry show {M}-tampered --version 2", 1, f"{M}-tampered v2 could not be "
              f"verified: {_version(2)}/version.json: the version record's seal does not match",
              "version-record-re-pointed"),
    _tampered(f"registry show {M}-tampered --version 4", 1, f"{M}-tampered v4 could not be "
              f"verified (sha256 mismatch in registry/{M}-tampered/versions/4/model.safetensors):"
              " fix or roll back the registry", "weights-truncated"),
    _tampered(f"registry show {M}-tampered --version 5", 1, f"{M}-tampered v5 could not be "
              f"verified: {_version(5)}/metrics.json: sha256 does not match version.json "
              "(edited after the promotion): fix or roll back the registry",
              "file-edited-after-seal"),
    _tampered(f"registry show {M}-tampered --version 6", 1, f"{M}-tampered v6 could not be "
              f"verified: {_version(6)}/lineage.json: missing (version.json lists it): fix or "
              "roll back the registry", "file-deleted-after-seal"),
    _tampered(f"registry show {M}-alias-garbage", 1, f"{{s3}}registry/{M}-alias-garbage/"
              "aliases/production.json: not an alias record (got b'\\x00 not json'); restore it, "
              f"or delete it and `recsqueeze registry promote {M}-alias-garbage N`",
              "alias-not-json"),
    _tampered(f"registry rollback {M}-alias-type", 1, f"{M}-alias-type/aliases/production.json: "
              "not an alias record (got b'{\"version\": \"two\"}')", "alias-version-not-a-number"),
    # the other models are listed on stdout; the broken ones named on stderr, and the exit is 1
    _tampered("registry list", 1, f"{M}-alias-type/aliases/production.json: not an alias record",
              "list-with-a-broken-alias", quiet=False),
    _tampered("run --request {req}", 2, "run refused: dataset.uri: {garbage}spec.json is not a "
              "dataset record (not JSON); import the dataset again (`recsqueeze dataset import`) "
              "and use the uri it prints", "dataset-spec-garbage", dataset="{garbage}"),
    _tampered("run --request {req}", 2, "run refused: dataset {split}train.parquet: sha256 "
              "{split_got} != {split_recorded} (corrupted or replaced); import the dataset again "
              "(`recsqueeze dataset import`)", "dataset-split-replaced", dataset="{split}"),
]


@pytest.mark.parametrize("args, code, needle, dataset, quiet", TAMPERED)
def test_a_tampered_artifact_is_named_and_not_trusted(args, code, needle, dataset, quiet, stack,
                                                      world, tmp_path, unchanged):
    path = tmp_path / "request.json"
    if dataset is not None:  # a request that would run, but for the dataset
        path.write_text(_fill(json.dumps({
            "dataset": {"uri": dataset}, "reuse_results": False,
            "train": {"epochs": 1, "batch_size": 512},
            "candidates": [{"id": "int8-emb", "plan": [{"kind": "quantize", "linear": "none"}]}],
        }), world))
    out = _cli(stack, *_fill(args, world, req=path).split())
    _assert_refused(out, code, _fill(needle, world), before_work=quiet)


def test_the_table_has_fifty_cases():
    counts = {"run": len(REQUESTS), "rest": len(REST), "dataset import": len(DATASETS),
              "registry": len(REGISTRY), "tampered": len(TAMPERED)}
    assert sum(counts.values()) >= 50, counts
