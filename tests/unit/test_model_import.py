"""Importing a trained model (tasks.modelimport): the checks, the store, a run from it."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save as st_save

from tasks.artifacts import MemoryStore
from tasks.data import to_arrays
from tasks.execute import LocalExecutor, run_plan
from tasks.generator import generate
from tasks.modelimport import ImportRefused, baseline_source, import_model, resolve_baseline
from tasks.models import build, resolve
from tasks.plan import plan
from tasks.types import (
    Candidate,
    CompressionRequest,
    CustomSpec,
    DatasetRequest,
    DlrmSpec,
    QuantizeConfig,
)

SPEC = DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,))


@pytest.fixture(scope="module")
def world():
    """A store holding the tiny click log, the dataset's ref and a 'trained' DLRM's weights."""
    tables, data = generate("tiny", 0)
    store = MemoryStore(signing_key=b"k")
    ref = store.put_dataset(tables, data)
    model = build(resolve(SPEC, data), seed=3)
    valid = to_arrays(tables["valid"], data)
    return store, ref, model, valid


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _objects(store: MemoryStore) -> set[str]:
    return {k for k in store.objects if not k.startswith("datasets/")}


def test_safetensors_and_state_dict_import_to_one_uri_and_reimport_writes_nothing(world):
    store, ref, model, valid = world
    state = model.state_dict()
    record, written = import_model(store, st_save(state), SPEC, ref, "shop", valid)
    assert written and record.source_format == "safetensors"
    assert record.dataset == {"uri": ref.uri, "sha256": ref.sha256}
    keys = _objects(store)
    again, written = import_model(store, st_save(state), SPEC, ref, "shop", valid)
    assert not written and again == record and _objects(store) == keys
    # the same weights as a torch state_dict are the same model: same URI, nothing written
    other, written = import_model(store, _torch_bytes(state), SPEC, ref, "shop", valid)
    assert not written and other.model == record.model
    loaded, spec = store.get_model(record.model)
    dense, sparse = torch.from_numpy(valid.dense[:64]), torch.from_numpy(valid.sparse[:64])
    assert torch.equal(loaded(dense, sparse), model.eval()(dense, sparse))
    assert spec == record.spec and baseline_source(store, record.model.uri) == record
    assert baseline_source(store, "shop@latest") == record
    # a damaged object is healed by importing the same weights again, the record kept
    key = store.key_of(record.model.uri)
    store.objects[key] = store.objects[key][:-1]
    healed, written = import_model(store, st_save(state), SPEC, ref, "shop", valid)
    assert not written and healed == record and store.get_model(record.model)


def test_half_precision_weights_are_widened_and_recorded(world):
    store, ref, model, valid = world
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: v.to(dtype) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}
        record, _ = import_model(store, st_save(half), SPEC, ref, "half", valid)
        assert record.source_dtypes == (str(dtype).removeprefix("torch."),)
        loaded, _ = store.get_model(record.model)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())


def _refused(world, data: bytes, match: str, spec=SPEC) -> None:
    store, ref, _, valid = world
    before = set(store.objects)
    with pytest.raises(ImportRefused, match=match) as info:
        import_model(store, data, spec, ref, "bad", valid)
    assert "\n" not in str(info.value)  # one line
    assert set(store.objects) == before  # nothing written on a refusal


def test_hostile_files_are_refused_in_one_line_and_nothing_is_written(world):
    _, _, model, _ = world
    state = model.state_dict()
    _refused(world, b"", "the file is empty")
    _refused(world, _torch_bytes(model), "pickled objects that are not tensors")
    _refused(world, st_save(state)[:-100], "not a readable safetensors file")
    _refused(world, _torch_bytes(state)[:500], "neither safetensors nor a torch state_dict")
    _refused(world, b"not a model at all", "neither safetensors nor a torch state_dict")
    _refused(world, _torch_bytes({"model": state, "step": 3}), "entry 'model' is not a tensor \\(OrderedDict")
    _refused(world, _torch_bytes([1, 2]), "holds list, not a state_dict")
    for bad in (float("nan"), float("inf")):
        poisoned = dict(state)
        poisoned["top.0.weight"] = state["top.0.weight"].clone()
        poisoned["top.0.weight"][0, 0] = bad
        _refused(world, st_save(poisoned), r"tensor 'top.0.weight' holds (NaN|Inf) \(1 of")


def test_strict_load_names_missing_unexpected_and_both_shapes(world):
    store, ref, model, valid = world
    state = dict(model.state_dict())
    del state["top.0.bias"]
    state["head.weight"] = torch.zeros(2)
    state["embeddings.0.weight"] = torch.zeros(7, 8)
    before = set(store.objects)
    with pytest.raises(ImportRefused) as info:
        import_model(store, st_save(state), SPEC, ref, "bad", valid)
    text = str(info.value)
    assert "missing 'top.0.bias'" in text and "unexpected 'head.weight'" in text
    assert "'embeddings.0.weight' is [7, 8] in the file, [2000, 8] in the model" in text
    assert "\n" not in text and set(store.objects) == before


def test_a_spec_the_class_does_not_accept_and_bad_outputs_are_refused(world):
    _, _, model, _ = world
    broken = CustomSpec(class_path="tests.user_models.shop_ranker:ShopRanker",
                        task="ranking", options={"hidden": "wide"})
    _refused(world, st_save(model.state_dict()), r"cannot be built from the spec \(ValueError",
             spec=broken)
    diverged = {k: v * 1e30 if k.startswith("top") else v for k, v in model.state_dict().items()}
    _refused(world, st_save(diverged), "gave NaN or Inf outputs")


def test_a_request_compresses_the_import_with_its_familys_defaults(world):
    store, ref, model, valid = world
    record, _ = import_model(store, st_save(model.state_dict()), SPEC, ref, "run-me", valid)
    request = CompressionRequest(
        baseline="run-me@latest", dataset=DatasetRequest(builtin="tiny"),
        candidates=(Candidate(id="int8", plan=(QuantizeConfig(linear="dynamic_int8"),)),),
        require_useful_baseline=False)
    with pytest.raises(ValueError, match="planned with its import record"):
        plan(request)
    request, imported = resolve_baseline(store, request)
    assert imported == record and request.model == SPEC
    executed = run_plan(plan(request, imported=imported), LocalExecutor(store))
    assert executed.baseline.chain == ("imported",)
    assert executed.baseline.model == record.model  # compressed what was imported, untrained
    assert [r.candidate.id for r in executed.results] == ["int8"]
    # a request that sets another model than the import's is refused, naming both
    other = CompressionRequest(baseline="run-me@latest", model=DlrmSpec(embedding_dim=4))
    with pytest.raises(ValueError, match="remove model from the request"):
        resolve_baseline(store, other)


def test_baseline_sources_that_do_not_verify_are_refused(world):
    store, ref, _, valid = world
    model = build(resolve(SPEC, ref.spec), seed=4)  # imported under this name only
    record, _ = import_model(store, st_save(model.state_dict()), SPEC, ref, "sealed", valid)
    key = f"imports/sealed/{record.model.sha256}.json"
    good = store.objects[key]
    forged = json.loads(good)
    forged["imported_at"] = "2030-01-01T00:00:00+00:00"
    store.objects[key] = json.dumps(forged).encode()
    try:
        with pytest.raises(ValueError, match="does not verify"):
            baseline_source(store, record.model.uri)
        with pytest.raises(ValueError, match="no model was imported under 'sealed'"):
            baseline_source(store, "sealed@latest")
    finally:
        store.objects[key] = good
    with pytest.raises(ValueError, match="not an imported model of this store"):
        baseline_source(store, store.uri("objects/" + "0" * 64))
    with pytest.raises(ValueError, match="needs the model registry"):
        baseline_source(store, "sealed@production")


def test_the_default_request_trains_a_baseline_the_preflight_lets_through():
    """`recsqueeze run` with no request: the default request (tiny data, default training)
    gives a baseline that beats its trivial predictors, through the flow's own task
    functions, so the run is not stopped before compression (it was, before the training
    defaults scaled with the rows)."""
    from tasks.gate import preflight

    request = CompressionRequest()
    graph = plan(request)
    out = LocalExecutor().run(graph, [graph.baseline_evaluation])
    evaluation = out[graph.baseline_evaluation]
    assert not isinstance(evaluation, BaseException), evaluation
    assert all(t.margin_low > 0 for t in evaluation.trivial), evaluation.trivial
    assert preflight(evaluation.trivial, evaluation.resolution, request.budget,
                     request.require_useful_baseline, evaluation.metrics) is None


def test_a_tampered_import_in_the_bucket_stops_the_run_at_its_baseline(world):
    """The import's object is verified (sha256) where the run loads it: replaced bytes stop the
    run before anything is compressed, naming the object."""
    store, ref, _, valid = world
    model = build(resolve(SPEC, ref.spec), seed=5)
    record, _ = import_model(store, st_save(model.state_dict()), SPEC, ref, "tampered", valid)
    key = store.key_of(record.model.uri)
    good = store.objects[key]
    store.objects[key] = good[:-8] + b"\0" * 8
    request = CompressionRequest(
        baseline=record.model.uri, dataset=DatasetRequest(builtin="tiny"),
        candidates=(Candidate(id="int8", plan=(QuantizeConfig(),)),))
    try:
        request, imported = resolve_baseline(store, request)
        with pytest.raises(ValueError, match=f"{record.model.uri}: sha256 .* \\(corrupted\\)"):
            run_plan(plan(request, imported=imported), LocalExecutor(store))
    finally:
        store.objects[key] = good
